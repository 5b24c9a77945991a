"""Reductions: sum, max, min over axes, and vector norms (sqrt of a sum of squares)."""
from __future__ import annotations

import torch

from ..context import ConversionContext
from ..registry import Unsupported, converter
from ._util import arg, axes_mask, rank

aten = torch.ops.aten


def reduce(ctx: ConversionContext, x, op: str, dims, keepdim: bool, *, suffix: str | None = None):
    r = rank(x)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(r))
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    layer = ctx.network.add_reduce(x, getattr(ctx.trt.ReduceOperation, op), axes_mask(dims, r), bool(keepdim))
    return ctx.name(layer, suffix).get_output(0)


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
    x = args[0]
    sq = ctx.name(ctx.network.add_elementwise(x, x, trt.ElementWiseOperation.PROD), "square").get_output(0)
    total = reduce(ctx, sq, "SUM", arg(args, kwargs, 2, "dim"), arg(args, kwargs, 3, "keepdim", False), suffix="sum")
    return ctx.name(ctx.network.add_unary(total, trt.UnaryOperation.SQRT)).get_output(0)


__all__ = ["reduce", "Unsupported"]
