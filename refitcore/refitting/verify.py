"""Engine vs eager PyTorch: verdicts that say which output, where, and by how much."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from refitcore import dtypes
from refitcore.capture.eager import widen_in_forward
from refitcore.capture.structured import Inputs, flatten_with_names, split_call
from refitcore.options import DEFAULT_ATOL, DEFAULT_RTOL, check_tolerance, tolerances_for
from refitcore.progress import Silent, Ticker

__all__ = ["verify", "compare_outputs", "sample_tensors", "engine_tolerances", "precision_noise", "Verdict",
           "OutputCheck", "DEFAULT_RTOL", "DEFAULT_ATOL", "NOISE_FACTOR", "MAX_NOISE_ATOL"]

# A reduced-precision engine at its precision's default tolerances may differ from eager by up to this
# many times the model's own precision noise (eager in the engine's dtype vs eager in float32, measured
# per sample: :func:`precision_noise`), where that is more than the default atol. Two computations in
# the same reduced type, rounded at different places, differ by about sqrt(2) times what either
# differs from float32 (measured: 1.6x on a 16-layer bf16 Llama, docs/precision-tolerances.md).
NOISE_FACTOR = 2.0
# ... but never above this (atol's units: a fraction of max(1, max|eager|)): a model whose own rounding
# moves its outputs by more than half of that (a chaotic one) cannot have a mapping bug told apart from
# rounding at this precision: its verdict fails as unverifiable, saying so (verify it at fp32, or by the
# exact audit, cached vs fallback), rather than pass with a tolerance that passes anything.
MAX_NOISE_ATOL = 0.25


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """One output compared in float64. ``atol`` is scaled: ``atol * max(1, max|expected|)``.

    An element passes when ``|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|``
    (the allowed error); ``margin`` is the worst element's error over its allowed error (<= 1: every
    element passes; 0: exact; inf: an error where none is allowed, or a non-finite value)."""

    index: int
    shape: tuple[int, ...]
    mismatched: int
    max_abs: float
    max_abs_at: tuple[int, ...]
    actual_at: float
    expected_at: float
    max_rel: float
    norm_rel: float               # ||actual - expected|| / ||expected||
    rtol: float
    atol: float
    min_atol: float               # smallest atol (scaled units) that would have passed at this rtol
    min_rtol: float               # smallest rtol that would have passed at this atol
    nonfinite: int
    name: str = ""                # the output's pytree path: 'logits', "[0]['boxes']" ('' for a bare tensor)
    detail: str = ""              # a non-tensor output: what each side returned
    margin: float = 0.0           # max over elements of |actual - expected| / allowed error (<= 1 passes)

    @property
    def ok(self) -> bool:
        return self.mismatched == 0 and self.nonfinite == 0

    @property
    def label(self) -> str:
        return f"output {self.index}" + (f" ({self.name})" if self.name else "")

    def __str__(self) -> str:
        state = "ok" if self.ok else "MISMATCH"
        if self.detail:
            return f"{self.label}: {state}; {self.detail}"
        return (f"{self.label} {list(self.shape)}: {state}; {self.mismatched} of "
                f"{math.prod(self.shape)} elements outside tolerance, max abs err {self.max_abs:.3g} at "
                f"{list(self.max_abs_at)} (engine {self.actual_at:.6g} vs eager {self.expected_at:.6g}), "
                f"max rel err {self.max_rel:.3g}, norm-relative err {self.norm_rel:.3g}; rtol={self.rtol:g}, "
                f"atol={self.atol:g}; would pass with atol>={self.min_atol:.3g} or rtol>={self.min_rtol:.3g}"
                + (f"; {self.nonfinite} non-finite engine values" if self.nonfinite else ""))


def _compare_values(i: int, name: str, a, e) -> OutputCheck:
    """Non-tensor leaves (Python scalars, None, strings): equal or not."""
    same = (a == e) if not isinstance(a, float) or a == a else (e != e)
    detail = f"engine {a!r} vs eager {e!r}" + ("" if same else " (non-tensor outputs must be equal)")
    return OutputCheck(i, (), 0 if same else 1, 0.0 if same else float("inf"), (), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                       0.0, 0.0, 0, name=name, detail=detail, margin=0.0 if same else float("inf"))


def compare_outputs(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], *, rtol: float = DEFAULT_RTOL,
                    atol: float = DEFAULT_ATOL, names: Sequence[str] | None = None) -> list[OutputCheck]:
    """Compare flat output lists leaf by leaf (``names``: each leaf's pytree path, for the report)."""
    checks = []
    if len(actual) != len(expected):
        raise ValueError(f"engine gave {len(actual)} outputs, eager gave {len(expected)}")
    names = list(names) if names is not None else [""] * len(actual)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            checks.append(_compare_values(i, names[i], a, e))
            continue
        a64 = a.detach().to("cpu", torch.float64)
        e64 = e.detach().to("cpu", torch.float64)
        if a64.shape != e64.shape:
            raise ValueError(f"output {i}{' (' + names[i] + ')' if names[i] else ''}: engine shape "
                             f"{list(a64.shape)} vs eager {list(e64.shape)}")
        # Tolerances scale with eager's finite values. Where eager is not finite (a -inf mask fill, a
        # masked logit) nothing is allowed but the very same value: the same infinity is equal, anything
        # else (NaN included, on either side) is a mismatch.
        finite_e = torch.isfinite(e64)
        e_abs = torch.where(finite_e, e64.abs(), torch.zeros_like(e64))
        scale = max(1.0, float(e_abs.max()) if e64.numel() else 1.0)
        atol_eff = atol * scale
        same_inf = torch.isinf(a64) & (a64 == e64)
        nonfinite = int((~torch.isfinite(a64) & ~same_inf).sum())
        diff = torch.where(same_inf, torch.zeros_like(a64), (a64 - e64).abs())
        diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
        bound = torch.where(finite_e, atol_eff + rtol * e_abs, torch.zeros_like(e_abs))
        mismatched = int((diff > bound).sum())
        # diff / bound in the rule's own terms; an element equal to eager is 0 even where nothing is allowed
        margin = float(torch.where(diff == 0, 0.0, diff / bound).max()) if diff.numel() else 0.0
        flat = int(torch.argmax(torch.nan_to_num(diff, posinf=1e308)).item()) if diff.numel() else 0
        idx = (tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), a64.shape))
               if a64.numel() and a64.dim() else ())
        max_abs = float(diff.reshape(-1)[flat]) if diff.numel() else 0.0
        rel = torch.where(diff == 0, 0.0, diff / e_abs.clamp_min(1e-12))
        norm_e = float(torch.linalg.vector_norm(e_abs))
        norm_rel = float(torch.linalg.vector_norm(torch.nan_to_num(diff, posinf=1e308))) / max(norm_e, 1e-30)
        min_atol = float(((diff - rtol * e_abs).clamp_min(0) / scale).max()) if diff.numel() else 0.0
        # An element outside atol where eager is exactly 0 (or not finite) passes at no rtol: the minimum is inf.
        excess = (diff - atol_eff).clamp_min(0)
        need = torch.where(excess > 0, excess / e_abs, torch.zeros_like(excess))
        min_rtol = float(need.max()) if diff.numel() else 0.0
        checks.append(OutputCheck(i, tuple(a64.shape), mismatched, max_abs, idx,
                                  float(a64.reshape(-1)[flat]) if a64.numel() else 0.0,
                                  float(e64.reshape(-1)[flat]) if e64.numel() else 0.0,
                                  float(rel.max()) if rel.numel() else 0.0, norm_rel, rtol, atol, min_atol, min_rtol,
                                  nonfinite, name=names[i], margin=margin))
    return checks


