"""Reductions: sum, max, min over axes, vector norms (sqrt of a sum of squares); scans along an
axis: cumsum and its inverse, diff."""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext
from refitcore.conversion.converters._util import (
    arg,
    as_tensor,
    axes_mask,
    cast,
    from_fp32,
    rank,
    reshape,
    shape_of,
    to_fp32,
    torch_dtype_of,
    typed_constant,
)
from refitcore.conversion.converters.shape import slice_
from refitcore.conversion.registry import Unsupported, converter

aten = torch.ops.aten


# Reductions that accumulate: float32 inside a reduced-precision engine (MAX/MIN are exact in any type).
ACCUMULATING = frozenset({"SUM", "AVG", "PROD"})


def reduce(ctx: ConversionContext, x, op: str, dims, keepdim: bool, *, suffix: str | None = None):
    r = rank(x)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(r))
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    tag = f"{suffix}_" if suffix else ""
    src = to_fp32(ctx, x, f"{tag}fp32_in") if op in ACCUMULATING else x
    layer = ctx.network.add_reduce(src, getattr(ctx.trt.ReduceOperation, op), axes_mask(dims, r), bool(keepdim))
    y = ctx.name(layer, suffix if src is x else f"{tag}reduce").get_output(0)
    return from_fp32(ctx, y, x, suffix)


def _float_only(node) -> str | None:
    dtype = node.kwargs.get("dtype")
    return None if dtype in (None, torch.float32) else f"reduction with dtype={dtype}"


@converter(aten.sum.dim_IntList, capability=_float_only)
def sum_dim(ctx, node, args, kwargs):
    return reduce(ctx, args[0], "SUM", arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "keepdim", False))


@converter(aten.amax.default)
def amax(ctx, node, args, kwargs):
    return reduce(ctx, args[0], "MAX", arg(args, kwargs, 1, "dim", []), arg(args, kwargs, 2, "keepdim", False))


@converter(aten.amin.default)
def amin(ctx, node, args, kwargs):
    return reduce(ctx, args[0], "MIN", arg(args, kwargs, 1, "dim", []), arg(args, kwargs, 2, "keepdim", False))


def _check_norm(node) -> str | None:
    if arg(node.args, node.kwargs, 1, "ord", 2) != 2:
        return "vector norms other than ord=2"
    return _float_only(node)


@converter(aten.linalg_vector_norm.default, capability=_check_norm)
def linalg_vector_norm(ctx, node, args, kwargs):
    """||x||_2 = sqrt(sum(x * x)) over ``dim``."""
    trt = ctx.trt
    x = to_fp32(ctx, args[0], "fp32_in")   # squares and their sum in float32 in a reduced-precision engine
    sq = ctx.name(ctx.network.add_elementwise(x, x, trt.ElementWiseOperation.PROD), "square").get_output(0)
    total = reduce(ctx, sq, "SUM", arg(args, kwargs, 2, "dim"), arg(args, kwargs, 3, "keepdim", False), suffix="sum")
    y = ctx.name(ctx.network.add_unary(total, trt.UnaryOperation.SQRT), "sqrt" if x is not args[0] else None)
    return from_fp32(ctx, y.get_output(0), args[0])




def cumulative_sum(ctx: ConversionContext, x, dim: int):
    """torch.cumsum as an ICumulativeLayer (SUM, inclusive, forward;
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Cumulative.html). Its
    axis input is a 0-D int32 constant (a float32 constant, the weight map's one dtype, cast)."""
    axis = typed_constant(ctx, torch.tensor(dim % rank(x)), torch.int32, shape=(), suffix="axis")
    src = to_fp32(ctx, x, "fp32_in")   # a running sum accumulates: float32 in a reduced-precision engine
    layer = ctx.network.add_cumulative(src, axis, ctx.trt.CumulativeOperation.SUM, False, False)
    return from_fp32(ctx, ctx.name(layer, "cumsum" if src is not x else None).get_output(0), x)


def _cumsum_dtype(node) -> str | None:
    dtype = node.kwargs.get("dtype")
    if dtype not in (None, node.args[0].meta["val"].dtype):
        return f"cumsum with dtype={dtype}"
    return None


@converter(aten.cumsum.default, capability=_cumsum_dtype)
def cumsum(ctx, node, args, kwargs):
    return cumulative_sum(ctx, args[0], arg(args, kwargs, 1, "dim"))


