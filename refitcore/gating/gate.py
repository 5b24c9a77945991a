"""The pre-deploy gate: does refitting this checkpoint reproduce eager PyTorch?

:func:`gate` loads an engine bundle and a checkpoint, checks the checkpoint fits the compiled
architecture and holds no NaN/Inf, refits a copy of the engine through each chosen path, compares
it with the eager model on sample inputs, audits cached vs fallback, and on a mismatch names the
culprit weight (:func:`refitcore.refitting.culprit.find_culprit`). It returns a :class:`GateReport`: truthy
when every check passed, with ``exit_code`` 0 (pass), 1 (mismatch or refused weights) or 2
(unusable input: missing or damaged file, other architecture, no trusted model).
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from refitcore.capture.eager import EagerModelError, UntrustedFactoryError, eager_model
from refitcore.engine.reexport import exported_for
from refitcore.errors import ArchitectureMismatchError, RefitError, WeightMappingError
from refitcore.gating.files import EXIT_MISMATCH, EXIT_OK, EXIT_UNUSABLE, InputError, open_bundle, read_checkpoint
from refitcore.gating.samples import SampleError, load_samples
from refitcore.options import TOOL, check_tolerance, parse_paths, tolerances_for
from refitcore.refitting.pipeline import run_refit
from refitcore.refitting.prepare import prepare_weights
from refitcore.refitting.render import (
    Silent,
    audit_failure_lines,
    audit_line,
    audit_markdown,
    audit_problem,
    culprit_note,
    indented,
    no_culprit_note,
    number,
)
from refitcore.refitting.report_schema import check_entry, envelope
from refitcore.refitting.validate import eager_weights

__all__ = ["gate", "GateReport", "EXIT_OK", "EXIT_MISMATCH", "EXIT_UNUSABLE"]


class GateReport:
    """What the gate found. Truthy when every check passed; ``exit_code`` 0, 1 or 2; ``error`` the
    message that stopped it early (None when every check ran). ``to_json()`` is the JSON report,
    ``to_markdown()`` a summary for CI job logs, ``str()`` the terminal report."""

    def __init__(self, data: dict[str, Any], error: str | None = None):
        self.data = data
        self.error = error

    @property
    def ok(self) -> bool:
        return self.data["status"] == "pass"

    @property
    def exit_code(self) -> int:
        return self.data["exit_code"]

    @property
    def verdict(self) -> str:
        return self.data["status"]

    @property
    def culprits(self) -> dict[str, str]:
        """``{path: culprit engine weight}`` for each failing path that named one."""
        return {p: e["culprit"] for p, e in self.data["paths"].items() if e.get("culprit")}

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        return self.data

    def __str__(self) -> str:
        r = self.data
        head = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}[r["status"]]
        lines = [f"{TOOL} gate: {head}: {r['checkpoint']} on {r['bundle']}"
                 + (f" (backend {r['backend']})" if r.get("backend") else "")]
        for name, p in r["paths"].items():
            culprit = f", culprit weight {p['culprit']!r}" if p.get("culprit") else ""
            lines.append(f"  {name:8s} {'pass' if p['ok'] else 'FAIL'}: max abs error {number(p['max_abs'])}{culprit}; "
                         f"mapping {p['timings']['mapping_s'] * 1e3:.1f} ms, "
                         f"apply {p['timings']['apply_s'] * 1e3:.1f} ms")
            if not p["ok"]:
                lines.append(indented(p["report"], "    "))
                if p.get("note"):
                    lines.append(f"    {p['note']}")
        audit = r.get("audit")
        if audit is not None:
            lines.append("  " + audit_line(audit))
            lines += ["    " + line for line in audit_failure_lines(audit)]
        lines += [f"  note: {n}" for n in r.get("notes", [])]
        lines += [f"  problem: {p}" for p in r["problems"]]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        r = self.data
        verdict = {"pass": "PASS ✅", "fail": "FAIL ❌", "error": "ERROR ⚠️"}[r["status"]]
        lines = [f"### {TOOL} gate: {verdict}", "", f"- bundle: `{r['bundle']}`", f"- checkpoint: `{r['checkpoint']}`"]
        lines += [f"- note: {n}" for n in r.get("notes", [])]
        if r.get("backend"):
            lines.append(f"- backend: {r['backend']}" + (f" ({r['backend_note']})" if r.get("backend_note") else ""))
        if r.get("samples"):
            lines.append(f"- samples: {r['samples']}; rtol={r['rtol']:g}, atol={r['atol']:g} "
                         f"(scaled by max(1, max|eager|))")
        lines.append("")
        if r["problems"]:
            lines += ["**Problems**", ""] + [f"- {p}" for p in r["problems"]] + [""]
        if r["paths"]:
            lines += ["| path | max abs error | verdict | culprit weight | mapping time | apply time |",
                      "|---|---|---|---|---|---|"]
            for name, p in r["paths"].items():
                culprit = f"`{p['culprit']}`" if p.get("culprit") else "-"
                t = p.get("timings", {})
                lines.append(f"| {name} | {number(p.get('max_abs'))} | {'pass' if p['ok'] else '**FAIL**'} | "
                             f"{culprit} | {t.get('mapping_s', 0) * 1e3:.1f} ms | {t.get('apply_s', 0) * 1e3:.1f} ms |")
            lines.append("")
            for name, p in r["paths"].items():
                checks = p.get("outputs") or []
                if not checks:
                    continue
                lines += [f"<details><summary>{name} path: per-sample errors</summary>", "",
                          "| sample | output | max abs error | max rel error | norm-rel error | verdict |",
                          "|---|---|---|---|---|---|"]
                for s, sample in enumerate(checks):
                    for c in sample:
                        lines.append(f"| {s} | {c['index']} | {number(c['max_abs'])} | {number(c['max_rel'])} | "
                                     f"{number(c['norm_rel'])} | {'pass' if c['ok'] else '**FAIL**'} |")
                lines += ["", "</details>", ""]
        audit = r.get("audit")
        if audit is not None:
            lines += [audit_markdown(audit), ""]
        return "\n".join(lines) + "\n"


def gate(bundle: Any, checkpoint: Any, inputs: Any, *, paths: str | tuple[str, ...] | list[str] = "both",
         rtol: float | None = None, atol: float | None = None, model: Any = None, trust_factory: bool = False,
         progress: Any = None) -> GateReport:
    """Gate ``checkpoint`` (a path or a state_dict) on ``bundle`` (a path or a RefittableEngine).

    ``inputs``: ``'random:N[:SEED]'``, a ``.pt``/``.npy`` path, or a list of samples. ``paths``:
    'cached', 'fallback' or 'both' (which also audits them). ``model``: the eager model (nn.Module,
    factory callable or 'module:callable'); without it the bundle's recorded factory is used only
    with ``trust_factory=True``. ``rtol``/``atol``: None (default) takes the bundle's precision's
    (:data:`refitcore.options.PRECISION_TOLERANCES`). ``progress``: an object with ``info(msg)`` and a
    ``step(what)`` context manager. Never raises for a bad input or a mismatch: the report says what happened.

    Example::

        report = refitcore.gate("resnet18.trtrefit", "finetuned.pt", "random:4", model=torchvision.models.resnet18)
        assert report, str(report)
    """
    # Until the bundle is open (and when it cannot be), the report shows float32's defaults for those not given.
    shown_rtol, shown_atol = tolerances_for(None, rtol, atol)
    data: dict[str, Any] = {"tool": TOOL, "status": "error", "bundle": _label(bundle), "checkpoint": _label(checkpoint),
                            "rtol": shown_rtol, "atol": shown_atol, "paths": {}, "audit": None, "problems": []}
    try:
        code = _run(bundle, checkpoint, inputs, _paths(paths), rtol, atol, model, trust_factory,
                    progress or Silent(), data)
    except InputError as err:
        code = err.code
        data["status"] = "fail" if code == EXIT_MISMATCH else "error"
        if str(err) not in data["problems"] and not (code == EXIT_MISMATCH and data["problems"]):
            data["problems"].append(str(err))
        data["exit_code"] = code
        return GateReport(_as_schema(data), str(err))
    data["exit_code"] = code
    return GateReport(_as_schema(data))


def _paths(paths: str | tuple | list) -> tuple[str, ...]:
    """The paths to check; a value the parser refuses is an unusable input (exit 2), not an exception."""
    try:
        return parse_paths(paths)
    except argparse.ArgumentTypeError as err:
        raise InputError(f"paths: {err}") from err


def _as_schema(data: dict[str, Any]) -> dict[str, Any]:
    """The gate's findings in the shared report schema (:mod:`refitcore.refitting.report_schema`); the gate's own
    keys (bundle, checkpoint, audit, exit_code, per-path timings/outputs/note/report) follow them."""
    model = data.get("model_factory") or data["checkpoint"]
    checks = [check_entry(model=model, path=name, ok=p["ok"], culprit=p.get("culprit"), **p.get("worst", {}))
              for name, p in data["paths"].items()]
    status = data["status"]
    summary = {"pass": f"every refit path reproduces eager PyTorch for {data['checkpoint']}",
               "fail": f"{len(data['problems'])} problem(s): {data['problems'][0] if data['problems'] else ''}",
               "error": f"the gate could not run: {data['problems'][0] if data['problems'] else 'unknown error'}"}
    rest = {k: v for k, v in data.items() if k not in ("status", "paths", "problems", "rtol", "atol", "backend",
                                                         "backend_note")}
    return envelope(producer=f"{TOOL} gate", status=status, summary=summary[status], checks=checks,
                    backend=data.get("backend"), backend_note=data.get("backend_note"), rtol=data["rtol"],
                    atol=data["atol"], problems=data["problems"], paths=data["paths"], **rest)


def _label(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    return f"<{type(obj).__name__}>"


def _model_or_stop(model, engine, trust_factory: bool, bundle: str):
    """The eager model's source, or a stop saying how to give one (checked before any work)."""
    if model is not None:
        return model
    if not engine.model_factory:
        raise InputError(f"{bundle!r} records no model factory; pass --model MODULE:FACTORY (the callable that "
                    f"builds the model) so the eager model can be rebuilt")
    if not trust_factory:
        raise InputError(str(UntrustedFactoryError(engine.model_factory)))
    return engine.model_factory


