"""Hypothesis strategies for refit checks: weight sets, perturbations, refit sequences and inputs.

Hypothesis draws only the *structure* of a weight set (a seed, a scale family, a few special values
aimed at named tensors) and torch materialises the tensors from it. Drawing a handful of integers
and choices keeps generation fast for real models and makes shrinking end at a small, readable
example such as ``state_dicts(seed=0, scale='fan_in', specials=[('bn.running_var', 'var_near_eps')])``
instead of thousands of floats.

Example::

    from hypothesis import given
    from pytest_trtrefit.strategies import state_dicts, refit_settings

    @refit_settings()
    @given(weights=state_dicts(MyNet()))
    def test_refit(trt_refit, weights):
        trt_refit.check(MyNet, weights, torch.randn(1, 3, 32, 32))

The same draw without Hypothesis (scripts, benchmarks, fixed test data) is :func:`weight_set`, the
one materializer every strategy here uses; :func:`perturb` moves an existing state_dict the way
:func:`perturbations` does::

    net = MyNet()
    net.load_state_dict(weight_set(net, seed=1, specials=[("bn.running_var", "var_near_eps")]))
    tuned = perturb(net.state_dict(), seed=2, magnitude=1e-2)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from hypothesis import settings, strategies as st
from refitcore.capture.structured import Inputs

__all__ = ["state_dicts", "perturbations", "refit_sequences", "inputs", "profile_shapes", "boundary_samples", "refit_settings", "weight_set", "perturb",
           "special_targets", "WeightSet",
           "InputSample", "InputCall", "WeightSequence", "SCALES", "SPECIALS", "PERTURBATIONS", "INPUT_FAMILIES", "LARGE",
           "TINY"]

SCALES = ("fan_in", "fan_in_uniform", "he", "unit")
DEFAULT_SCALES = ("fan_in", "fan_in_uniform", "he")   # 'unit' blows up deep nets: opt in
SPECIALS = ("zeros", "large", "tiny", "sign_flip", "negative_gamma", "var_near_eps", "zero_channels")
PERTURBATIONS = ("small_delta", "low_rank", "single_tensor")
INPUT_FAMILIES = ("normal", "uniform", "positive", "zeros", "large")
LARGE = 100.0      # "large" special: the tensor scaled up by this (outputs stay far from float32 overflow)
TINY = 1e-6        # "tiny" special: scaled down by this (well above float32 subnormals)
SEED_MAX = 2 ** 16 - 1


def refit_settings(**overrides) -> settings:
    """Hypothesis settings for refit property tests: the "trt-refit" profile that ``--trt-refit``
    registers (``--trt-refit-examples`` examples, no deadline), else the current profile with no
    deadline and at most 10 examples. Use as a decorator: ``@refit_settings()``."""
    try:
        base = settings.get_profile("trt-refit")
    except Exception:  # InvalidArgument: the plugin is not active in this process
        base = settings(settings.default, deadline=None, max_examples=min(10, settings.default.max_examples))
    return settings(base, **overrides)


# --------------------------------------------------------------------------------------------
# the layout of a model's state_dict
@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: Any
    role: str           # weight, bias, param, bn_weight, bn_bias, bn_mean, bn_var, bn_count, norm_weight,
                        # norm_bias, int, bool
    fan_in: int
    eps: float = 0.0
    original: Any = None  # the model's own tensor (integer/bool buffers keep their values)


@dataclasses.dataclass(frozen=True)
class _Layout:
    entries: tuple[_Entry, ...]
    tied: dict          # follower key -> leader key

    @property
    def leaders(self) -> list[_Entry]:
        return [e for e in self.entries if e.key not in self.tied]

    def special_targets(self, specials: Sequence[str]) -> list[tuple[str, str]]:
        pairs = []
        for e in self.leaders:
            for kind in specials:
                if _applies(kind, e):
                    pairs.append((e.key, kind))
        return pairs


def _applies(kind: str, e: _Entry) -> bool:
    if not e.dtype.is_floating_point or not math.prod(e.shape or (1,)):
        return False
    if kind == "negative_gamma":
        return e.role == "bn_weight"
    if kind == "var_near_eps":
        return e.role == "bn_var"
    if e.role in ("bn_var",):
        return False          # a variance must stay >= 0; var_near_eps is its special
    if kind == "zero_channels":
        return e.role == "weight"
    return kind in ("zeros", "large", "tiny", "sign_flip")


def _fan_in(shape: tuple[int, ...], module=None) -> int:
    if len(shape) >= 2:
        return max(1, math.prod(shape[1:]))
    w = getattr(module, "weight", None) if module is not None else None
    if w is not None and getattr(w, "dim", lambda: 0)() >= 2:
        return max(1, math.prod(w.shape[1:]))
    return max(1, shape[-1] if shape else 1)


def _layout(model) -> _Layout:
    import torch
    from torch import nn

    if not isinstance(model, nn.Module):
        if callable(model):
            model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"state_dicts(model): expected an nn.Module or a callable returning one, "
                            f"got {type(model).__name__}")
    owners: dict[str, tuple[nn.Module, str]] = {}
    for path, m in model.named_modules():
        for local, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            owners[f"{path}.{local}" if path else local] = (m, local)
    entries, tied, seen = [], {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[key] = seen[id(t)]
        else:
            seen[id(t)] = key
        m, local = owners.get(key, (None, key.rsplit(".", 1)[-1]))
        shape = tuple(t.shape)
        eps = float(getattr(m, "eps", 0.0) or 0.0)
        if not t.dtype.is_floating_point:
            role = "bn_count" if local == "num_batches_tracked" else ("bool" if t.dtype == torch.bool else "int")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            role = {"weight": "bn_weight", "bias": "bn_bias", "running_mean": "bn_mean",
                    "running_var": "bn_var"}.get(local, "param")
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("Norm"):
            role = {"weight": "norm_weight", "bias": "norm_bias"}.get(local, "param")
        elif local == "bias" and len(shape) == 1:
            role = "bias"
        elif len(shape) >= 2:
            role = "weight"
        else:
            role = "param"
        entries.append(_Entry(key, shape, t.dtype, role, _fan_in(shape, m), eps,
                              t.detach().clone() if role in ("int", "bool", "bn_count") else None))
    return _Layout(tuple(entries), tied)


def _std(scale: str, fan_in: int) -> float:
    if scale == "fan_in":
        return 1.0 / math.sqrt(fan_in)
    if scale == "fan_in_uniform":
        return 1.0 / math.sqrt(fan_in)          # uniform +-sqrt(3/fan_in): the same variance
    if scale == "he":
        return math.sqrt(2.0 / fan_in)
    if scale == "unit":
        return 1.0
    raise ValueError(f"unknown scale family {scale!r}; choose from {SCALES}")


def _materialize(layout: _Layout, seed: int, scale: str, specials: Sequence[tuple[str, str]], *,
                 gain: float = 1.0, keep_integers: bool = False) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, dtype):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(dtype)

    def draw(e: _Entry):
        if e.role == "bn_count":
            drawn = torch.randint(0, 1000, e.shape, generator=g, dtype=e.dtype)  # drawn either way: same stream
            return e.original.clone() if keep_integers else drawn
        if e.role in ("int", "bool"):
            return e.original.clone()
        if e.role == "weight" or e.role == "param":
            std = _std(scale, e.fan_in) * gain
            if scale == "fan_in_uniform":
                return ((torch.rand(e.shape, generator=g, dtype=torch.float64) * 2 - 1) * std * math.sqrt(3)).to(e.dtype)
            return normal(e.shape, std, e.dtype)
        if e.role == "bias":
            bound = gain / math.sqrt(e.fan_in)
            return ((torch.rand(e.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(e.dtype)
        if e.role == "bn_weight":
            return (1 + normal(e.shape, 0.2, torch.float64)).to(e.dtype)
        if e.role in ("bn_bias", "norm_bias"):
            return normal(e.shape, 0.2 if e.role == "bn_bias" else 0.1, e.dtype)
        if e.role == "bn_mean":
            return normal(e.shape, 0.5, e.dtype)
        if e.role == "bn_var":
            return (torch.rand(e.shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(e.dtype)
        if e.role == "norm_weight":
            return (1 + normal(e.shape, 0.1, torch.float64)).to(e.dtype)
        raise AssertionError(f"unhandled role {e.role}")

    out: dict = {}
    by_key = {e.key: e for e in layout.entries}
    for e in layout.entries:
        if e.key not in layout.tied:
            out[e.key] = draw(e)
    for key, kind in specials:
        e, t = by_key[key], out[key]
        if kind == "zeros":
            t = torch.zeros_like(t)
        elif kind == "large":
            t = t * LARGE
        elif kind == "tiny":
            t = t * TINY
        elif kind == "sign_flip":
            t = -t
        elif kind == "negative_gamma":
            t = -(t.abs())
        elif kind == "var_near_eps":
            eps = e.eps or 1e-5
            t = (torch.rand(e.shape, generator=g, dtype=torch.float64) * 2 * eps).to(e.dtype)
        elif kind == "zero_channels":   # about 30% of the output channels (at least one) all zero
            rows = torch.rand(e.shape[0], generator=g) < 0.3
            rows[int(torch.randint(0, e.shape[0], (), generator=g))] = True
            t = t.clone()
            t[rows] = 0
        else:
            raise ValueError(f"unknown special {kind!r}; choose from {SPECIALS}")
        out[key] = t
    for follower, leader in layout.tied.items():
        out[follower] = out[leader]          # tied parameters: one tensor, identical values
    return {e.key: out[e.key] for e in layout.entries}


class _Described:
    """Printed (also by Hypothesis's pretty printer) as the recipe that made it, not its tensors."""

    description: str

    def describe(self) -> str:
        return self.description

    def __repr__(self) -> str:
        return self.description

    def _repr_pretty_(self, p, cycle) -> None:   # Hypothesis's printer
        p.text(self.description)


class WeightSet(_Described, dict):
    """A generated state_dict; its repr is the recipe that made it, not its tensors."""

    def __init__(self, tensors: dict, description: str, **meta):
        super().__init__(tensors)
        self.description = description
        self.meta = meta


def special_targets(model, kinds: Sequence[str] = SPECIALS) -> list[tuple[str, str]]:
    """Every ``(state_dict key, special)`` pair that :func:`weight_set` and :func:`state_dicts` may
    apply to ``model`` (followers of tied parameters are never targets: their leader is)."""
    bad = [k for k in kinds if k not in SPECIALS]
    if bad:
        raise ValueError(f"kinds={list(kinds)!r}: unknown {bad}; choose from {SPECIALS}")
    return _layout(model).special_targets(kinds)


def weight_set(model, *, seed: int = 0, scale: str = "fan_in", gain: float = 1.0,
               specials: Sequence[tuple[str, str]] = (), keep_integers: bool = False) -> WeightSet:
    """One random state_dict for ``model``'s architecture (an ``nn.Module`` or a callable returning
    one): the draw :func:`state_dicts` makes for this seed, scale family and specials.

    Weights are drawn from the ``scale`` family (:data:`SCALES`: ``fan_in`` normal with std
    1/sqrt(fan_in), ``fan_in_uniform`` with the same variance, ``he`` with std sqrt(2/fan_in),
    ``unit``), biases uniform in +-1/sqrt(fan_in); ``gain`` multiplies both (``gain=1e-3`` for tiny
    activations, ``gain=8`` for large ones). BatchNorm statistics stay valid (variance >= 0),
    normalisation weights stay near 1, tied parameters share one tensor. ``specials`` are
    ``(key, kind)`` pairs from :func:`special_targets` (kinds in :data:`SPECIALS`), applied in order.
    ``num_batches_tracked`` is drawn at random unless ``keep_integers``, which keeps the model's own;
    other integer and bool buffers always keep the model's values.

    Example::

        net = torchvision.models.resnet18()
        w = weight_set(net, seed=3, scale="he", specials=[("bn1.running_var", "var_near_eps")])
        net.load_state_dict(w)      # w is a plain state_dict (a dict subclass printed as its recipe)
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {SCALES}")
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain={gain!r}: give a finite number > 0")
    layout = _layout(model)
    specials = [tuple(s) for s in specials]
    allowed = set(layout.special_targets(SPECIALS))
    bad = [s for s in specials if s not in allowed]
    if bad:
        raise ValueError(f"specials={bad!r}: not applicable to this model; see special_targets(model)")
    text = f"weight_set(seed={seed}, scale={scale!r}" + (f", gain={gain:g}" if gain != 1.0 else "") + \
        f", specials={specials!r})"
    return WeightSet(_materialize(layout, seed, scale, specials, gain=gain, keep_integers=keep_integers), text,
                     seed=seed, scale=scale, gain=gain, specials=specials)


def state_dicts(model, *, scales: Sequence[str] = DEFAULT_SCALES, specials: Sequence[str] = SPECIALS,
                max_specials: int = 3) -> st.SearchStrategy[WeightSet]:
    """Random weight sets for ``model``'s architecture (an ``nn.Module`` or a callable returning one).

    Draws a seed, a scale family (``scales``, fan-in scaled by default so deep nets stay finite) and up
    to ``max_specials`` special values aimed at named tensors: ``zeros``, ``large`` (x100), ``tiny``
    (x1e-6), ``sign_flip``, ``negative_gamma`` (BatchNorm), ``var_near_eps`` (BatchNorm running_var
    in [0, 2*eps]). BatchNorm statistics stay valid (variance >= 0), ``num_batches_tracked`` and other
    integer buffers stay integers, tied parameters get identical values. Shrinks towards seed 0, the
    first scale family and no specials.

    Example::

        @given(weights=state_dicts(torchvision.models.resnet18()))
        def test_resnet(trt_refit, weights): ...
    """
    bad = [s for s in scales if s not in SCALES]
    if bad or not scales:
        raise ValueError(f"scales={list(scales)!r}: choose one or more of {SCALES}")
    bad = [s for s in specials if s not in SPECIALS]
    if bad:
        raise ValueError(f"specials={list(specials)!r}: unknown {bad}; choose from {SPECIALS}")
    if max_specials < 0:
        raise ValueError(f"max_specials={max_specials}: give a number >= 0")
    layout = _layout(model)
    targets = layout.special_targets(specials)

    @st.composite
    def _draw(draw) -> WeightSet:
        seed = draw(st.integers(0, SEED_MAX))
        scale = draw(st.sampled_from(tuple(scales)))
        # Fixed slots, each empty or one special: every slot shrinks to empty on its own, so a
        # failing example ends with only the specials it needs.
        slots = [draw(st.none() | st.sampled_from(targets)) for _ in range(max_specials)] if targets else []
        chosen = list(dict.fromkeys(s for s in slots if s is not None))
        text = f"state_dicts(seed={seed}, scale={scale!r}, specials={chosen!r})"
        return WeightSet(_materialize(layout, seed, scale, chosen), text, seed=seed, scale=scale, specials=chosen)

    return _draw()


# --------------------------------------------------------------------------------------------
# perturbations of a given weight set
def _groups(state: dict) -> list[list[str]]:
    """Keys that hold one tensor (same storage, shape and strides) are perturbed together."""
    groups: dict = {}
    for k, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else ("empty", k)
        groups.setdefault(ident, []).append(k)
    return list(groups.values())


def _is_var(key: str) -> bool:
    return key.endswith("running_var")


def _perturb(state: dict, kind: str, key: str | None, magnitude: float, rank: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    groups = _groups(state)
    leader_of = {k: grp[0] for grp in groups for k in grp}

    def scale_of(t):
        s = float(t.double().abs().mean()) if t.numel() else 0.0
        return s if s > 0 else 1.0

    def changed(k, t):
        t64 = t.double()
        if kind == "small_delta":
            if _is_var(k):
                return (t64 * torch.exp(magnitude * torch.randn(t.shape, generator=g, dtype=torch.float64))).to(t.dtype)
            return (t64 + magnitude * scale_of(t) * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)
        if kind == "low_rank":
            rows = t.shape[0]
            cols = t.numel() // rows
            a = torch.randn(rows, rank, generator=g, dtype=torch.float64)
            b = torch.randn(rank, cols, generator=g, dtype=torch.float64)
            delta = (a @ b) / math.sqrt(rank) * magnitude * scale_of(t)
            return (t64 + delta.reshape(t.shape)).to(t.dtype)
        # single_tensor: a fresh tensor of the same size and scale
        if _is_var(k):
            return (torch.rand(t.shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(t.dtype)
        return (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale_of(t)).to(t.dtype)

    with torch.no_grad():
        for grp in groups:
            lead = grp[0]
            t = state[lead]
            if not t.dtype.is_floating_point or t.numel() == 0:
                continue
            if kind != "small_delta" and leader_of.get(key) != lead:
                continue
            new = changed(lead, t)
            for k in grp:
                out[k] = new
    return out


def perturb(state_dict: dict, *, seed: int = 0, kind: str = "small_delta", magnitude: float = 1e-2,
            key: str | None = None, rank: int = 1) -> dict:
    """``state_dict`` moved once the way :func:`perturbations` moves it (a fine-tuned checkpoint):
    ``small_delta`` moves every float tensor by ``magnitude`` of its mean magnitude (variances
    multiplicatively); ``low_rank`` and ``single_tensor`` change ``key`` only. Tied tensors move
    together; integer buffers never change.

    Example::

        tuned = perturb(model.state_dict(), seed=1, magnitude=1e-2)
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"kind={kind!r}: choose one of {PERTURBATIONS}")
    if kind != "small_delta" and key not in state_dict:
        raise ValueError(f"kind={kind!r} changes one tensor: give key=, one of the state_dict's keys")
    return _perturb(state_dict, kind, key, magnitude, rank, seed)


