"""Checks that must pass before an engine is touched.

A refit that changes the engine and then raises leaves the caller with an engine holding weights
nobody verified. Everything that can fail is therefore checked first: the new weights' values
(:func:`variance_problems`, :func:`nonfinite_weight_problems`: the state_dict key behind a value
the engine would get as NaN/Inf; :func:`precision_problems`: a value the engine's dtype cannot
hold, such as a float16 overflow), the verification inputs against the engine's input spec
(:func:`check_samples`) and the state_dict the eager reference model will load (:func:`eager_weights`).
"""
from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from refitcore import dtypes
from refitcore.capture.eager import EagerModelError, eager_model
from refitcore.capture.structured import sample_list
from refitcore.conversion.weight_map import WeightMap, operand_constants

__all__ = ["finite_views", "check_samples", "eager_weights", "eager_reference", "variance_problems",
           "nonfinite_key_problems", "nonfinite_weight_problems", "precision_problems", "FLUSH_ULPS", "all_finite",
           "BN_RECIPES"]

# Recipes that divide by sqrt(var + eps) (see recipes.bn_factor).
BN_RECIPES = ("bn_fold_kernel", "bn_fold_bias", "bn_scale", "bn_shift")


def _first_bad(t: torch.Tensor, bad: torch.Tensor) -> tuple[list[int], float]:
    """Index (plain ints) and value (a plain float) of the first True of ``bad``."""
    idx = [int(i) for i in torch.nonzero(bad)[0]] if t.dim() else []
    return idx, float(t[tuple(idx)] if idx else t)


def _consumers(weight_map: WeightMap, key: str) -> str:
    names = weight_map.consumers(key)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def all_finite(t: torch.Tensor | np.ndarray) -> bool:
    """Whether every element of a tensor or array is finite (a bfloat16 engine weight: pass it as a
    tensor, ``dtypes.as_torch(arr)``; its ``uint16`` bit patterns are integers to NumPy)."""
    # float32/float64: one BLAS dot product (several times faster than a sum, and than
    # isfinite(t).all(), which allocates a mask): a finite result means every element is finite; a
    # non-finite one (NaN/Inf, or values beyond ~1e19 whose squares overflow) is settled element-wise.
    # float16/bfloat16 (no fast dot product on the CPU: bfloat16's is 40x slower than float32's): the
    # smallest and largest value, one pass without a mask (aminmax and NumPy's min/max propagate NaN;
    # an infinity is the min or the max): 12x faster than isfinite(t).all() at 45M bfloat16 values.
    if isinstance(t, np.ndarray):
        if t.dtype in (np.float32, np.float64) and t.flags.c_contiguous:
            flat = t.reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):   # large finite values: settled below
                if np.isfinite(np.dot(flat, flat)):
                    return True
        elif t.dtype == np.float16 and t.size:
            return bool(np.isfinite(t.min()) and np.isfinite(t.max()))
        return bool(np.isfinite(t).all())
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat_t = t.reshape(-1)
        if bool(torch.isfinite(torch.dot(flat_t, flat_t))):
            return True
    elif t.dtype in (torch.float16, torch.bfloat16) and t.numel():
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    return bool(torch.isfinite(t).all())


def finite_views(mapping: Mapping[str, Any], checked: Mapping[str, torch.Tensor], keys: Sequence[str]) -> set[str]:
    """Names of the arrays of ``mapping`` that lie wholly inside the memory of a key of ``checked``
    (one of ``keys``: keys validation found finite), contiguous and read as the key's own element type
    (bfloat16 as its ``uint16`` bit patterns), at an element boundary: their values are that key's, so
    a second finiteness pass over them would find nothing new. A fallback's copy-recipe weights of a
    checkpoint the refit owns are such views (:func:`refitcore.conversion.network_reader.network_weights`);
    folds, transposes and casts are new arrays and are not in the set."""
    spans: list[tuple[int, int, np.dtype]] = []
    for key in set(keys):
        t = checked.get(key)
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.is_contiguous() and t.device.type == "cpu"):
            continue
        stored = dtypes.numpy_dtype(dtypes.trt_name(t.dtype, ""))   # as the engine stores it (bfloat16: uint16)
        if stored is not None:
            start = t.data_ptr()
            spans.append((start, start + t.numel() * t.element_size(), stored))
    spans.sort()
    starts = [s[0] for s in spans]
    out = set()
    for name, arr in mapping.items():
        if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous or not arr.size:
            continue
        low = arr.__array_interface__["data"][0]
        i = bisect.bisect_right(starts, low) - 1
        if i < 0:
            continue
        start, end, dtype = spans[i]
        if arr.dtype == dtype and low + arr.nbytes <= end and (low - start) % dtype.itemsize == 0:
            out.add(name)
    return out


