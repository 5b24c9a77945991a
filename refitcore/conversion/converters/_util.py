"""Small helpers shared by the converter families."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..context import ConversionContext, StaticValue

__all__ = ["arg", "rank", "shape_of", "as_tensor", "equalize_ranks", "reshape", "out_shape", "axes_mask"]


def arg(args: Sequence[Any], kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def shape_of(t) -> tuple[int, ...]:
    if isinstance(t, StaticValue):
        return t.shape
    return tuple(int(s) for s in t.shape)


def rank(t) -> int:
    return len(shape_of(t))


def out_shape(ctx: ConversionContext) -> tuple[int, ...]:
    return tuple(int(s) for s in ctx.node.meta["val"].shape)


def reshape(ctx: ConversionContext, x, shape: Sequence[int], suffix: str | None = None):
    layer = ctx.network.add_shuffle(x)
    layer.reshape_dims = ctx.trt.Dims(tuple(int(s) for s in shape))
    return ctx.name(layer, suffix).get_output(0)


def as_tensor(ctx: ConversionContext, value, *, rank_: int, suffix: str):
    """An ITensor for ``value`` (ITensor, StaticValue or Python scalar) of rank ``rank_``."""
    if isinstance(value, (StaticValue, int, float, bool)):
        return ctx.constant(value, rank=rank_, suffix=suffix)
    if isinstance(value, torch.Tensor):
        raise TypeError("internal error: raw torch.Tensor reached a converter")
    r = rank(value)
    if r < rank_:
        return reshape(ctx, value, (1,) * (rank_ - r) + shape_of(value), suffix=f"{suffix}_rank")
    return value


def equalize_ranks(ctx: ConversionContext, a, b):
    """TensorRT elementwise layers need inputs of equal rank: pad the lower one with leading 1s."""
    ra = rank(a) if not isinstance(a, (int, float, bool)) else 0
    rb = rank(b) if not isinstance(b, (int, float, bool)) else 0
    r = max(ra, rb)
    return as_tensor(ctx, a, rank_=r, suffix="lhs"), as_tensor(ctx, b, rank_=r, suffix="rhs")


def axes_mask(dims: Sequence[int], r: int) -> int:
    mask = 0
    for d in dims:
        mask |= 1 << (d % r)
    return mask

