"""Special values aimed at named tensors: zeros, large, tiny, flipped signs, a negative BatchNorm
gamma, a BatchNorm variance near eps, zeroed output channels. Each applies only where it keeps the
weights valid (a variance stays >= 0)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from .layout import Entry, Layout, layout_of
from .validation import check_some_of

__all__ = ["SPECIALS", "LARGE", "TINY", "applies", "apply_special", "targets", "special_targets"]

SPECIALS = ("zeros", "large", "tiny", "sign_flip", "negative_gamma", "var_near_eps", "zero_channels")
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
    return kind in ("zeros", "large", "tiny", "sign_flip")


def targets(layout: Layout, kinds: Sequence[str]) -> list[tuple[str, str]]:
    """Every ``(key, kind)`` pair of ``layout`` a special of ``kinds`` applies to (tie leaders only)."""
    return [(e.key, kind) for e in layout.leaders for kind in kinds if applies(kind, e)]


def special_targets(model, kinds: Sequence[str] = SPECIALS) -> list[tuple[str, str]]:
    """Every ``(state_dict key, special)`` pair that :func:`weight_set` and :func:`state_dicts` may
    apply to ``model`` (followers of tied parameters are never targets: their leader is)."""
    check_some_of("kinds", kinds, SPECIALS, allow_empty=True)
    return targets(layout_of(model), kinds)


def apply_special(kind: str, e: Entry, t, g):
    """The tensor ``t`` (of entry ``e``) with the special ``kind`` applied, drawing from generator ``g``."""
    import torch

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
