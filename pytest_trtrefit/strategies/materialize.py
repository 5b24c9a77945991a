"""The materializer: one state_dict from a model's layout, a seed, a scale family and a list of
specials. Every weight strategy (and :func:`~pytest_trtrefit.strategies.weight_set`) draws through
it, so a seed, scale and specials name the same tensors everywhere."""
from __future__ import annotations

import math
from collections.abc import Sequence

from .layout import Entry, Layout
from .pool import Cutter
from .specials import apply_special

__all__ = ["SCALES", "std", "materialize"]

SCALES = ("fan_in", "fan_in_uniform", "he", "unit")
_STD = {"fan_in": lambda fan_in: 1.0 / math.sqrt(fan_in),
        "fan_in_uniform": lambda fan_in: 1.0 / math.sqrt(fan_in),   # uniform +-sqrt(3/fan_in): the same variance
        "he": lambda fan_in: math.sqrt(2.0 / fan_in),
        "unit": lambda fan_in: 1.0}


def std(scale: str, fan_in: int) -> float:
    """The standard deviation of a weight of this ``fan_in`` in the scale family ``scale`` (:data:`SCALES`)."""
    return _STD[scale](fan_in)


def materialize(layout: Layout, seed: int, scale: str, specials: Sequence[tuple[str, str]], *,
                gain: float = 1.0, keep_integers: bool = False, precision: str = "fp32") -> dict:
    """The state_dict of ``layout`` drawn from ``seed``: weights from the ``scale`` family times
    ``gain``, valid BatchNorm statistics, then ``specials`` (``(key, kind)`` pairs, the dtype-limit ones
    aimed at ``precision``'s dtype) in order; tied
    keys share one tensor. Float tensors are cut from the process's pools of random values
    (:mod:`.pool`) at offsets and signs drawn from ``seed``. Arguments are checked by the callers."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cut = Cutter(g)

    def normal(shape, sd, dtype):
        return cut.take("normal", shape, sd).to(dtype)

    def uniform(shape, bound, dtype):          # uniform in [-bound, bound)
        return cut.take("uniform", shape, bound).to(dtype)

    def draw(e: Entry):
        if e.role == "bn_count":
            drawn = torch.randint(0, 1000, e.shape, generator=g, dtype=e.dtype)  # drawn either way: same stream
            return e.original.clone() if keep_integers else drawn
        if e.role in ("int", "bool"):
            return e.original.clone()
        if e.role == "weight" or e.role == "param":
            sd = std(scale, e.fan_in) * gain
            if scale == "fan_in_uniform":
                return uniform(e.shape, sd * math.sqrt(3), e.dtype)
            return normal(e.shape, sd, e.dtype)
        if e.role == "bias":
            bound = gain / math.sqrt(e.fan_in)
            return uniform(e.shape, bound, e.dtype)
        if e.role == "bn_weight":
            return (1 + normal(e.shape, 0.2, torch.float64)).to(e.dtype)
        if e.role in ("bn_bias", "norm_bias"):
            return normal(e.shape, 0.2 if e.role == "bn_bias" else 0.1, e.dtype)
        if e.role == "bn_mean":
            return normal(e.shape, 0.5, e.dtype)
        if e.role == "bn_var":
            return (uniform(e.shape, 0.75, torch.float64) + 1.25).to(e.dtype)     # in [0.5, 2)
        if e.role == "norm_weight":
            return (1 + normal(e.shape, 0.1, torch.float64)).to(e.dtype)
        raise AssertionError(f"unhandled role {e.role}")

    out: dict = {}
    by_key = {e.key: e for e in layout.entries}
    for e in layout.entries:
        if e.key not in layout.tied:
            out[e.key] = draw(e)
    for key, kind in specials:
        out[key] = apply_special(kind, by_key[key], out[key], g, precision)
    for follower, leader in layout.tied.items():
        out[follower] = out[leader]          # tied parameters: one tensor, identical values
    return {e.key: out[e.key] for e in layout.entries}
