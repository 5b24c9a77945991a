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

from ..context import ConversionContext, StaticValue
from ..registry import Unsupported, converter
from ._util import rank, shape_of, typed_constant
from .elementwise import elementwise

aten = torch.ops.aten


def _indices(ctx: ConversionContext, index, size: int, suffix: str = "index"):
    """An int32/int64 ITensor of indices into an axis of ``size`` elements, negatives wrapped."""
    if isinstance(index, StaticValue):
        idx = index.tensor.long()
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
    idx = _indices(ctx, index, shape_of(data)[axis])
    layer = ctx.network.add_gather(data, idx, axis)
    return ctx.name(layer, suffix).get_output(0)


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
    if len(used) != 1:
        return f"indexing with {len(used)} index tensors (one is supported)"
    if used[0].meta["val"].dtype == torch.bool:
        return "boolean mask indexing (data-dependent shape)"
    return None


@converter(aten.index.Tensor, capability=_one_index)
def index_tensor(ctx, node, args, kwargs):
    """x[..., idx, ...] with one index tensor at axis d: a gather along d."""
    indices = list(args[1])
    axis = next(i for i, v in enumerate(indices) if v is not None)
    return gather(ctx, args[0], indices[axis], axis)


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