@dataclasses.dataclass
class Verdict:
    """Truthy when every output of every sample matches; ``str()`` says where and by how much."""

    checks: list[list[OutputCheck]]       # [sample][output]
    backend: str = ""
    note: str = ""
    calibration: str = ""                 # how the model's own precision noise set the tolerance, if it did
    unverifiable: str = ""                # why no tolerance can tell a mapping bug from rounding here (fails)

    @property
    def ok(self) -> bool:
        return not self.unverifiable and all(c.ok for sample in self.checks for c in sample)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def worst(self) -> OutputCheck | None:
        allc = [c for sample in self.checks for c in sample]
        if not allc:
            return None
        return max(allc, key=lambda c: (not c.ok, c.max_abs / max(c.atol, 1e-30)))

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for s in self.checks for c in s), default=0.0)

    @property
    def margin(self) -> float:
        """The worst element's error over its allowed error, over every output and sample (<= 1: ok)."""
        return max((c.margin for s in self.checks for c in s), default=0.0)

    def __str__(self) -> str:
        lines = [f"verify ({self.backend or 'engine'} vs eager): {'OK' if self.ok else 'FAILED'} over "
                 f"{len(self.checks)} sample(s)"]
        n_checks = sum(len(sample) for sample in self.checks)
        if not self.ok and n_checks > 1:
            worst = self.worst
            s = next(i for i, sample in enumerate(self.checks) if any(c is worst for c in sample))
            lines.append(f"  worst: sample {s}, {worst}")
        for s, sample in enumerate(self.checks):
            for c in sample:
                if not c.ok or len(self.checks) == 1:
                    lines.append(f"  sample {s}, {c}")
        if self.ok and self.worst is not None and len(self.checks) > 1:
            lines.append(f"  worst: {self.worst}")
        if self.calibration:
            lines.append(f"  tolerance: {self.calibration}")
        if self.unverifiable:
            lines.append(f"  unverifiable: {self.unverifiable}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "backend": self.backend, "max_abs": self.max_abs, "calibration": self.calibration,
                "unverifiable": self.unverifiable,
                "checks": [[dataclasses.asdict(c) | {"ok": c.ok} for c in s] for s in self.checks]}