def perturbations(state_dict: dict, *, kinds: Sequence[str] = PERTURBATIONS,
                  magnitudes: Sequence[float] = (1e-2, 1e-3, 1e-1)) -> st.SearchStrategy[WeightSet]:
    """New weight sets near ``state_dict``, the way fine-tuning moves weights: ``small_delta`` (every
    float tensor moved by ``magnitude`` of its mean magnitude; variances multiplicatively, so they
    stay positive), ``low_rank`` (a LoRA-style rank-1 or rank-2 update of one weight matrix or
    kernel), ``single_tensor`` (one tensor replaced, the rest unchanged). Tied tensors move together;
    integer buffers never change.

    Example::

        @given(data=st.data())
        def test_finetune(trt_refit, data):
            base = data.draw(state_dicts(net))
            trt_refit.check(net, data.draw(perturbations(base)), x)
    """
    bad = [k for k in kinds if k not in PERTURBATIONS]
    if bad or not kinds:
        raise ValueError(f"kinds={list(kinds)!r}: choose one or more of {PERTURBATIONS}")
    import torch

    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise TypeError("perturbations(state_dict): expected a dict of tensors (e.g. model.state_dict())")
    floats = [grp[0] for grp in _groups(state_dict)
              if state_dict[grp[0]].dtype.is_floating_point and state_dict[grp[0]].numel()]
    matrices = [k for k in floats if state_dict[k].dim() >= 2 and not _is_var(k)]
    base = state_dict.describe() if hasattr(state_dict, "describe") else f"a state_dict of {len(state_dict)} tensors"
    usable = tuple(k for k in kinds if k != "low_rank" or matrices)
    if not floats or not usable:
        raise ValueError("perturbations: the state_dict has no floating-point tensors to perturb")

    @st.composite
    def _draw(draw) -> WeightSet:
        kind = draw(st.sampled_from(usable))
        magnitude = draw(st.sampled_from(tuple(magnitudes)))
        seed = draw(st.integers(0, SEED_MAX))
        key, rank = None, 1
        if kind == "low_rank":
            key = draw(st.sampled_from(matrices))
            rank = draw(st.integers(1, 2))
        elif kind == "single_tensor":
            key = draw(st.sampled_from(floats))
        detail = ", ".join(p for p in (f"kind={kind!r}", f"key={key!r}" if key else "",
                                       f"rank={rank}" if kind == "low_rank" else "",
                                       f"magnitude={magnitude:g}" if kind != "single_tensor" else "",
                                       f"seed={seed}") if p)
        return WeightSet(_perturb(state_dict, kind, key, magnitude, rank, seed),
                         f"perturbations({detail}) of {base}", kind=kind, key=key, seed=seed)

    return _draw()


