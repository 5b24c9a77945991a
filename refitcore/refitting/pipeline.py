"""The refit pipeline: weights prepared once -> map -> exact audit -> apply -> verify -> culprit.

:func:`run_refit` is the one place these steps run. :func:`refitcore.refit`, the gate
(:func:`refitcore.gate`) and the pytest plugin's checks call it and differ only in policy: which
paths, whether errors raise or are recorded per path, whether the engine is refitted in place,
where the eager model comes from. Each renders the one :class:`RefitReport` it returns.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refitcore.capture.structured import split_call
from refitcore.engine.kinds import CompilerRefit
from refitcore.errors import MapCannotServeError, RefitCoreError, RefitError
from refitcore.options import AUDIT_ATOL, AUDIT_RTOL
from refitcore.progress import Silent, reporting
from refitcore.refitting.audit import Audit, audit as audit_mappings, audit_paths
from refitcore.refitting.culprit import Culprit, find_culprit, unavailable
from refitcore.refitting.driver import Snapshot, apply_mapping, snapshot
from refitcore.refitting.mapping import cached_mapping, compiler_mapping, fallback_mapping
from refitcore.refitting.prepare import CheckedWeights
from refitcore.refitting.render import culprit_note
from refitcore.refitting.validate import finite_views
from refitcore.refitting.verify import Verdict, engine_tolerances, sample_tensors, verify

__all__ = ["run_refit", "RefitReport", "PathRecord", "WITNESS"]

WITNESS = "witness"   # the record of the witness a compiler's own refit is checked against

log = logging.getLogger("refitcore")


@dataclasses.dataclass
class PathRecord:
    """One refit path: how long mapping, apply and verify took, and the verdict or the error."""

    path: str                            # cached | fallback | witness
    mapping_s: float = 0.0
    apply_s: float = 0.0
    verify_s: float = 0.0
    verdict: Verdict | None = None       # engine vs eager, when the pipeline verified
    error: str | None = None             # why the path did not go through (recorded, not raised)
    mapping: dict | None = None          # {engine weight: array}: kept for the audit and the culprit
    held: dict | None = None             # the engine's weights right after this path's refit (on failure)

    @property
    def ok(self) -> bool:
        return self.error is None and (self.verdict is None or self.verdict.ok)

    @property
    def seconds(self) -> float:
        return self.mapping_s + self.apply_s + self.verify_s

    @property
    def max_abs(self) -> float | None:
        return self.verdict.max_abs if self.verdict is not None else None

    def worst_fields(self) -> dict[str, float]:
        """The worst output's measurements (the fields of a report schema check entry)."""
        w = self.verdict.worst if self.verdict is not None else None
        if w is None:
            return {}
        return {k: getattr(w, k) for k in ("max_abs", "max_rel", "norm_rel", "min_rtol", "min_atol")}

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "error": self.error, "max_abs": self.max_abs,
                "worst": self.worst_fields(),
                "timings": {"mapping_s": self.mapping_s, "apply_s": self.apply_s, "verify_s": self.verify_s},
                "verdict": self.verdict.to_json() if self.verdict is not None else None}


