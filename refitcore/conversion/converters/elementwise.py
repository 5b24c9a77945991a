"""Binary elementwise arithmetic (TensorRT needs equal ranks; scalars become named constants)."""
from __future__ import annotations

import torch

from ..context import ConversionContext, StaticValue
from ..registry import Unsupported, converter
from ._util import arg, equalize_ranks

aten = torch.ops.aten


def elementwise(ctx: ConversionContext, a, b, op: str):
    a, b = equalize_ranks(ctx, a, b)
    layer = ctx.network.add_elementwise(a, b, getattr(ctx.trt.ElementWiseOperation, op))
    return ctx.name(layer).get_output(0)


def _scaled(ctx, b, alpha):
    if alpha in (None, 1):
        return b
    if isinstance(b, (int, float)):
        return b * alpha
    raise Unsupported("add/sub with alpha != 1 on a tensor")


@converter(aten.add.Tensor, aten.add.Scalar)
def add(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], _scaled(ctx, args[1], arg(args, kwargs, 2, "alpha", 1)), "SUM")


@converter(aten.sub.Tensor, aten.sub.Scalar)
def sub(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], _scaled(ctx, args[1], arg(args, kwargs, 2, "alpha", 1)), "SUB")


@converter(aten.rsub.Scalar)
def rsub(ctx, node, args, kwargs):
    return elementwise(ctx, _scaled(ctx, args[1], arg(args, kwargs, 2, "alpha", 1)), args[0], "SUB")


@converter(aten.mul.Tensor, aten.mul.Scalar)
def mul(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], args[1], "PROD")


@converter(aten.div.Tensor, aten.div.Scalar)
def div(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], args[1], "DIV")


__all__ = ["elementwise", "StaticValue"]