# --------------------------------------------------------------------------------------------
# sequences of checkpoints
class WeightSequence(_Described, list):
    """Weight sets to refit one after another; its repr names the steps (``A``, ``B``, ``A again``)."""

    def __init__(self, steps: list, labels: list[str], description: str):
        super().__init__(steps)
        self.labels = labels
        self.description = description


def refit_sequences(model, *, min_size: int = 2, max_size: int = 4, end_with_first: bool = True,
                    **state_dict_options) -> st.SearchStrategy[WeightSequence]:
    """Several checkpoints in a row for one engine: fresh weight sets, perturbations of the previous
    step and repeats of an earlier step. With ``end_with_first`` (default) the sequence returns to its
    first weight set at the end, so A -> ... -> A must reproduce A's outputs exactly."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"min_size={min_size}, max_size={max_size}: need 1 <= min_size <= max_size")
    fresh = state_dicts(model, **state_dict_options)

    @st.composite
    def _draw(draw) -> WeightSequence:
        steps, names, text = [draw(fresh)], ["A"], []
        text.append(f"A={steps[0].describe()}")
        n = draw(st.integers(min_size, max_size)) - (1 if end_with_first else 0)
        for _ in range(1, max(1, n)):
            move = draw(st.sampled_from(("perturb", "fresh", "repeat")))
            if move == "repeat":
                j = draw(st.integers(0, len(steps) - 1))
                steps.append(steps[j])
                names.append(names[j])
                text.append(f"{names[j]} again")
                continue
            new = draw(perturbations(steps[-1])) if move == "perturb" else draw(fresh)
            name = chr(ord("A") + len(set(names)))
            if move == "perturb":
                new = WeightSet(new, f"{new.describe().split(' of ')[0]} of {names[-1]}")
            steps.append(new)
            names.append(name)
            text.append(f"{name}={new.describe()}")
        if end_with_first:
            steps.append(steps[0])
            names.append("A")
            text.append("A again")
        return WeightSequence(steps, names, "refit_sequences([" + ", ".join(text) + "])")

    return _draw()


# --------------------------------------------------------------------------------------------
# inputs
class InputSample(_Described, tuple):
    """A tuple of input tensors; its repr is the recipe that made it."""

    def __new__(cls, tensors, description: str):
        obj = super().__new__(cls, tensors)
        obj.description = description
        return obj


class InputCall(_Described, Inputs):
    """One drawn call with keyword inputs (a :class:`refitcore.Inputs`); its repr is the recipe."""

    def __init__(self, args, kwargs, description: str):
        super().__init__(*args, **kwargs)
        self.description = description


def _int_range(t) -> tuple[int, int] | None:
    """The observed [min, max] of an integer example tensor (None when it has no elements)."""
    if t.numel() == 0:
        return None
    return int(t.min()), int(t.max())


def _specs(spec) -> list[tuple[tuple[int, ...], Any, Any]]:
    """(shape, dtype, example) per input: the example tensor, or None for a bare shape."""
    import torch

    def one(s):
        if isinstance(s, torch.Tensor):
            return tuple(s.shape), s.dtype, s
        if isinstance(s, torch.Size) or (isinstance(s, (tuple, list)) and all(isinstance(d, int) for d in s)):
            return tuple(int(d) for d in s), torch.float32, None
        raise TypeError(f"inputs(spec): expected a tensor or a shape, got {s!r}")

    if isinstance(spec, torch.Tensor) or isinstance(spec, torch.Size) or (
            isinstance(spec, (tuple, list)) and all(isinstance(d, int) for d in spec)):
        return [one(spec)]
    return [one(s) for s in spec]


def _input_tensors(specs, shapes, seed: int, family: str, int_high: int | None) -> list:
    """Float inputs drawn from ``family``; integer inputs in [0, int_high) when given, else inside the
    example tensor's observed [min, max] (kept when that cannot be known: no elements); bool
    example tensors kept at their shape (masks), drawn in {False, True} at other shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for (_, dtype, example), shape in zip(specs, shapes):
        if dtype == torch.bool:
            same = example is not None and tuple(example.shape) == tuple(shape)
            out.append(example.clone() if same else torch.randint(0, 2, shape, generator=g).bool())
        elif not dtype.is_floating_point and not dtype.is_complex:
            lo_hi = (0, int_high - 1) if int_high is not None else (
                _int_range(example) if example is not None else (0, 1))
            if lo_hi is None:   # an empty example: nothing to learn the range from
                out.append(example.clone() if tuple(example.shape) == tuple(shape) else torch.zeros(shape, dtype=dtype))
            else:
                out.append(torch.randint(lo_hi[0], lo_hi[1] + 1, shape, generator=g, dtype=dtype))
        elif family == "normal":
            out.append(torch.randn(shape, generator=g).to(dtype))
        elif family == "uniform":
            out.append((torch.rand(shape, generator=g) * 2 - 1).to(dtype))
        elif family == "positive":
            out.append(torch.rand(shape, generator=g).to(dtype))
        elif family == "zeros":
            out.append(torch.zeros(shape, dtype=dtype))
        else:
            out.append((torch.randn(shape, generator=g) * LARGE).to(dtype))
    return out


