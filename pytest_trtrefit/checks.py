"""Refit checks and the mismatch report.

A check refits a compiled engine with new weights through each selected path (the cached weight
map, the fallback conversion), runs it and the eager model on the same inputs, and on any
disagreement builds a report that says which path and output, by how much and where, the
tolerances and the smallest that would have passed, and the *culprit*: the first engine weight
(in engine order) where the cached mapping, the fallback mapping and the weights the engine
actually holds after the refit disagree.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from refitcore.options import DEFAULT_COMPILER

if TYPE_CHECKING:
    from refitcore.refitting.culprit import Culprit

__all__ = ["PathOutcome", "CheckOutcome", "run_check", "find_culprit", "Culprit", "describe_weights",
           "as_samples", "call_of", "output_label", "failing_outputs", "sample_tensors", "format_report", "model_label",
           "quiet_logs", "trt_share", "NOISY_LOGGERS"]

# Third-party loggers whose DEBUG/INFO records (torch.export's graph traces: ~26 lines per failure)
# would otherwise fill pytest's "Captured log" sections of every failing check.
NOISY_LOGGERS = ("torch", "torch.__trace", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
                 "torch.fx.experimental.symbolic_shapes", "torch._subclasses", "torch.utils._sympy", "filelock")


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING):
    """Raise the noisy third-party loggers to ``level`` while a check runs, then restore them."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.level < level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


def model_label(model) -> str:
    """A stable label for a model: its class's qualified name (never the order tests ran in)."""
    cls = type(model)
    return cls.__qualname__