def _samples(inputs) -> list[tuple[tuple, dict]]:
    """inputs: one tensor, a tuple of positional inputs (one sample), a :class:`refitcore.Inputs`
    (positional and keyword), or a list of such samples; each as (args, kwargs)."""
    if isinstance(inputs, (torch.Tensor, tuple, Inputs)):
        return [split_call(inputs)]
    return [split_call(s if not isinstance(s, list) else tuple(s)) for s in inputs]


def sample_tensors(sample: Any) -> list[torch.Tensor]:
    """The tensors of one sample (a tuple of positional inputs or a :class:`refitcore.Inputs`), in
    flattening order: positional, then keyword inputs."""
    return [x for x in pytree.tree_leaves(split_call(sample)) if isinstance(x, torch.Tensor)]


def _leaves(out) -> tuple[list, list[str]]:
    leaves, names, _spec = flatten_with_names(out)
    return leaves, names


def precision_noise(reference_model: Any, args: tuple, kwargs: dict, expected: Sequence[Any],
                    engine_dtype: torch.dtype) -> tuple[float, str]:
    """How far the model's own arithmetic in the engine's reduced type is from float32 on one sample:
    ``(noise, what)``, noise = max over floating outputs of max|eager in one type - eager in the other|
    / max(1, max|expected|) (``atol``'s units), ``what`` naming the two types; ``(0.0, why)`` when it
    cannot be measured. ``expected``: the reference's own output leaves on this sample.

    The reference runs once more in the other type: a model whose floating parameters are all in
    ``engine_dtype`` in float32, a float32 model in ``engine_dtype``, each parameter cast by the module
    that owns it for the duration of its forward (:func:`refitcore.capture.eager.widen_in_forward`: one
    module's worth of memory), floating inputs cast too. Not measured for a model with hooks of its
    own, a graph module (its graph reads the parameters itself), parameters of several floating types,
    or a model that cannot run in the other type (said in ``why``)."""
    if not isinstance(reference_model, torch.nn.Module) or isinstance(reference_model, torch.fx.GraphModule):
        return 0.0, "the reference is not a plain module"
    if any(m._forward_pre_hooks or m._forward_hooks for m in reference_model.modules()):
        return 0.0, "the reference module has forward hooks of its own"
    params = {k: p for k, p in reference_model.named_parameters() if p.is_floating_point()}
    kinds = {p.dtype for p in params.values()}
    if len(kinds) != 1:
        return 0.0, f"the reference's floating parameters are of {len(kinds)} types"
    (own,) = kinds
    if own not in (engine_dtype, torch.float32):
        return 0.0, f"the reference computes in {own}"
    other = torch.float32 if own == engine_dtype else engine_dtype
    cast = pytree.tree_map(lambda x: x.to(other) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                           (args, kwargs))
    handles = widen_in_forward(reference_model, dict.fromkeys(params, other))
    try:
        with torch.no_grad():
            twin, _ = _leaves(reference_model(*cast[0], **cast[1]))
    except Exception as err:  # noqa: BLE001 - a model that cannot run in the other type: not measured
        return 0.0, f"the reference cannot run in {other}: {type(err).__name__}: {str(err)[:120]}"
    finally:
        for h in handles:
            h.remove()
    noise = 0.0
    for e, t in zip(expected, twin):
        if not (isinstance(e, torch.Tensor) and isinstance(t, torch.Tensor) and e.is_floating_point()
                and e.shape == t.shape and e.numel()):
            continue
        e64, t64 = e.detach().to(torch.float64), t.detach().to(torch.float64)
        both = torch.isfinite(e64) & torch.isfinite(t64)
        if not bool(both.any()):
            continue
        scale = max(1.0, float(e64[both].abs().max()))
        noise = max(noise, float((e64 - t64)[both].abs().max()) / scale)
    return noise, f"eager {str(own).replace('torch.', '')} vs eager {str(other).replace('torch.', '')}"