def _structured(spec) -> bool:
    """True for a sample that is not a flat list of tensors/shapes: a ``refitcore.Inputs``, or a
    sequence holding None, Python scalars, dicts or nested containers."""
    import torch

    if isinstance(spec, Inputs):
        return True
    if isinstance(spec, (torch.Tensor, torch.Size)) or not isinstance(spec, (tuple, list)):
        return False
    if all(isinstance(d, int) and not isinstance(d, bool) for d in spec):
        return False   # one shape
    return not all(isinstance(s, (torch.Tensor, torch.Size)) or (
        isinstance(s, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, bool) for d in s))
        for s in spec)


def _structured_inputs(spec, families, int_high) -> st.SearchStrategy:
    """Samples shaped like a structured example (:func:`inputs`): tensors redrawn leaf by leaf,
    every other leaf (None, bool, numbers, strings) kept; the same container types come back."""
    import torch
    import torch.utils._pytree as pytree

    call = spec if isinstance(spec, Inputs) else None
    tree = (call.args, call.kwargs) if call is not None else tuple(spec)
    leaves, treespec = pytree.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not where:
        raise ValueError(f"inputs(spec): the example {spec!r} holds no tensor to draw")
    specs = [(tuple(leaves[i].shape), leaves[i].dtype, leaves[i]) for i in where]

    def make(seed: int, family: str):
        drawn = _input_tensors(specs, [s for s, _, _ in specs], seed, family, int_high)
        new = list(leaves)
        for i, t in zip(where, drawn):
            new[i] = t
        text = f"inputs(seed={seed}, family={family!r})"
        out = pytree.tree_unflatten(new, treespec)
        return InputCall(out[0], out[1], text) if call is not None else InputSample(out, text)

    return st.builds(make, st.integers(0, SEED_MAX), st.sampled_from(tuple(families)))