def _eager(state, factory, ckpt: str, progress, engine, share: bool):
    name = factory if isinstance(factory, str) else getattr(factory, "__name__", type(factory).__name__)
    with progress.step(f"building the eager reference model from {name}"):
        try:
            weights, keep = eager_weights(engine.weight_map, state, engine.state_keys)
            return eager_model(weights, model=factory, keep_missing=keep, share=share)
        except EagerModelError as err:
            raise InputError(f"checkpoint {ckpt!r} does not fit {name}: {err}; another architecture: recompile needed"
                        ) from err
        except (ValueError, TypeError) as err:   # the factory cannot be imported or built
            raise InputError(f"{err} (is the package importable from here? check PYTHONPATH)") from err


def _same_graph_or_stop(engine, weights, factory, progress) -> None:
    """When the engine holds the right weights and still disagrees with eager, the model's code may have
    changed since compile: export the model again and compare its graph with the compiled one (only
    then: the refit paths convert the engine's own recorded graph). A different graph stops the gate
    as an unusable input naming the first difference: recompile needed (exit 2)."""
    if engine.exported_program is not None:
        return   # an engine compiled in this process: its graph is the model's own
    with progress.step("exporting the model again to compare its graph with the compiled one"):
        try:
            exported_for(engine, None, weights.state, model=factory, owned=weights.owned)
        except ArchitectureMismatchError as err:
            raise InputError(f"{err}") from err