def diff(ctx: ConversionContext, x, n: int, dim: int, prepend=None, append=None):
    """torch.diff: ``prepend``, ``x`` and ``append`` concatenated along ``dim``, then ``n`` times
    ``y[1:] - y[:-1]`` there (two slices and a SUB; XOR for booleans, as PyTorch's logical_xor)."""
    trt = ctx.trt
    r = rank(x)
    dim %= r
    dtype = torch_dtype_of(ctx, x)
    parts = [as_tensor(ctx, v, rank_=r, suffix=role, dtype=dtype) if v is not x else x
             for role, v in (("prepend", prepend), ("input", x), ("append", append)) if v is not None]
    y = x
    if len(parts) > 1:
        layer = ctx.network.add_concatenation([cast(ctx, p, dtype, suffix=f"part{i}_cast")
                                               for i, p in enumerate(parts)])
        layer.axis = dim
        y = ctx.name(layer, "cat").get_output(0)
    op = trt.ElementWiseOperation.XOR if dtype == torch.bool else trt.ElementWiseOperation.SUB
    for k in range(int(n)):
        shape = list(shape_of(y))
        shape[dim] -= 1
        later, earlier = ([0] * r for _ in range(2))
        later[dim] = 1
        hi = slice_(ctx, y, later, shape, [1] * r, suffix=f"step{k}_later")
        lo = slice_(ctx, y, earlier, shape, [1] * r, suffix=f"step{k}_earlier")
        layer = ctx.network.add_elementwise(hi, lo, op)
        y = ctx.name(layer, None if k == n - 1 else f"step{k}").get_output(0)
    return y


def _check_diff(node) -> str | None:
    out = node.meta["val"]
    dim = arg(node.args, node.kwargs, 2, "dim", -1) % max(out.dim(), 1)
    size = out.shape[dim] if out.dim() else 0
    if not isinstance(size, int):
        return f"diff along dynamic dimension {dim} (its slices need a static length)"
    if size == 0:
        return "diff with n at least the length along dim (an empty result)"
    return None


@converter(aten.diff.default, capability=_check_diff)
def diff_default(ctx, node, args, kwargs):
    return diff(ctx, args[0], arg(args, kwargs, 1, "n", 1), arg(args, kwargs, 2, "dim", -1),
                arg(args, kwargs, 3, "prepend"), arg(args, kwargs, 4, "append"))


def topk(ctx: ConversionContext, x, k: int, dim: int, largest: bool = True, *, keepdim: bool = True,
         suffix: str | None = None):
    """(values, int64 indices) of the k largest (smallest) along ``dim``: an ITopKLayer (sorted
    descending for MAX, ascending for MIN; its int32 indices are cast to PyTorch's int64).
    Which of equal values comes first is not specified by either side."""
    trt = ctx.trt
    r = rank(x)
    dim %= r
    layer = ctx.network.add_topk(x, trt.TopKOperation.MAX if largest else trt.TopKOperation.MIN, int(k), 1 << dim)
    ctx.name(layer, suffix)
    values, indices = layer.get_output(0), cast(ctx, layer.get_output(1), torch.int64,
                                                suffix="indices" if suffix is None else f"{suffix}_indices")
    if not keepdim:
        shape = shape_of(values)[:dim] + shape_of(values)[dim + 1:]
        values = reshape(ctx, values, shape, suffix="values_squeeze")
        indices = reshape(ctx, indices, shape, suffix="indices_squeeze")
    return values, indices


@converter(aten.topk.default)
def topk_default(ctx, node, args, kwargs):
    return topk(ctx, args[0], args[1], arg(args, kwargs, 2, "dim", -1), arg(args, kwargs, 3, "largest", True))


def _argdim(node) -> str | None:
    return None if arg(node.args, node.kwargs, 1, "dim") is not None else "argmax/argmin over all elements (dim=None)"


@converter(aten.argmax.default, aten.argmin.default, capability=_argdim)
def argmax(ctx, node, args, kwargs):
    largest = node.target is aten.argmax.default
    _, indices = topk(ctx, args[0], 1, args[1], largest, keepdim=bool(arg(args, kwargs, 2, "keepdim", False)))
    return indices


__all__ = ["reduce", "cumulative_sum", "diff", "topk", "Unsupported"]