def _profile(spec_tensors, profiles):
    """``profiles`` as a :class:`refitcore.capture.shapes.ShapeProfiles` (given one, or a ``dynamic_shapes``
    spec keyed by input index over the example tensors)."""
    from refitcore.capture.shapes import ShapeProfiles, resolve_dynamic_shapes

    if profiles is None or isinstance(profiles, ShapeProfiles):
        return profiles
    import torch

    return resolve_dynamic_shapes(torch.nn.Module(), spec_tensors, profiles)[1]


def profile_shapes(profiles) -> st.SearchStrategy[list]:
    """Input shapes inside an engine's optimization profiles (``engine.io.profiles``): a profile's
    min, opt or max (drawn first, and where shrinking ends), or sizes drawn inside its ranges;
    dimensions that share a name get one size."""
    from refitcore.capture.shapes import draw_shapes

    corners = []
    for p in range(len(profiles.profiles)):
        for shapes in (profiles.min_shapes(p), profiles.opt_shapes(p), profiles.max_shapes(p)):
            if shapes not in corners:
                corners.append(shapes)

    @st.composite
    def inside(draw):
        p = draw(st.integers(0, len(profiles.profiles) - 1))
        return draw_shapes(profiles, lambda lo, hi: draw(st.integers(lo, hi)), profile=p)

    return st.one_of(st.sampled_from(corners), inside())