def _run(bundle, checkpoint, inputs, paths, rtol, atol, model, trust_factory, progress, data) -> int:
    try:   # a NaN tolerance would pass every comparison: refused before anything is read
        rtol, atol = (None if v is None else check_tolerance(v, k) for k, v in (("rtol", rtol), ("atol", atol)))
    except ValueError as err:
        raise InputError(str(err)) from err
    # Every refittable weight is set from the checkpoint: the bundle's own are checked, never read.
    engine = open_bundle(bundle, progress, weights=False)
    data["backend"], data["backend_note"] = engine.backend, engine.note
    # Tolerances not given are the engine precision's (a float16 engine is not held to float32's).
    rtol, atol = tolerances_for(engine.options.precision, rtol, atol)
    data["rtol"], data["atol"] = rtol, atol
    loaded = read_checkpoint(checkpoint, progress, engine, data.setdefault("notes", []))
    ckpt = data["checkpoint"]
    factory = _model_or_stop(model, engine, trust_factory, data["bundle"])
    data["model_factory"] = factory if isinstance(factory, str) else None
    try:
        samples = load_samples(inputs, engine.io) if isinstance(inputs, str) else [tuple(s) for s in inputs]
    except SampleError as err:
        raise InputError(str(err)) from err
    data["samples"] = f"{len(samples)} ({inputs if isinstance(inputs, str) else 'given'})"

    # The checkpoint must fit the compiled architecture before anything else is judged; NaN/Inf in
    # any tensor, read by the engine or not, refuses it whole.
    try:
        # A checkpoint read from a file here is the gate's own: the engine and the eager model keep
        # views of it instead of copies (one copy of the weights: docs/memory.md).
        weights = prepare_weights(engine, loaded, every_key_finite=True, owned=loaded.path is not None)
    except ArchitectureMismatchError as err:
        raise InputError(f"checkpoint {ckpt!r} is for another architecture than {data['bundle']!r}: {err}") from err
    except WeightMappingError as err:
        data["problems"] += [f"refused: {p}" for p in err.problems]
        raise InputError(str(err), EXIT_MISMATCH) from err
    extra = [k for k in weights.state if engine.state_keys and k not in engine.state_keys]
    if extra:
        raise InputError(f"checkpoint {ckpt!r} has {len(extra)} key(s) the compiled model lacks "
                    f"({extra[:5]}): it is for another architecture; recompile needed")
    reference = _eager(weights.state, factory, ckpt, progress, engine, weights.owned)
    try:
        # The fallback converts the bundle's recorded graph again (refitcore.engine.program_record); a
        # bundle without one re-exports a model of its own from the factory (the reference may hold
        # narrower tensors widened per module as it runs, which an export would see narrow).
        report = run_refit(engine, weights, paths=paths, reference=reference, samples=samples, rtol=rtol, atol=atol,
                           model=factory, progress=progress, what="the checkpoint")
    except ArchitectureMismatchError as err:
        raise InputError(f"{err}") from err
    except (WeightMappingError, RefitError) as err:
        data["problems"].append(f"refused: {err}")
        raise InputError(str(err), EXIT_MISMATCH) from err

    for path in paths:
        rec = report.records[path]
        if rec.verdict is None:   # run_refit verifies every path it runs on the samples, or raises
            raise RuntimeError(f"internal error: the {path} path was not compared with eager")
        culprit, note = None, ""
        if not rec.ok:
            if report.culprit is not None:
                culprit, note = report.culprit.name, culprit_note(report.culprit)
            else:
                note = no_culprit_note(rec.verdict.worst)
        data["paths"][path] = {"ok": rec.ok, "max_abs": rec.max_abs, "culprit": culprit,
                               "timings": {"mapping_s": rec.mapping_s, "apply_s": rec.apply_s},
                               "outputs": rec.verdict.to_json()["checks"], "note": note, "report": str(rec.verdict),
                               "worst": rec.worst_fields(), "calibration": rec.verdict.calibration,
                               "unverifiable": rec.verdict.unverifiable}
        if not rec.ok:
            data["problems"].append(f"{path} path: refitted engine disagrees with eager "
                                    f"(max abs error {number(rec.max_abs)})"
                                    + (f"; culprit weight {culprit!r}" if culprit else "")
                                    + (f"; {note}" if note and not culprit else ""))
    if report.audit is not None:
        data["audit"] = report.audit.to_json()
        if not report.audit.ok:
            data["problems"].append(audit_problem(data["audit"]))
    if data["problems"] and not any(p.get("culprit") for p in data["paths"].values()) \
            and (report.audit is None or report.audit.ok):
        _same_graph_or_stop(engine, weights, factory, progress)
    ok = not data["problems"]
    data["status"] = "pass" if ok else "fail"
    return EXIT_OK if ok else EXIT_MISMATCH
