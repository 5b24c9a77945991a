"""Shape-dependent ops over dynamic dimensions: every size comes from shape arithmetic in the
network (:mod:`refitcore.conversion.shape_tensors`), none from the example input.

The static converters in :mod:`.shape` call these when the node's shape varies at run time;
ops that only exist with dynamic sizes (``arange`` over a symbolic length, ``ones`` of a symbolic
shape) are registered here. What cannot be expressed raises :class:`Unsupported` saying which
dynamic dimension is the obstacle, so the op is reported (or left to PyTorch).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import fx

from refitcore import dtypes
from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, as_tensor, out_shape, shape_of
from refitcore.conversion.registry import Unsupported, converter
from refitcore.conversion.shape_tensors import ShapeValue, int_constant, is_symbolic, shape_vector, sym_value

__all__ = ["is_dynamic", "reshape_to", "reshape_to_meta", "same_shape", "slice_dynamic", "expand_dynamic",
           "fill_like_meta"]

aten = torch.ops.aten


def is_dynamic(ctx: ConversionContext, *values: Any) -> bool:
    """The node's output, or one of ``values``, has a size known only at run time."""
    val: Any = ctx.current_node.meta.get("val")   # a fake tensor, a SymInt, a tuple of them...
    if hasattr(val, "shape") and any(is_symbolic(s) for s in val.shape):
        return True
    for v in values:
        if isinstance(v, ShapeValue) or (hasattr(v, "shape") and not isinstance(v, StaticValue)
                                         and any(int(s) < 0 for s in v.shape)):
            return True
        if isinstance(v, (list, tuple)) and is_dynamic(ctx, *v):
            return True
    return False


def same_shape(a_val, b_val) -> bool:
    """Two meta values have the same (symbolic) shape."""
    return [str(s) for s in a_val.shape] == [str(s) for s in b_val.shape]


def reshape_to(ctx: ConversionContext, x, sizes: Sequence[Any], suffix: str | None = None):
    """IShuffleLayer whose reshape dimensions are a shape tensor (input 1)."""
    dims = shape_vector(ctx, list(sizes))   # first: layers are created (and interpreted) in order
    layer = ctx.network.add_shuffle(x)
    layer.set_input(1, dims)
    return ctx.name(layer, suffix).get_output(0)


def reshape_to_meta(ctx: ConversionContext, x, suffix: str | None = None):
    """Reshape ``x`` to the node's own (symbolic) output shape."""
    return reshape_to(ctx, x, list(ctx.current_node.meta["val"].shape), suffix)


def _slice(ctx: ConversionContext, x, start: Sequence[Any], size: Sequence[Any], stride: Sequence[int],
           suffix: str | None = None):
    """ISliceLayer with static start/stride where possible and a shape tensor for the size (input 2),
    also the start (input 1) when it is a run-time value."""
    trt = ctx.trt
    r = len(size)
    static_start = all(isinstance(s, int) for s in start)
    start_t = None if static_start else shape_vector(ctx, list(start))
    size_t = shape_vector(ctx, list(size))
    layer = ctx.network.add_slice(x, trt.Dims(tuple(s if isinstance(s, int) else 0 for s in start)),
                                  trt.Dims((1,) * r), trt.Dims(tuple(stride)))
    if start_t is not None:
        layer.set_input(1, start_t)
    layer.set_input(2, size_t)
    return ctx.name(layer, suffix).get_output(0)


def slice_dynamic(ctx: ConversionContext, x, dim: int, start: Any, step: int):
    """``x[..., start::step, ...]`` along ``dim`` with the node's symbolic output sizes."""
    val = ctx.current_node.meta["val"]
    shp = shape_of(x)
    r = len(shp)
    x = as_tensor(ctx, x, rank_=r, suffix="src", dtype=val.dtype)   # a weight sliced to a run-time length
    if isinstance(start, int) and start < 0:
        if shp[dim] >= 0:
            start = max(0, start + shp[dim])
        else:   # from the end of a dynamic axis: size + start, computed in the network
            in_val = cast(fx.Node, ctx.current_node.args[0]).meta["val"]   # x, the sliced tensor
            start = sym_value(ctx, in_val.shape[dim].node.expr + start)
    starts = [0] * r
    starts[dim] = start
    strides = [1] * r
    strides[dim] = step
    return _slice(ctx, x, starts, list(val.shape), strides)