def boundary_samples(spec, profiles, *, seed: int = 0, int_high: int | None = None) -> list:
    """Samples at every profile's min and max shapes (normal values from ``seed``): a property test
    checks them in every example, next to the example input (opt) and a drawn shape."""
    import torch

    tensors = [spec] if isinstance(spec, torch.Tensor) else list(spec)
    profiles = _profile(tensors, profiles)
    specs = _specs(tensors)
    out, seen = [], []
    for p in range(len(profiles.profiles)):
        for shapes in (profiles.min_shapes(p), profiles.max_shapes(p)):
            if shapes in seen:
                continue
            seen.append(shapes)
            out.append(InputSample(_input_tensors(specs, shapes, seed, "normal", int_high),
                                   f"inputs(seed={seed}, family='normal', shapes={[list(s) for s in shapes]})"))
    return out


def inputs(spec, *, families: Sequence[str] = INPUT_FAMILIES, int_high: int | None = None,
           profiles=None) -> st.SearchStrategy[InputSample]:
    """Input samples shaped like ``spec``: a tensor, a shape, or a sequence of them (one per model
    input), or a structured example: a ``refitcore.Inputs`` (positional and keyword inputs) or a
    tuple holding ``None``, Python scalars, dicts or lists beside its tensors. Draws a seed and a
    value family (``normal``, ``uniform`` in [-1, 1], ``positive`` in [0, 1], ``zeros``, ``large``
    (normal x100)) for floating-point tensors. Integer tensors (token ids) are drawn inside the
    example tensor's observed ``[min, max]`` (kept when it has no elements; ``[0, 2)`` for a bare
    shape), or in ``[0, int_high)`` when ``int_high`` is given; bool tensors (masks), ``None`` and
    Python scalars are kept. A structured example gives samples of the same structure
    (:class:`InputCall`, a ``refitcore.Inputs``, for an ``Inputs``), checked at the example's shapes.

    ``profiles``: an engine's shape ranges (``engine.io.profiles``, or a ``dynamic_shapes`` spec keyed
    by input index): each sample then has shapes drawn inside them (:func:`profile_shapes`: min,
    opt, max or sizes in between)."""
    bad = [f for f in families if f not in INPUT_FAMILIES]
    if bad or not families:
        raise ValueError(f"families={list(families)!r}: choose one or more of {INPUT_FAMILIES}")
    if _structured(spec):
        if profiles is not None:
            raise ValueError("inputs(spec, profiles=...): shape ranges need positional tensor inputs (as "
                             "refitcore.compile's dynamic_shapes do); give a tensor or a tuple of tensors")
        return _structured_inputs(spec, families, int_high)
    specs = _specs(spec)
    if profiles is not None:
        import torch

        tensors = [spec] if isinstance(spec, torch.Tensor) else list(spec)
        profiles = _profile([t if isinstance(t, torch.Tensor) else torch.zeros(t) for t in tensors], profiles)
    shape_st = st.just([s for s, _, _ in specs]) if profiles is None else profile_shapes(profiles)

    def make(seed: int, family: str, shapes) -> InputSample:
        out = _input_tensors(specs, shapes, seed, family, int_high)
        return InputSample(out, f"inputs(seed={seed}, family={family!r}, shapes={[list(s) for s in shapes]})")

    return st.builds(make, st.integers(0, SEED_MAX), st.sampled_from(tuple(families)), shape_st)
