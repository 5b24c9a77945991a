"""Gathers: embedding lookups, advanced indexing with one index tensor, index_select, gather.

An embedding table is a refittable CONSTANT (``"<layer>.weight CONSTANT"``, recipe ``copy`` of the
table's state_dict key) that an IGatherLayer reads. TensorRT's gather
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Gather.html): DEFAULT mode
gives ``data.shape[:axis] + indices.shape + data.shape[axis+1:]``, ELEMENT mode is torch.gather;
indices are int32 or int64. Negative indices are made non-negative in the network (PyTorch counts
them from the end), so nothing rests on how TensorRT treats them. Static index tensors reach the
network as float32 constants (the weight map's one dtype) cast to int32: exact below 2**24.
"""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import rank, reshape, shape_of, typed_constant
from refitcore.conversion.converters.elementwise import elementwise
from refitcore.conversion.registry import Unsupported, converter
from refitcore.conversion.shape_tensors import ShapeValue, dim_of

aten = torch.ops.aten


def _indices(ctx: ConversionContext, index, size, suffix: str = "index"):
    """An int32/int64 ITensor of indices into an axis of ``size`` elements (an int, or a run-time
    size for a dynamic axis), negatives wrapped."""
    if isinstance(index, StaticValue):
        idx = index.tensor.long()
        if not isinstance(size, int):
            if idx.numel() and int(idx.min()) < 0:
                raise Unsupported("a negative literal index into a dynamic dimension")
            return typed_constant(ctx, StaticValue(idx.to(torch.int32), None), torch.int32, suffix=suffix)
        if idx.numel() and (int(idx.max()) >= size or int(idx.min()) < -size):
            raise Unsupported(f"index out of range for an axis of {size}")
        return typed_constant(ctx, StaticValue(torch.where(idx < 0, idx + size, idx).to(torch.int32), None),
                              torch.int32, suffix=suffix)
    if index.dtype not in (ctx.trt.DataType.INT32, ctx.trt.DataType.INT64):
        raise Unsupported(f"index tensor of type {index.dtype.name} (int32/int64 expected)")
    negative = elementwise(ctx, index, 0, "LESS", suffix=f"{suffix}_neg")
    wrapped = elementwise(ctx, index, size, "SUM", suffix=f"{suffix}_wrap")
    return _where(ctx, negative, wrapped, index, suffix)


def _where(ctx, cond, a, b, suffix):
    layer = ctx.network.add_select(cond, a, b)
    return ctx.name(layer, f"{suffix}_select").get_output(0)


def gather(ctx: ConversionContext, data, index, axis: int, *, suffix: str | None = None):
    """IGatherLayer (DEFAULT mode) of ``data`` along ``axis``; ``data`` may be a StaticValue
    (a refittable constant, e.g. an embedding table)."""
    if isinstance(data, StaticValue):
        data = ctx.constant(data, suffix="weight")
    axis %= rank(data)
    idx = _indices(ctx, index, _size(ctx, data, axis))
    layer = ctx.network.add_gather(data, idx, axis)
    return ctx.name(layer, suffix).get_output(0)


def _size(ctx: ConversionContext, data, axis: int):
    """The size of ``data``'s axis: an int, or a run-time size (dynamic shapes)."""
    n = shape_of(data)[axis]
    return n if n >= 0 else ShapeValue(dim_of(ctx, data, axis), None)


@converter(aten.embedding.default)
def embedding(ctx, node, args, kwargs):
    # padding_idx, scale_grad_by_freq and sparse only affect training.
    return gather(ctx, args[0], args[1], 0)


@converter(aten.index_select.default)
def index_select(ctx, node, args, kwargs):
    return gather(ctx, args[0], args[2], args[1])


def _one_index(node) -> str | None:
    indices = node.args[1]
    used = [i for i in indices if i is not None]
    if any(i.meta["val"].dtype == torch.bool for i in used):
        return "boolean mask indexing (data-dependent shape)"
    if len(used) != 1 and (len(used) != len(indices) or len(indices) != node.args[0].meta["val"].dim()):
        return f"indexing with {len(used)} index tensors (one, or one per axis, is supported)"
    return None


@converter(aten.index.Tensor, capability=_one_index)
def index_tensor(ctx, node, args, kwargs):
    """x[..., idx, ...] with one index tensor at axis d: a gather along d. x[i0, i1, ...] with an
    index for every axis (e.g. a padding mask read at broadcast (batch, position) indices): a gather
    from the flattened x at the linear index ((i0 * n1) + i1) * n2 + ..., which broadcasts the
    indices as PyTorch does."""
    data, indices = args[0], list(args[1])
    used = [i for i, v in enumerate(indices) if v is not None]
    if len(used) == 1:
        return gather(ctx, data, indices[used[0]], used[0])
    if isinstance(data, StaticValue):
        data = typed_constant(ctx, data, node.meta["val"].dtype, suffix="weight")
    linear = None
    for d, index in enumerate(indices):
        size = _size(ctx, data, d)
        idx = _indices(ctx, index, size, suffix=f"index{d}")
        linear = idx if linear is None else elementwise(
            ctx, elementwise(ctx, linear, size, "PROD", suffix=f"stride{d}"), idx, "SUM", suffix=f"linear{d}")
    flat = reshape(ctx, data, (-1,), suffix="flat")
    return gather(ctx, flat, linear, 0)


@converter(aten.gather.default)
def gather_elements(ctx, node, args, kwargs):
    """torch.gather: TensorRT's ELEMENT mode (output shape = index shape)."""
    data, dim, index = args[0], args[1], args[2]
    if isinstance(data, StaticValue):   # in its own dtype: an integer buffer gathers integers
        data = typed_constant(ctx, data, node.meta["val"].dtype, suffix="weight")
    dim %= rank(data)
    idx = _indices(ctx, index, shape_of(data)[dim])
    layer = ctx.network.add_gather(data, idx, dim)
    layer.mode = ctx.trt.GatherMode.ELEMENT
    return ctx.name(layer).get_output(0)


__all__ = ["gather"]
