"""Binary elementwise arithmetic (TensorRT needs equal ranks; scalars become named constants)."""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, as_tensor, cast, equalize_ranks, promoted_dtype, rank
from refitcore.conversion.registry import Unsupported, converter

aten = torch.ops.aten


def elementwise(ctx: ConversionContext, a, b, op: str, *, suffix: str | None = None):
    a, b = equalize_ranks(ctx, a, b, prefix=suffix)
    layer = ctx.network.add_elementwise(a, b, getattr(ctx.trt.ElementWiseOperation, op))
    return ctx.name(layer, suffix).get_output(0)


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



@converter(aten.addcmul.default, aten.addcdiv.default)
def addcmul_addcdiv(ctx, node, args, kwargs):
    """input + value * (tensor1 * tensor2) (addcmul) or input + value * (tensor1 / tensor2) (addcdiv):
    ConvNeXt V2's GRN and optimizer-style updates."""
    op = "PROD" if node.target == aten.addcmul.default else "DIV"
    product = elementwise(ctx, args[1], args[2], op)
    value = arg(args, kwargs, 3, "value", 1)
    if value != 1:
        product = elementwise(ctx, product, value, "PROD", suffix="value")
    return elementwise(ctx, args[0], product, "SUM", suffix="add")


@converter(aten.maximum.default)
def maximum(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], args[1], "MAX")


@converter(aten.minimum.default)
def minimum(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], args[1], "MIN")


@converter(aten.clamp_min.default)
def clamp_min(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], float(args[1]), "MAX")


@converter(aten.clamp_max.default)
def clamp_max(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], float(args[1]), "MIN")


@converter(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
def pow_(ctx, node, args, kwargs):
    return elementwise(ctx, args[0], args[1], "POW")


def unary(ctx: ConversionContext, x, op: str):
    return ctx.name(ctx.network.add_unary(x, getattr(ctx.trt.UnaryOperation, op))).get_output(0)


_UNARY = {aten.sqrt.default: "SQRT", aten.exp.default: "EXP", aten.neg.default: "NEG", aten.abs.default: "ABS",
          aten.log.default: "LOG", aten.reciprocal.default: "RECIP", aten.erf.default: "ERF",
          aten.sin.default: "SIN", aten.cos.default: "COS", aten.tan.default: "TAN", aten.floor.default: "FLOOR",
          aten.ceil.default: "CEIL", aten.sign.default: "SIGN", aten.round.default: "ROUND",
          aten.asin.default: "ASIN", aten.acos.default: "ACOS", aten.atan.default: "ATAN"}


@converter(*_UNARY)
def unary_default(ctx, node, args, kwargs):
    return unary(ctx, args[0], _UNARY[node.target])


@converter(aten.rsqrt.default)
def rsqrt(ctx, node, args, kwargs):
    """1 / sqrt(x) as a division of a literal 1 (TensorRT has no rsqrt unary)."""
    root = ctx.name(ctx.network.add_unary(args[0], ctx.trt.UnaryOperation.SQRT), "sqrt").get_output(0)
    return elementwise(ctx, 1.0, root, "DIV")


def select(ctx: ConversionContext, cond, a, b, *, dtype: torch.dtype | None = None):
    """torch.where(cond, a, b): an ISelectLayer over inputs of equal rank and type (``dtype``, by
    default PyTorch's promotion of ``a`` and ``b``)."""
    r = max(_rank(v) for v in (cond, a, b))
    if dtype is None:
        dtype = (promoted_dtype(ctx, a, b) if not all(isinstance(v, (int, float, bool)) for v in (a, b))
                 else torch.float32)
    cond = cast(ctx, as_tensor(ctx, cond, rank_=r, suffix="cond"), torch.bool, suffix="cond_bool")
    a = cast(ctx, as_tensor(ctx, a, rank_=r, suffix="then", dtype=dtype), dtype, suffix="then_cast")
    b = cast(ctx, as_tensor(ctx, b, rank_=r, suffix="else", dtype=dtype), dtype, suffix="else_cast")
    return ctx.name(ctx.network.add_select(cond, a, b)).get_output(0)


def _rank(v) -> int:
    return 0 if isinstance(v, (int, float, bool)) else rank(v)


@converter(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def where(ctx, node, args, kwargs):
    if isinstance(args[0], StaticValue):
        raise Unsupported("where with a constant condition (constants reach TensorRT as float32, not bool)")
    return select(ctx, args[0], args[1], args[2], dtype=node.meta["val"].dtype)


@converter(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(ctx, node, args, kwargs):
    x, mask, value = args[0], args[1], args[2]
    if isinstance(mask, StaticValue):
        raise Unsupported("masked_fill with a constant mask (constants reach TensorRT as float32, not bool)")
    return select(ctx, mask, value, x, dtype=node.meta["val"].dtype)  # masked_fill keeps x's type