@dataclasses.dataclass
class RefitReport:
    """What :func:`run_refit` did. Truthy when every path it ran passed and the audit agrees
    ('auto': when the path the engine ended on passed)."""

    engine: Any                          # the engine holding the weights of ``used`` (unless ``restored``)
    requested: str                       # 'auto', or the paths asked for: 'cached', 'fallback', 'cached,fallback'
    paths: list[str]                     # the paths the engine was refitted through, in order
    records: dict[str, PathRecord]       # every path mapped (an audit or culprit witness too), in order
    used: str | None = None              # the path whose weights ``engine`` holds (the last one tried if ``restored``)
    fell_back: bool = False              # 'auto' refitted through the fallback
    audit: Audit | None = None           # cached vs fallback, exact, when both were mapped
    culprit: Culprit | None = None       # the first engine weight the witnesses disagree on
    messages: list[str] = dataclasses.field(default_factory=list)
    total_s: float = 0.0
    restored: bool = False               # an in-place refit failed: ``engine`` holds its previous weights again

    @property
    def final(self) -> list[PathRecord]:
        """The records the verdict rests on: the path 'auto' ended on, else every path run."""
        names = [self.used] if self.requested == "auto" and self.used else self.paths
        return [self.records[p] for p in names]

    @property
    def ok(self) -> bool:
        final = self.final
        good = all(r.ok for r in final) and (WITNESS not in self.records or self.records[WITNESS].ok)
        return good and (self.audit is None or self.audit.ok or (self.fell_back and final[0].verdict is not None))

    def __bool__(self) -> bool:
        return self.ok

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "requested": self.requested, "paths": self.paths, "used": self.used,
                "fell_back": self.fell_back, "records": {p: r.as_dict() for p, r in self.records.items()},
                "audit": self.audit.to_json() if self.audit is not None else None,
                "culprit": self.culprit.to_json() if self.culprit is not None else None,
                "messages": list(self.messages), "total_s": self.total_s, "restored": self.restored}


_MAPPING_STEP = {"cached": "mapping {what} through the cached weight map",
                 "fallback": "fallback: converting the graph again with the new weights",
                 WITNESS: "witness: converting {what} afresh and reading every weight off the network"}
_COMPILER_STEP = {"cached": "mapping {what} through {compiler}'s cached refit path",
                  "fallback": "{compiler}'s refit: converting {what} and recording every weight it sets"}