def trt_share(engine) -> float | None:
    """The share (0..1) of the network that TensorRT runs, when the engine reports one: its
    ``summary()`` (a ``refitcore.engine.coverage.Coverage``: ``op_share``, ``fully_converted``; or a dict with
    ``tensorrt_share``/``trt_share``); None when it does not."""
    summary = getattr(engine, "summary", None)
    if not callable(summary):
        return None
    try:
        info = summary()
    except Exception:   # noqa: BLE001 - a summary is optional information: never fail a check over it
        return None
    if getattr(info, "fully_converted", None) is True:
        return 1.0
    for key in ("tensorrt_share", "trt_share", "op_share"):
        value = info.get(key) if isinstance(info, dict) else getattr(info, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _share_of(entry) -> float | None:
    """:func:`trt_share` of a compile-cache entry's engine, computed once per entry."""
    if "trt_share" not in vars(entry):
        vars(entry)["trt_share"] = trt_share(entry.engine)
    return vars(entry)["trt_share"]


def as_samples(inputs) -> list:
    """inputs: one sample (a tensor, a tuple of positional inputs, or a ``refitcore.Inputs`` with
    positional and keyword inputs) or a list of samples; each sample as a tuple or an ``Inputs``."""
    import torch

    from refitcore.capture.structured import Inputs

    if isinstance(inputs, (torch.Tensor, tuple, Inputs)):
        inputs = [inputs]
    samples = []
    for s in inputs:
        samples.append((s,) if isinstance(s, torch.Tensor) else s if isinstance(s, Inputs) else tuple(s))
    if not samples:
        raise ValueError("inputs: give at least one sample (a tensor, a tuple of positional inputs, "
                         "refitcore.Inputs(*args, **kwargs), or a list of them)")
    return samples


def call_of(sample) -> tuple[tuple, dict]:
    """(args, kwargs) of one sample of :func:`as_samples`."""
    from refitcore.capture.structured import split_call

    return split_call(sample)


def sample_tensors(sample) -> list:
    """The tensors of one sample, in flattening order (positional, then keyword inputs)."""
    from refitcore.refitting.verify import sample_tensors as tensors

    return tensors(sample)


def _flat_outputs(engine, sample) -> list:
    """The engine's outputs on one sample as a flat leaf list (pytree order)."""
    args, kwargs = call_of(sample)
    return list(engine.run(engine.flatten_inputs(args, kwargs)))


def describe_weights(weights: Any) -> str:
    """A short, readable name for a weight set (strategies give theirs a readable repr)."""
    import torch

    if hasattr(weights, "describe"):
        return weights.describe()
    if isinstance(weights, torch.nn.Module):
        return f"{type(weights).__name__} module"
    if isinstance(weights, dict):
        return f"state_dict with {len(weights)} tensors"
    return repr(weights)[:200]


@dataclasses.dataclass
class PathOutcome:
    """One refit path of one check."""

    path: str
    ok: bool
    seconds: float
    verdict: Any = None                  # refitcore.Verdict, when the refit went through
    error: str | None = None             # a refit/mapping error, when it did not
    mapping: dict | None = None          # the mapping this path produced
    held: dict | None = None             # what the engine held right after this path's refit (on failure)
    repeat_of: int | None = None         # sequence step whose weights this step repeats
    repeat_diff: float | None = None     # max |outputs - outputs at the repeated step| (0 = exact)
    outputs: list | None = None          # engine outputs on the first sample (sequences)

    @property
    def worst(self):
        return self.verdict.worst if self.verdict is not None else None


@dataclasses.dataclass
class CheckOutcome:
    model: str
    backend: str
    note: str
    weights: str
    paths: list[PathOutcome]
    rtol: float
    atol: float
    output_names: tuple[str, ...] = ()
    culprit: Culprit | None = None
    mapping_audit: Any = None            # cached vs fallback (both paths ran)
    kind: str = "check"                  # check | sequence
    step: int | None = None
    layers: list | None = None           # [[engine weight, max abs diff cached vs fallback, status]], engine order
    trt_share: float | None = None       # the share of the network TensorRT runs (when the engine says)
    architecture: str | None = None      # the compile-cache entry's architecture key (16 hex digits)
    compiler: str | None = None          # the engine's compiler when it is not refitcore's (torch_tensorrt)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.paths) and (self.mapping_audit is None or self.mapping_audit.ok)

    def report(self) -> str:
        return format_report(self)


def digest(state) -> str:
    """A content hash of a state_dict (to spot a weight set that repeats an earlier one)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _eager_for(entry, state):
    """The session's eager model holding ``state`` (keys it lacks keep the compiled model's values)."""
    from refitcore.capture.eager import eager_model

    return eager_model(state, model=entry.eager, keep_missing=True)


def _prepared(engine, loaded):
    """(CheckedWeights, None), or (None, the error) when the weights do not fit the engine's map:
    every path reports that error as the reason it did not go through."""
    from refitcore.errors import RefitCoreError
    from refitcore.refitting.prepare import prepare_weights

    try:
        return prepare_weights(engine, loaded), None
    except RefitCoreError as err:
        return None, f"{type(err).__name__}: {err}"


def _outcome(record) -> PathOutcome:
    """A path's outcome from the pipeline's record of it."""
    return PathOutcome(record.path, record.ok, record.seconds, verdict=record.verdict, error=record.error,
                       mapping=record.mapping, held=record.held)


def _refit(entry, weights, eager, samples, paths, rtol, atol, *, culprit: bool):
    """The pipeline on the session's engine: in place, each path in turn, errors recorded per path. A
    failing refit's weights stay in the engine (``keep_failed``): a sequence reads the outputs and
    weights the engine answers with after each step, failing or not (every refit sets all weights,
    so the next check does not depend on them)."""
    from refitcore.refitting.pipeline import run_refit

    return run_refit(entry.engine, weights, paths=paths, reference=eager, samples=samples, rtol=rtol, atol=atol,
                     in_place=True, keep_failed=True, record_errors=True, culprit=culprit,
                     keep_witnesses=not culprit)


def _new_outcome(entry, model: str, label: str, paths: list, rtol: float, atol: float, **kind) -> CheckOutcome:
    """An outcome for ``entry``'s engine, with what every outcome says of it (backend, outputs,
    TensorRT share, architecture key)."""
    engine = entry.engine
    compiler = engine.options.compiler
    return CheckOutcome(model, engine.backend, engine.note, label, paths, rtol, atol,
                        output_names=tuple(engine.io.output_names), trt_share=_share_of(entry),
                        architecture=str(getattr(entry, "key", ""))[:16] or None,
                        compiler=compiler if compiler != DEFAULT_COMPILER else None, **kind)


def run_check(entry, weights, samples, *, paths: Sequence[str], rtol: float, atol: float, model: str,
              weights_label: str) -> CheckOutcome:
    """Refit ``entry.engine`` with ``weights`` (loaded for it: ``refitcore.refitting.prepare.load_for``)
    through each path, compare with eager; never raises on a mismatch (the outcome says what failed)."""
    engine = entry.engine
    result = _new_outcome(entry, model, weights_label, [], rtol, atol)
    checked, error = _prepared(engine, weights)
    if checked is None:
        result.paths = [PathOutcome(p, False, 0.0, error=error) for p in paths]
    else:
        try:
            eager = _eager_for(entry, checked.state)
        except (RuntimeError, ValueError) as err:   # wrong shapes: say what the mapping says about them
            result.paths = [_unloadable(engine, p, checked, err) for p in paths]
            return result
        report = _refit(entry, checked, eager, samples, paths, rtol, atol, culprit=True)
        result.paths = [_outcome(report.records[p]) for p in paths] + _witness_failure(report)
        if report.audit is not None:   # cached vs fallback (both paths ran), or a compiler's refit vs its witness
            result.mapping_audit = report.audit
            result.layers = _layer_diffs(engine, report.audit)
        result.culprit = report.culprit
    return result


def _witness_failure(report) -> list[PathOutcome]:
    """The witness a compiler's refit is audited against (Torch-TensorRT's: a fresh conversion), as a
    failing outcome when it could not be made: without it the refit's weights went unaudited."""
    from refitcore.refitting.pipeline import WITNESS

    witness = report.records.get(WITNESS)
    if witness is None or witness.error is None:
        return []
    return [PathOutcome(WITNESS, False, witness.mapping_s, error=f"no witness to audit the refit against: "
                                                                 f"{witness.error}")]