def expand_dynamic(ctx: ConversionContext, x):
    """Broadcast ``x`` (same rank) to the node's symbolic shape: a slice with stride 0 on size-1 axes."""
    val = ctx.current_node.meta["val"]
    shp = shape_of(x)
    out = out_shape(ctx)
    strides = [0 if s == 1 and o != 1 else 1 for s, o in zip(shp, out)]
    return _slice(ctx, x, [0] * len(out), list(val.shape), strides)


def fill_like_meta(ctx: ConversionContext, value: float, dtype: torch.dtype | None = None):
    """A tensor of the node's (symbolic) shape holding ``value``: a one-element constant broadcast by
    a stride-0 slice, cast to the node's dtype."""
    val = ctx.current_node.meta["val"]
    r = val.dim()
    dtype = dtype or val.dtype
    trt_dtype = dtypes.trt_name(dtype)
    if trt_dtype is None:
        raise Unsupported(f"a dynamic-shape fill of dtype {dtype}")
    c = ctx.constant(torch.tensor(float(value)), shape=(1,) * r, suffix="value")
    y = _slice(ctx, c, [0] * r, list(val.shape), [0] * r, suffix="broadcast")
    if dtype is not torch.float32:
        y = ctx.name(ctx.network.add_cast(y, getattr(ctx.trt.DataType, trt_dtype)), "cast").get_output(0)
    return y


def _static_number(v, what: str):
    if isinstance(v, ShapeValue):
        raise Unsupported(f"{what} given by a dynamic size")
    return v


@converter(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(ctx, node, args, kwargs):
    """arange over a symbolic length: IFillLayer LINSPACE (alpha = start, beta = step) whose length is
    the node's symbolic size, a shape tensor (input 0)."""
    if node.target is aten.arange.default:
        start, step = 0, 1
    else:
        start = _static_number(args[0], "arange start")
        step = _static_number(arg(args, kwargs, 2, "step", 1), "arange step")
    val = node.meta["val"]
    if val.dtype not in (torch.int64, torch.int32, torch.float32):
        raise Unsupported(f"arange of dtype {val.dtype}")
    if not all(float(v).is_integer() for v in (start, step)):
        raise Unsupported(f"arange over a dynamic length with a non-integer start or step ({start}, {step})")
    trt = ctx.trt
    # As NVIDIA's own converters do for a run-time length: INT64 LINSPACE with start (a scalar) and
    # delta (one per output dimension) as inputs 1 and 2, then a cast to the node's dtype.
    length = shape_vector(ctx, list(val.shape))
    alpha = int_constant(ctx, [int(start)], shape=())
    beta = int_constant(ctx, [int(step)])
    layer = ctx.network.add_fill(trt.Dims((1,)), trt.FillOperation.LINSPACE, trt.int64)
    layer.set_input(0, length)
    layer.set_input(1, alpha)
    layer.set_input(2, beta)
    if val.dtype is torch.int64:
        return ctx.name(layer).get_output(0)
    y = ctx.name(layer, "fill").get_output(0)
    return ctx.name(ctx.network.add_cast(y, getattr(trt.DataType, dtypes.trt_name(val.dtype, "FLOAT")))).get_output(0)


def _fill_value(node, args, kwargs, index: int):
    v = arg(args, kwargs, index, "fill_value")
    if isinstance(v, ShapeValue):
        raise Unsupported("a fill value given by a dynamic size")
    return float(v)


@converter(aten.ones.default, aten.new_ones.default, aten.ones_like.default)
def ones(ctx, node, args, kwargs):
    return fill_like_meta(ctx, 1.0)


@converter(aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)
def zeros(ctx, node, args, kwargs):
    return fill_like_meta(ctx, 0.0)


@converter(aten.full.default, aten.full_like.default)
def full(ctx, node, args, kwargs):
    return fill_like_meta(ctx, _fill_value(node, args, kwargs, 1))


@converter(aten.new_full.default)
def new_full(ctx, node, args, kwargs):
    return fill_like_meta(ctx, _fill_value(node, args, kwargs, 2))