def run_refit(engine, weights: CheckedWeights, *, paths: str | Sequence[str] = "auto", reference: Any = None,
              samples: Sequence | None = None, rtol: float | None = None, atol: float | None = None,
              in_place: bool = False, keep_failed: bool = False, audit: bool = False, culprit: bool = True,
              keep_witnesses: bool = False, record_errors: bool = False, model: Any = None, trust_factory: bool = False,
              progress: Any = None, what: str = "the new weights") -> RefitReport:
    """Refit ``engine`` with prepared ``weights`` through ``paths`` and report.

    ``paths``: 'auto' (cached; the fallback when the map cannot serve the weights or the cached
    refit disagrees with eager, saying so), or the paths to run in order (('cached',),
    ('cached', 'fallback')). Each path is mapped first; when both are, they are audited exactly
    (``audit=True`` maps both whatever is run). Then each is applied (to a copy of ``engine``
    unless ``in_place``: in place, one after another on the same engine) and, with ``reference``
    (the eager model) and ``samples`` (checked by the caller), verified. With ``culprit``, a
    failing path or audit names the first engine weight the witnesses disagree on (the other
    mapping is computed for it). ``record_errors``: a path that cannot be mapped, applied or run
    records its error and the others go on; otherwise errors raise (the engine is untouched:
    :func:`~refitcore.refitting.driver.apply_mapping` validates before it sets). ``keep_witnesses``:
    failing records keep their mapping and held weights for the caller's own culprit search.
    ``model``/``trust_factory`` go to the fallback's re-export (an engine without its program);
    ``progress`` says each step.

    An engine whose compiler refits it (:class:`~refitcore.engine.kinds.CompilerRefit`: Torch-TensorRT's)
    maps each path through that compiler's refit code ('auto': the path it takes by default), and
    every path it maps is audited exactly against the witness (the kind's ``fallback_mapping``, a
    fresh conversion read off the network; the ``witness`` record): a weight it left stale, set
    from the wrong tensor or never set fails the report, and the culprit names it.

    ``in_place=True`` is one transaction: on any exception (interrupts included, re-raised) or a
    falsy report, the engine is restored bit for bit to what it held before (a weightless engine
    is weightless again) and the report says ``restored``; its records still hold what each path
    did (verdicts, and with ``culprit``/``keep_witnesses`` the held weights of failing paths).
    ``keep_failed=True`` (the pytest plugin's checks, which inspect the engine a failing refit
    left) keeps a falsy refit's weights in the engine; an exception still restores it. ``rtol``/``atol``:
    None (default) takes the engine precision's (:func:`~refitcore.refitting.verify.engine_tolerances`);
    tolerances that are NaN, negative or infinite are a ``ValueError`` before anything runs.
    """
    rtol, atol = engine_tolerances(engine, rtol, atol)
    t_start = time.perf_counter()
    progress = progress or Silent()
    auto = paths == "auto"
    compiler = engine.kind if isinstance(engine.kind, CompilerRefit) else None
    run = ([compiler.auto_path(engine)] if compiler is not None else ["cached"]) if auto else list(paths)
    report = RefitReport(engine, "auto" if auto else ",".join(run), [], {})
    failed_maps: dict[str, BaseException] = {}
    verifying = reference is not None and samples is not None

    def map_path(path: str) -> None:
        """Map ``path`` once (an error is recorded, or raised)."""
        rec = report.records.setdefault(path, PathRecord(path))
        if rec.mapping is not None or path in failed_maps:
            return
        t0 = time.perf_counter()
        step = (_COMPILER_STEP[path].format(what=what, compiler=compiler.compiler)
                if compiler is not None and path != WITNESS else _MAPPING_STEP[path].format(what=what))
        try:
            with progress.step(step), reporting(progress):   # a conversion says how far it got
                if compiler is not None and path != WITNESS:
                    rec.mapping = compiler_mapping(engine, path, weights, model=model, trust_factory=trust_factory)
                elif path == "cached":
                    rec.mapping = cached_mapping(engine.weight_map, weights, progress=progress)
                else:   # the fallback, or the witness of a compiler's refit
                    rec.mapping = fallback_mapping(engine, weights, model=model, trust_factory=trust_factory)
        except RefitCoreError as err:
            failed_maps[path] = err
            rec.error = f"{type(err).__name__}: {err}"
            if not record_errors:
                raise
        finally:
            rec.mapping_s += time.perf_counter() - t0

    def apply_and_verify(rec: PathRecord, target, here: bool) -> None:
        if rec.mapping is None:   # the path could not be mapped: its error is recorded, it did not go through
            report.paths.append(rec.path)
            return
        where = "the engine" if here else "a copy of the engine"
        step = f"refitting {where} through the {rec.path} path" + (
            f" and comparing with eager on {len(samples)} sample(s)" if verifying and samples is not None else "")
        report.paths.append(rec.path)
        with progress.step(step):
            t0 = time.perf_counter()
            try:
                # A cached mapping computed here is handed over (no copy); arrays that alias the
                # model's memory are read-only and still copied. The fallback's arrays are views of the
                # weights only when those are the refit's own (``owned``: read from a file for it).
                refitted = apply_mapping(target, rec.mapping, in_place=here,
                                         hand_over=rec.path == "cached" or (rec.path == "fallback" and weights.owned),
                                         checked_finite=True if rec.path == "cached" else finite_views(
                                             rec.mapping, weights.checked, weights.weight_map.keys_used))
            except RefitCoreError as err:
                rec.error = f"{type(err).__name__}: {err}"
                if not record_errors:
                    raise
                return
            finally:
                rec.apply_s += time.perf_counter() - t0
            report.engine, report.used = refitted, rec.path
            if not verifying or samples is None:
                return
            t0 = time.perf_counter()
            try:
                rec.verdict = verify(refitted, reference, samples, rtol=rtol, atol=atol, progress=progress)
            except (RuntimeError, ValueError) as err:   # the engine cannot run a sample (e.g. a baked-in size)
                if not record_errors:
                    raise
                rec.error = _run_error(refitted, samples, err)
            finally:
                rec.verify_s += time.perf_counter() - t0
        if not rec.ok and (culprit or keep_witnesses):
            rec.held = {k: np.array(v, copy=True) for k, v in refitted.current_weights().items()}

    def audit_both() -> None:
        records = report.records
        if compiler is not None:   # the compiler's refit against the witness, exactly
            witness = records[WITNESS].mapping if WITNESS in records else None
            mapped = [m for m in (records[p].mapping for p in run if p in records) if m is not None]
            if report.audit is None and witness is not None and mapped:
                report.audit = audit_mappings(mapped[0], witness, rtol=AUDIT_RTOL, atol=AUDIT_ATOL,
                                     a_label=f"{compiler.compiler}'s refit", b_label=WITNESS)
            return
        cached_map, fallback_map = (records[p].mapping if p in records else None for p in ("cached", "fallback"))
        if report.audit is None and cached_map is not None and fallback_map is not None:
            report.audit = audit_paths(cached_map, fallback_map)

    def find(failing: list[PathRecord]) -> None:
        for path in ("cached", "fallback") if compiler is None else (WITNESS,):
            if path not in report.records or (report.records[path].mapping is None and path not in failed_maps):
                if failing:
                    progress.info(f"the {failing[0].path} path disagrees with eager; computing the {path} "
                                  f"mapping to find the culprit weight")
                map_path(path)
        audit_both()
        report.culprit = find_culprit(
            engine, mappings={p: r.mapping for p, r in report.records.items() if r.mapping is not None},
            held={r.path: r.held for r in failing if r.held is not None},
            errors=[unavailable(p, err) for p, err in failed_maps.items()])

    def steps() -> None:
        """Map, audit, apply and verify each path (errors raise or are recorded as asked)."""
        nonlocal run
        if auto and compiler is None:
            try:
                map_path("cached")
            except MapCannotServeError as err:
                # The map cannot express these weights: converting again can.
                report.messages.append(f"{str(err).splitlines()[0]}: {'; '.join(err.problems)}; refitting through "
                                       f"the fallback path")
                run, report.fell_back = ["fallback"], True
        for path in ("cached", "fallback"):
            if path in run or (audit and compiler is None):
                map_path(path)
        if compiler is not None:
            map_path(WITNESS)
        audit_both()
        for path in run:
            apply_and_verify(report.records[path], engine, in_place)
        if auto and report.used == "cached" and not report.records["cached"].ok:
            cached = report.records["cached"]
            report.messages.append("the cached path disagreed with eager; refitting through the fallback path")
            log.warning("refitcore: cached refit disagreed with eager (%s); retrying via fallback",
                        cached.verdict.worst if cached.verdict is not None else cached.error)
            if culprit:
                find([cached])
                if report.culprit is not None:
                    report.messages.append(culprit_note(report.culprit))
            map_path("fallback")
            audit_both()
            apply_and_verify(report.records["fallback"], report.engine, True)
            report.fell_back = True
        elif (not auto or compiler is not None) and culprit:
            failing = [report.records[p] for p in run if not report.records[p].ok]
            if failing or (report.audit is not None and not report.audit.ok):
                find(failing)

    saved = snapshot(engine) if in_place else None
    try:
        steps()
    except BaseException as err:
        if saved is not None and report.used is not None:   # a path was applied to ``engine`` itself
            problem = _restore(saved)
            if problem is not None and isinstance(err, Exception):
                raise problem from err
        raise
    if saved is not None and report.used is not None and not report.ok and not keep_failed:
        problem = _restore(saved)
        if problem is not None:
            raise problem
        report.restored = True
        report.messages.append("the refit failed: the engine was restored to the weights it held before")
    for rec in report.records.values():
        if not (keep_witnesses and not rec.ok):
            rec.mapping = rec.held = None
    report.total_s = time.perf_counter() - t_start
    return report


def _restore(saved: Snapshot) -> RefitError | None:
    """Restore ``saved``; the error when the backend refused (the engine is then in an unknown state)."""
    try:
        saved.restore()
    except RefitError as err:
        log.error("refitcore: %s", err)
        return err
    return None


def _run_error(engine, samples: Sequence, err: Exception) -> str:
    """Which sample the engine cannot run, by its shapes, and what it said."""
    failing = samples[0]
    with torch.no_grad():
        for sample in samples:
            args, kwargs = split_call(sample)
            try:
                engine(*args, **kwargs)
            except (RuntimeError, ValueError, TypeError):
                failing = sample
                break
    shapes = [list(t.shape) for t in sample_tensors(failing)]
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"the refitted engine fails on inputs of shape {shapes}: {type(err).__name__}: {first}"