def _layer_diffs(engine, report) -> list:
    """Per engine weight (engine order), the max abs difference of the two mappings and its status."""
    by_name = {d.name: d for d in report.diffs}
    names = list(engine.weight_names)
    known = set(names)
    order = [n for n in names if n in by_name] + [n for n in by_name if n not in known]
    return [[n, float(by_name[n].max_abs), by_name[n].status] for n in order]


def _unloadable(engine, path: str, weights, err: Exception) -> PathOutcome:
    """A path whose eager model cannot load the weights: the mapping's error when it has one."""
    from refitcore.errors import RefitCoreError
    from refitcore.refitting.mapping import cached_mapping, fallback_mapping

    try:
        cached_mapping(engine.weight_map, weights) if path == "cached" else fallback_mapping(engine, weights)
    except RefitCoreError as mapping_err:
        return PathOutcome(path, False, 0.0, error=f"{type(mapping_err).__name__}: {mapping_err}")
    first = str(err).strip().splitlines()
    return PathOutcome(path, False, 0.0, error=f"the eager model cannot load these weights: "
                                               f"{' '.join(first[:3])}")


def run_sequence(entry, sequence, samples, *, paths: Sequence[str], rtol: float, atol: float, model: str,
                 labels: Sequence[str]) -> list[CheckOutcome]:
    """Refit the same engine with the weight sets of ``sequence`` (each loaded for it:
    ``refitcore.refitting.prepare.load_for``) one after another (per path), comparing with eager at
    every step; a step whose weights repeat an earlier step's must give bit-identical outputs
    (A -> B -> A returns exactly to A). One outcome per step."""
    import torch

    engine = entry.engine
    digests = [digest(w.state_dict) for w in sequence]
    prepared = [_prepared(engine, w) for w in sequence]
    per_step: list[list[PathOutcome]] = [[] for _ in sequence]
    audits: dict[int, Any] = {}   # step -> a compiler's refit vs its witness (Torch-TensorRT's), the first that failed
    for path in paths:
        seen: dict[str, int] = {}
        outputs: list[list] = []
        for i, (checked, error) in enumerate(prepared):
            if checked is None:
                per_step[i].append(PathOutcome(path, False, 0.0, error=error))
                outputs.append(None)
                continue
            try:
                eager = _eager_for(entry, checked.state)
            except (RuntimeError, ValueError) as err:
                per_step[i].append(_unloadable(engine, path, checked, err))
                outputs.append(None)
                continue
            report = _refit(entry, checked, eager, samples, (path,), rtol, atol, culprit=False)
            o = _outcome(report.records[path])
            per_step[i] += _witness_failure(report)
            if report.audit is not None and (i not in audits or audits[i].ok):
                audits[i] = report.audit
            if o.verdict is not None:
                o.outputs = [t.detach().clone() if hasattr(t, 'detach') else t
                             for t in _flat_outputs(engine, samples[0])]
            if o.outputs is not None and digests[i] in seen:
                j = seen[digests[i]]
                if outputs[j] is not None:
                    pairs = list(zip(o.outputs, outputs[j]))
                    diff = max(((float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
                                if isinstance(a, torch.Tensor) else (0.0 if a == b else float("inf")))
                               for a, b in pairs)
                    identical = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in pairs)
                    o.repeat_of = j
                    o.repeat_diff = 0.0 if identical else (diff if diff > 0 else float("nan"))
                    if not identical:
                        o.ok = False
                        if o.held is None:
                            o.held = {k: v.copy() for k, v in engine.current_weights().items()}
            seen.setdefault(digests[i], i)
            outputs.append(o.outputs)
            o.outputs = None
            per_step[i].append(o)
    results = []
    for i, ((checked, _), outcomes) in enumerate(zip(prepared, per_step)):
        r = _new_outcome(entry, model, labels[i], outcomes, rtol, atol, kind="sequence", step=i,
                         mapping_audit=audits.get(i))
        if not r.ok and checked is not None:
            r.culprit = find_culprit(engine, checked, outcomes)
        for o in outcomes:
            o.mapping = o.held = None
        results.append(r)
    return results


