"""Special values aimed at named tensors: zeros, large, tiny, flipped signs, a negative BatchNorm
gamma, a BatchNorm variance near eps, zeroed output channels, and (opt in) values at the limits of
the engine's dtype: its largest finite value, its smallest normal, its subnormals. Each applies only
where it keeps the weights valid (a variance stays >= 0)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from .layout import Entry, Layout, layout_of
from .validation import check_some_of

__all__ = ["SPECIALS", "PRECISION_SPECIALS", "ALL_SPECIALS", "LARGE", "TINY", "applies", "apply_special", "targets",
           "special_targets", "dtype_limits"]

SPECIALS = ("zeros", "large", "tiny", "sign_flip", "negative_gamma", "var_near_eps", "zero_channels")
# Values at the limits of the engine dtype (``precision``: fp32, fp16 or bf16). Opt in (``specials=``):
# a weight at float16's largest finite value is legal, but activations it scales overflow float16, so
# these are for checking the engine's range validation and edge values, not for random-weight properties.
#   dtype_max:        the tensor's largest |value| becomes the dtype's largest finite value (sign kept);
#   dtype_min_normal: the tensor rescaled so its largest |value| is the dtype's smallest normal (the rest
#                     fall below it: subnormal, or 0 in the dtype; a float16 engine refuses such a tensor);
#   dtype_subnormal:  about a quarter of the values (at least one) become subnormals of the dtype, the
#                     rest unchanged (beneath the tensor's resolution: accepted, and flushed or not alike).
PRECISION_SPECIALS = ("dtype_max", "dtype_min_normal", "dtype_subnormal")
ALL_SPECIALS = SPECIALS + PRECISION_SPECIALS
LARGE = 100.0      # "large" special: the tensor scaled up by this (outputs stay far from float32 overflow)
TINY = 1e-6        # "tiny" special: scaled down by this (well above float32 subnormals)


def applies(kind: str, e: Entry) -> bool:
    """Whether the special ``kind`` may be aimed at the tensor ``e``."""
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
    return kind in ("zeros", "large", "tiny", "sign_flip") + PRECISION_SPECIALS


def targets(layout: Layout, kinds: Sequence[str]) -> list[tuple[str, str]]:
    """Every ``(key, kind)`` pair of ``layout`` a special of ``kinds`` applies to (tie leaders only)."""
    return [(e.key, kind) for e in layout.leaders for kind in kinds if applies(kind, e)]


def special_targets(model, kinds: Sequence[str] = SPECIALS) -> list[tuple[str, str]]:
    """Every ``(state_dict key, special)`` pair that :func:`weight_set` and :func:`state_dicts` may
    apply to ``model`` (followers of tied parameters are never targets: their leader is); ``kinds``
    from :data:`ALL_SPECIALS`."""
    check_some_of("kinds", kinds, ALL_SPECIALS, allow_empty=True)
    return targets(layout_of(model), kinds)


def dtype_limits(precision: str) -> tuple[float, float, float]:
    """(largest finite, smallest normal, smallest subnormal) of the engine dtype of ``precision``
    ('fp32', 'fp16', 'bf16'), as Python floats (each exactly representable in float32)."""
    import torch

    info = torch.finfo({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    return float(info.max), float(info.tiny), float(info.tiny * info.eps)


def _dtype_special(kind: str, t, g, precision: str):
    import torch

    largest, normal, smallest = dtype_limits(precision)
    out = t.detach().to(torch.float64).clone()
    flat = out.view(-1)
    if kind == "dtype_max":
        i = int(torch.argmax(flat.abs()))
        flat[i] = -largest if flat[i] < 0 else largest
    elif kind == "dtype_min_normal":
        top = float(flat.abs().max())
        out = out * (normal / top) if top > 0 else torch.full_like(out, normal)
    else:   # dtype_subnormal: tiny * 2^-k, k in [1, mantissa bits], random signs
        pick = torch.rand(flat.numel(), generator=g) < 0.25
        pick[int(torch.randint(0, flat.numel(), (), generator=g))] = True
        bits = round(math.log2(normal / smallest))
        k = torch.randint(1, bits + 1, (int(pick.sum()),), generator=g).to(torch.float64)
        sign = torch.where(torch.rand(k.numel(), generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        flat[pick] = sign * normal * torch.pow(2.0, -k)
    return out.to(t.dtype)


def apply_special(kind: str, e: Entry, t, g, precision: str = "fp32"):
    """The tensor ``t`` (of entry ``e``) with the special ``kind`` applied, drawing from generator ``g``;
    ``precision``: the engine dtype whose limits the :data:`PRECISION_SPECIALS` aim at."""
    import torch

    if kind in PRECISION_SPECIALS:
        return _dtype_special(kind, t, g, precision)
    if kind == "zeros":
        return torch.zeros_like(t)
    if kind == "large":
        return t * LARGE
    if kind == "tiny":
        return t * TINY
    if kind == "sign_flip":
        return -t
    if kind == "negative_gamma":
        return -(t.abs())
    if kind == "var_near_eps":
        eps = e.eps or 1e-5
        return (torch.rand(e.shape, generator=g, dtype=torch.float64) * 2 * eps).to(e.dtype)
    if kind == "zero_channels":   # about 30% of the output channels (at least one) all zero
        rows = torch.rand(e.shape[0], generator=g) < 0.3
        rows[int(torch.randint(0, e.shape[0], (), generator=g))] = True
        t = t.clone()
        t[rows] = 0
        return t
    raise AssertionError(f"unhandled special {kind!r}: callers check against SPECIALS")