def nonfinite_key_problems(weight_map: WeightMap, state: Mapping[str, torch.Tensor], *,
                           every_key: bool = False, ranges: dict[str, tuple[float, float]] | None = None
                           ) -> list[str]:
    """Every floating-point key the engine reads (``every_key``: every one of ``state``) that holds
    NaN/Inf: the key, how many (NaN and Inf apart), the first bad index and value (plain numbers) and
    the engine weights it feeds. One pass over the weights. ``ranges``: filled with the smallest and
    largest value of each finite float16/bfloat16 key (the pass finds them anyway)."""
    problems = []
    for key in (state if every_key else weight_map.keys_used):
        t = state.get(key)
        if t is None or not t.is_floating_point() or t.numel() == 0:
            continue
        if ranges is not None and t.dtype in (torch.float16, torch.bfloat16):
            lo, hi = (float(v) for v in torch.aminmax(t))
            if math.isfinite(lo) and math.isfinite(hi):
                ranges[key] = (lo, hi)
                continue
        elif all_finite(t):
            continue
        bad = ~torch.isfinite(t)
        idx, value = _first_bad(t, bad)
        nan = int(torch.isnan(t).sum())
        fed = (f"it feeds engine weight(s) {_consumers(weight_map, key)}" if weight_map.consumers(key)
               else "the engine never reads it")
        problems.append(f"{key!r}: {int(bad.sum())} non-finite value(s) of {t.numel()} (first at {idx}: {value}): "
                        f"{nan} NaN, {int(bad.sum()) - nan} Inf; {fed}")
    return problems


def variance_problems(weight_map: WeightMap, state: Mapping[str, torch.Tensor]) -> list[str]:
    """BatchNorm running variances with ``var + eps <= 0`` (the fold divides by ``sqrt(var + eps)``,
    NaN there), named by key with the first bad index and value. Cheap: variances are per channel."""
    problems = []
    seen = set()
    for src in weight_map.sources.values():
        if src.recipe not in BN_RECIPES:
            continue
        var = src.inputs.get("var")
        if not isinstance(var, dict) or "key" not in var or var["key"] in seen:
            continue
        key = var["key"]
        seen.add(key)
        t = state.get(key)
        eps = float(src.params.get("eps", 0.0))
        if t is None or not t.is_floating_point():
            continue
        bad = (t.double() + eps) <= 0
        if bool(bad.any()):
            idx, value = _first_bad(t, bad)
            more = int(bad.sum()) - 1
            problems.append(f"{key!r}: running variance {value} at {idx}{f' (and {more} more)' if more else ''} is "
                            f"<= -eps (eps={eps:g}); the BatchNorm fold divides by sqrt(var + eps), which is NaN "
                            f"there. A variance is never negative: this checkpoint is damaged or the key holds "
                            f"something else (engine weight(s) {_consumers(weight_map, key)})")
    return problems