def engine_tolerances(engine, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    """(rtol, atol) of ``engine`` vs eager: each None is the default of the engine's precision
    (:func:`refitcore.options.tolerances_for` of ``engine.options.precision``), each given one is kept;
    both are then checked (:func:`refitcore.options.check_tolerance`: NaN, negative or infinite is a
    ``ValueError``). ``verify``, ``refit``, ``run_refit`` and ``MutableEngine`` resolve theirs here."""
    rtol, atol = tolerances_for(engine.options.precision, rtol, atol)
    return check_tolerance(rtol, "rtol"), check_tolerance(atol, "atol")


def verify(engine, reference_model, inputs, *, rtol: float | None = None, atol: float | None = None,
           progress: Any = None) -> Verdict:
    """Run ``engine`` and eager ``reference_model`` (eval mode) on each sample; never raises on a
    mismatch: returns a :class:`Verdict`. ``rtol``/``atol``: None (default) takes the engine precision's
    (:func:`engine_tolerances`); a tolerance that is NaN, negative or infinite is a ``ValueError``.
    ``progress``: told how many samples were compared when it takes long
    (:class:`refitcore.progress.Ticker`).

    A float16/bfloat16 engine held to its precision's default tolerances is also held to the model's
    own precision noise: on each sample the reference runs once more in the other type
    (:func:`precision_noise`), and the sample's atol becomes :data:`NOISE_FACTOR` times that noise
    where this is more than the default (a deep network in bfloat16 differs from itself in float32 by
    more than the default allows: 4% of its largest logit at 16 Llama layers). The verdict says so
    (``calibration``). Tolerances set to anything but the defaults are used as they are.

    Example::

        verdict = refitcore.verify(engine, model, [torch.randn(1, 3, 64, 64)])
        assert verdict, str(verdict)
    """
    rtol, atol = engine_tolerances(engine, rtol, atol)
    precision = engine.options.precision
    calibrate = precision in ("fp16", "bf16") and (rtol, atol) == tolerances_for(precision)
    raised: list[tuple[int, float, str]] = []
    unmeasured = ""
    if hasattr(reference_model, "eval"):
        # ExportedProgram.module() refuses eval(); it already runs the exported (eval-mode) graph
        with contextlib.suppress(NotImplementedError):
            reference_model.eval()
    checks: list[list[OutputCheck]] = []
    samples = list(_samples(inputs))
    tick = Ticker(progress or Silent(), "samples compared with eager", len(samples))
    with torch.no_grad():
        for args, kwargs in samples:
            expected, e_names = _leaves(reference_model(*args, **kwargs))
            actual, a_names = _leaves(engine(*args, **kwargs))
            if a_names != e_names and len(a_names) == len(e_names) and all(n.startswith("[") for n in a_names):
                a_names = e_names   # a flat engine (saved without its output structure): same order
            if a_names != e_names:
                raise ValueError(f"the engine's outputs {a_names} are not the eager model's {e_names}")
            sample_atol = atol
            if calibrate:
                noise, what = precision_noise(reference_model, args, kwargs, expected,
                                              dtypes.precision_dtype(precision))
                if noise == 0.0 and not unmeasured and "vs" not in what:
                    unmeasured = what
                if NOISE_FACTOR * noise > atol:
                    sample_atol = max(atol, min(NOISE_FACTOR * noise, MAX_NOISE_ATOL))
                    raised.append((len(checks), noise, what))
            checks.append(compare_outputs(actual, expected, rtol=rtol, atol=sample_atol, names=e_names))
            tick()
    calibration = unverifiable = ""
    if raised:
        worst = max(raised, key=lambda r: r[1])
        used = max(atol, min(NOISE_FACTOR * worst[1], MAX_NOISE_ATOL))
        calibration = (f"atol raised from the {precision} default {atol:g} to {NOISE_FACTOR:g}x the model's own "
                       f"precision noise on {len(raised)} of {len(checks)} sample(s) (largest: sample {worst[0]}, "
                       f"{worst[2]} differ by {worst[1]:.3g} x max(1, max|eager|), so atol {used:.3g})")
        if NOISE_FACTOR * worst[1] > MAX_NOISE_ATOL:
            calibration += f"; capped at {MAX_NOISE_ATOL:g}"
            unverifiable = (f"the model's own {precision} rounding moves its outputs by {worst[1]:.3g} x max(1, "
                            f"max|eager|) on sample {worst[0]} ({worst[2]}): more than half of {MAX_NOISE_ATOL:g}, "
                            f"so no tolerance tells a mapping bug from rounding at {precision}; verify this model at "
                            f"fp32, or by the exact audit (cached vs fallback: refit(..., audit=True), the gate's "
                            f"default paths)")
    elif calibrate and unmeasured:
        calibration = f"the {precision} defaults (the model's precision noise was not measured: {unmeasured})"
    return Verdict(checks, backend=engine.backend, note=engine.note, calibration=calibration,
                   unverifiable=unverifiable)