def find_culprit(engine, weights, outcomes: Sequence[PathOutcome]) -> Culprit | None:
    """The first engine weight (engine order) where the cached mapping, the fallback mapping and the
    engine's held weights (after each failing path's refit) disagree; None when they all agree
    (:func:`refitcore.refitting.culprit.find_culprit` with the mappings and held weights this check kept)."""
    from refitcore.refitting.culprit import find_culprit as find

    return find(engine, weights, mappings={o.path: o.mapping for o in outcomes if o.mapping is not None},
                held={o.path: o.held for o in outcomes if o.held is not None})


def _backend_line(outcome: CheckOutcome) -> str:
    if outcome.backend == "reference":
        return ("backend: reference (a CPU interpreter of the TensorRT network; TensorRT's kernels were NOT "
                "exercised)")
    return f"backend: {outcome.backend}" + (f" ({outcome.note})" if outcome.note else "")


def _output_lines(outcome: CheckOutcome, p: PathOutcome) -> list[str]:
    lines = []
    v = p.verdict
    for s, sample in enumerate(v.checks):
        for c in sample:
            if c.ok:
                continue
            name = output_label(outcome, c)
            if c.detail:
                lines.append(f"  path {p.path!r}, sample {s}, output {c.index} ({name}): {c.detail}")
                continue
            lines.append(
                f"  path {p.path!r}, sample {s}, output {c.index} ({name}) shape {list(c.shape)}: "
                f"{c.mismatched} of {math.prod(c.shape)} elements mismatched"
                + (f", {c.nonfinite} non-finite" if c.nonfinite else ""))
            lines.append(f"      max abs err {c.max_abs:.4g} at {list(c.max_abs_at)}: engine {c.actual_at:.7g} vs "
                         f"eager {c.expected_at:.7g}; max rel err {c.max_rel:.4g}; norm-relative err {c.norm_rel:.3g}")
            lines.append(f"      tolerances rtol={c.rtol:g}, atol={c.atol:g} (atol scaled by max(1, max|eager|)); "
                         f"smallest that would pass: atol>={c.min_atol:.3g} (at this rtol) or "
                         f"rtol>={c.min_rtol:.3g} (at this atol)")
    return lines


def output_label(outcome: CheckOutcome, c) -> str:
    """An output's name in reports: its pytree path (``logits``, ``[0]['boxes']``), else the
    engine's output name (``output_0``) for a bare tensor."""
    return c.name or (outcome.output_names[c.index] if c.index < len(outcome.output_names) else str(c.index))


def failing_outputs(outcome: CheckOutcome, p: PathOutcome) -> list[str]:
    """The pytree paths of the outputs a path got wrong (any sample), in output order; empty for
    a model that returns one bare tensor (it has no path)."""
    names: list[str] = []
    for sample in (p.verdict.checks if p.verdict is not None else []):
        for c in sample:
            if not c.ok and c.name and c.name not in names:
                names.append(c.name)
    return names


def format_report(outcome: CheckOutcome) -> str:
    """The mismatch report (also fine to print for a passing check)."""
    from refitcore.refitting.render import culprit_lines, indented

    what = "sequence step" if outcome.kind == "sequence" else "check"
    step = f" (step {outcome.step})" if outcome.step is not None else ""
    lines = [f"trt-refit {what}{step} {'passed' if outcome.ok else 'FAILED'} for model {outcome.model!r}",
             f"  {_backend_line(outcome)}"]
    if outcome.compiler is not None:
        lines.append(f"  compiler: {outcome.compiler} (its own network and its own refit; every weight the refit "
                     f"sets is audited exactly against a fresh conversion, the witness)")
    lines.append(f"  weights: {outcome.weights}")
    for p in outcome.paths:
        if p.error is not None:
            lines.append(f"  path {p.path!r}: the refit did not go through: {p.error}".replace("\n", "\n      "))
        elif not p.ok:
            lines += _output_lines(outcome, p)
            if p.repeat_of is not None and p.repeat_diff:
                lines.append(f"  path {p.path!r}: these weights repeat step {p.repeat_of}, but the engine's "
                             f"outputs differ from that step's by up to {p.repeat_diff:.4g} (must be identical)")
        else:
            w = p.worst
            lines.append(f"  path {p.path!r}: ok (max abs err {w.max_abs:.3g})" if w is not None
                         else f"  path {p.path!r}: ok")
    if outcome.mapping_audit is not None and not outcome.mapping_audit.ok:
        lines.append(indented(outcome.mapping_audit))
    # A compiler's refit that did not go through names its weight in the error: no witness comparison to add.
    unmapped = outcome.compiler is not None and all(p.error is not None for p in outcome.paths if not p.ok)
    if outcome.culprit is not None or not (outcome.ok or unmapped):
        lines.append(indented(culprit_lines(outcome.culprit)))
    return "\n".join(lines)