def nonfinite_weight_problems(weight_map: WeightMap, name: str, value: torch.Tensor,
                              state: Mapping[str, torch.Tensor],
                              constants: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Why a computed engine weight is not finite, in terms of state_dict keys ([] when it is finite,
    or when it reads no state_dict key: a constant of the graph or model, such as the ``-inf`` of a
    ``masked_fill``, is structure and may hold NaN/Inf as eager does; see
    :attr:`~refitcore.conversion.weight_map.WeightMap.constant_weights`).

    A weight derived from the state_dict must be finite. Traced back through its recipe operands:
    keys holding NaN/Inf (every such key the engine reads is listed), else a constant of the graph
    it reads that holds NaN/Inf (``constants``: the map's, or those read from the new model), else
    an overflow of the recipe, with its operands' ranges."""
    src = weight_map.sources[name]
    if not value.is_floating_point() or not src.keys or all_finite(value):
        return []
    problems = nonfinite_key_problems(weight_map, state)
    if problems:
        return problems
    bad = ~torch.isfinite(value)
    idx, got = _first_bad(value, bad)
    head = (f"engine weight {name!r} = {src.recipe}(...) is derived from the state_dict "
            f"({', '.join(repr(k) for k in src.keys)}) and must be finite, but has {int(bad.sum())} non-finite "
            f"value(s) (first at {idx}: {got}) although those keys are finite")
    constants = weight_map.constants if constants is None else constants
    literals = []
    for cid in dict.fromkeys(c for v in src.inputs.values() for c in operand_constants(v)):
        t = dtypes.as_torch(constants[cid]) if cid in constants else None   # bfloat16: its bit patterns
        if t is not None and t.is_floating_point() and t.numel() and not all_finite(t):
            at, first = _first_bad(t, ~torch.isfinite(t))
            literals.append(f"{cid}: {first} at {at}")
    if literals:
        return [f"{head}: it combines them with constant(s) of the graph holding NaN/Inf ({', '.join(literals)}); "
                f"a weight computed from the state_dict cannot hold those (keep the non-finite constant out of "
                f"the weights' arithmetic, e.g. apply the mask to activations)"]
    parts = []
    for key in src.keys:
        t = state.get(key)
        if t is not None and t.is_floating_point() and t.numel():
            parts.append(f"{key!r} in [{float(t.min()):.4g}, {float(t.max()):.4g}]")
    return [f"{head}: {', '.join(parts) or 'no state_dict input'}; the {src.recipe} result overflows "
            f"{str(value.dtype).replace('torch.', '')} for these values"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# A value below the engine dtype's smallest normal "matters" when losing it (a flush to zero) costs more
# than FLUSH_ULPS * eps * max|w| (eps * max|w| is one ulp of the tensor's largest value, within a factor
# of 2); smaller losses are within the noise the tensor's own rounding makes at that dtype.
FLUSH_ULPS = 16


def _lost(exact: torch.Tensor, rounded: torch.Tensor, tiny: float, floor: float) -> torch.Tensor:
    """Where a nonzero value that matters at its tensor's scale (``|x| >= floor``) rounds to zero or
    to a subnormal (``|x| < tiny``)."""
    mag = exact.abs()
    return (mag >= floor) & (mag > 0) & (rounded.abs() < tiny)


def precision_problems(weight_map: WeightMap, name: str, exact: torch.Tensor, rounded: torch.Tensor,
                       state: Mapping[str, torch.Tensor]) -> list[str]:
    """Why an engine weight cannot be stored in its engine dtype ([] when it can).

    ``exact``: the weight as its recipe computes it (float32 or wider, finite: see
    :func:`nonfinite_weight_problems`); ``rounded``: the same rounded once to the engine dtype (what
    the engine would get). Refused, naming the engine weight, the first index and value, the
    state_dict keys it reads (a key that does not fit the dtype by itself, with its own index and
    value; else the ranges of the inputs of a fold that overflows although they fit) and the fix:

    - overflow: a finite value beyond the dtype's largest finite value (float16: 65504) becomes inf;
    - flush: a value that matters at the tensor's own scale (``|x| >= FLUSH_ULPS * eps * max|w|``,
      eps the dtype's machine epsilon) that rounds to a subnormal (``|x| < finfo.tiny``; float16:
      6.1e-5), which kernels may flush to zero (TensorRT warns "Subnormal FP16 values detected" when
      it converts weights at build time, and a refit does not convert them), or to zero (all its bits
      lost). Losing a smaller value costs less than :data:`FLUSH_ULPS` ulps of the tensor's largest
      value: a N(0, 0.02) weight has 0.24% of its values below float16's smallest normal, and refusing
      those would refuse nearly every float16 checkpoint; in float16 only a tensor whose largest
      value is below ~3.9e-3 can be refused (a layer scale of 1e-6, a fold that makes 5e-6).

    Weights that read no state_dict key are structure (as in :func:`nonfinite_weight_problems`).

    Example::

        exact = apply_recipe(src.recipe, inputs, src.params)
        problems = precision_problems(weight_map, name, exact, exact.to(torch.float16), state)
    """
    src = weight_map.sources[name]
    if (not src.keys or not exact.is_floating_point() or not rounded.is_floating_point()
            or exact.numel() == 0 or rounded.dtype == exact.dtype):
        return []
    info = torch.finfo(rounded.dtype)
    wide_tiny = torch.finfo(torch.float32).tiny        # bfloat16's smallest normal too: its range is float32's
    dtype = _dtype_name(rounded.dtype)
    top = float(exact.abs().max())
    floor = FLUSH_ULPS * info.eps * top
    overflow = top > info.max and not bool(torch.isfinite(rounded).all())
    flush = floor < info.tiny and bool(_lost(exact, rounded, info.tiny, floor).any())
    if not (overflow or flush):
        return []
    keys = [k for k in src.keys if isinstance(state.get(k), torch.Tensor) and state[k].is_floating_point()
            and state[k].numel()]
    where = f"engine weight {name!r} ({dtype}) = {src.recipe}(...) of {', '.join(repr(k) for k in src.keys)}"
    problems = []
    if overflow:
        bad = torch.isinf(rounded)
        idx, got = _first_bad(exact, bad)
        culprits = []
        for key in keys:
            t = state[key]
            big = t.abs() > info.max
            if bool(big.any()):
                at, v = _first_bad(t, big)
                culprits.append(f"state_dict key {key!r} holds {v:.6g} at {at}, beyond {dtype}'s largest finite "
                                f"value {info.max:g}")
        if culprits:
            why, fix = "; ".join(culprits), (f"rescale that weight into {dtype}'s range (and the layer after it by "
                                             f"the inverse), or keep this layer in float32")
        else:
            ranges = ", ".join(f"{k!r} in [{float(state[k].min()):.4g}, {float(state[k].max()):.4g}]" for k in keys)
            why = f"the {src.recipe} result overflows although every input fits {dtype} ({ranges})"
            fix = ("fold in float32 (keep this layer in float32), or rescale the inputs (e.g. a smaller BatchNorm "
                   "weight, with the next layer scaled up)")
        problems.append(f"{where}: {int(bad.sum())} value(s) overflow {dtype} (first at {idx}: {got:.6g} becomes "
                        f"inf; the engine would answer inf/NaN): {why}; {fix}")
    if flush:
        bad = _lost(exact, rounded, info.tiny, floor)
        idx, got = _first_bad(exact, bad)
        now = float(rounded[tuple(idx)] if idx else rounded)
        zeros = int((bad & (rounded == 0)).sum())
        fate = "0 (all its bits lost)" if now == 0 else f"the subnormal {now:.6g}, which kernels may flush to zero"
        small = [k for k in keys if bool(_lost(state[k], state[k].to(rounded.dtype), info.tiny, floor).any())]
        origin = (f"state_dict key(s) {', '.join(repr(k) for k in small)} hold such values themselves" if small else
                  f"the {src.recipe} result is that small although its inputs are not")
        problems.append(f"{where}: {int(bad.sum())} value(s) below {dtype}'s smallest normal {info.tiny:.4g} "
                        f"({zeros} rounding to 0) although the weight's largest is {top:.4g} (first at {idx}: "
                        f"{got:.6g} becomes {fate}): {origin}; rescale the weight up (and the layer after it "
                        f"down), keep this layer in float32"
                        + (", or use bfloat16, which has float32's range" if info.tiny > wide_tiny else ""))
    return problems


def check_samples(io, inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    """Verification inputs as a list of samples, each checked against the engine's input spec
    (``io``: an :class:`refitcore.IOSpec`); raises ``ValueError`` listing every mismatch."""
    try:
        samples = [(s,) if isinstance(s, torch.Tensor) else tuple(s) for s in sample_list(inputs)]
    except TypeError:
        raise ValueError(f"verify_inputs: expected a tensor, a tuple of tensors (one sample) or a list of "
                         f"samples, got {type(inputs).__name__}") from None
    problems = []
    names = list(io.input_names)
    profiles = getattr(io, "profiles", None)
    for s, sample in enumerate(samples):
        if len(sample) != len(io.input_shapes):
            problems.append(f"sample {s}: {len(sample)} input(s) where the engine takes {len(io.input_shapes)} "
                            f"({names})")
            continue
        for i, (x, shape, dtype) in enumerate(zip(sample, io.input_shapes, io.input_dtypes)):
            where = f"sample {s}, input {i} ({names[i]!r})" if i < len(names) else f"sample {s}, input {i}"
            if not isinstance(x, torch.Tensor):
                problems.append(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
                continue
            want = list(shape)
            if profiles is None and (len(x.shape) != len(want)
                                     or any(w >= 0 and d != w for d, w in zip(x.shape, want))):
                problems.append(f"{where}: shape {list(x.shape)} where the engine takes {want}")
            if str(x.dtype).replace("torch.", "") != dtype:
                problems.append(f"{where}: dtype {x.dtype} where the engine takes {dtype}")
        if profiles is not None and all(isinstance(x, torch.Tensor) for x in sample):
            try:   # dynamic shapes: any shape inside an optimization profile
                profiles.profile_for([tuple(x.shape) for x in sample])
            except ValueError as err:   # ShapeRangeError: names the input, the dimension and the range
                problems.append(f"sample {s}: {err}")
    if problems:
        raise ValueError("verify_inputs do not fit the engine (nothing was refitted):\n"
                         + "\n".join(f"  - {p}" for p in problems))
    return samples


def eager_weights(weight_map: WeightMap, state: Mapping[str, torch.Tensor],
                  state_keys: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], bool]:
    """(weights, keep_missing): the new weights as the eager reference model loads them.

    A tied parameter given under one name fills its other names. Keys the engine never reads
    (``weight_map.unused_keys``, e.g. ``num_batches_tracked``) may be missing: ``keep_missing`` is
    True when only such keys of the compiled model (``state_keys``) are, and the model keeps its
    own values for them. Any other key of the compiled model the weights lack raises
    :class:`refitcore.capture.eager.EagerModelError`."""
    given = collections.OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        given._metadata = metadata  # type: ignore[attr-defined]  # torch's state_dict attribute
    for group in weight_map.tied:
        present = next((k for k in group if k in given), None)
        if present is not None:
            for k in group:
                given.setdefault(k, given[present])
    if not state_keys:
        return given, False
    unread = set(weight_map.unused_keys)
    missing = [k for k in state_keys if k not in given and k not in unread]
    if missing:
        raise EagerModelError(f"the new weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''} that the "
                              f"eager model needs (beside keys the engine never reads)")
    return given, any(k not in given for k in state_keys)


def eager_reference(engine, state: Mapping[str, torch.Tensor], source: Any = None, *,
                    trust_factory: bool = False) -> torch.nn.Module:
    """The eager model to verify ``engine`` against, built from :func:`eager_weights` (see
    :func:`refitcore.capture.eager.eager_model`; ``source``: the new weights' own module, if any)."""
    weights, keep = eager_weights(engine.weight_map, state, engine.state_keys)
    return eager_model(weights, model=source, engine=engine, trust_factory=trust_factory, keep_missing=keep)
