"""Comparisons and boolean logic.

TensorRT's comparisons (EQUAL, GREATER, LESS) yield BOOL; AND, OR and XOR take BOOL inputs and
NOT is a unary on BOOL (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/ElementWise.html,
Unary.html). ``ne`` is NOT(EQUAL) (true for NaN, as in PyTorch); ``le``/``ge`` are LESS/GREATER OR
EQUAL (false for NaN; NOT(GREATER) would not be). Bitwise ops are converted on bool tensors only.
"""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import cast
from refitcore.conversion.converters.elementwise import elementwise
from refitcore.conversion.registry import converter

aten = torch.ops.aten


def logical_not(ctx: ConversionContext, x):
    x = cast(ctx, x, torch.bool, suffix="to_bool")
    return ctx.name(ctx.network.add_unary(x, ctx.trt.UnaryOperation.NOT)).get_output(0)


def compare(ctx: ConversionContext, a, b, op: str):
    """a <op> b for op in eq, ne, lt, gt, le, ge."""
    if op in ("eq", "lt", "gt"):
        return elementwise(ctx, a, b, {"eq": "EQUAL", "lt": "LESS", "gt": "GREATER"}[op])
    if op == "ne":
        eq = elementwise(ctx, a, b, "EQUAL", suffix="eq")
        return ctx.name(ctx.network.add_unary(eq, ctx.trt.UnaryOperation.NOT)).get_output(0)
    strict = elementwise(ctx, a, b, "LESS" if op == "le" else "GREATER", suffix="strict")
    equal = elementwise(ctx, a, b, "EQUAL", suffix="eq")
    return ctx.name(ctx.network.add_elementwise(strict, equal, ctx.trt.ElementWiseOperation.OR)).get_output(0)


def logical(ctx: ConversionContext, a, b, op: str):
    """AND/OR/XOR of two operands taken as booleans (nonzero is true)."""
    a = a if isinstance(a, (bool, int, float)) else _as_bool(ctx, a, "lhs")
    b = b if isinstance(b, (bool, int, float)) else _as_bool(ctx, b, "rhs")
    return elementwise(ctx, bool(a) if isinstance(a, (int, float)) else a,
                       bool(b) if isinstance(b, (int, float)) else b, op)


def _as_bool(ctx, x, suffix):
    if isinstance(x, StaticValue):
        return x if x.tensor.dtype == torch.bool else StaticValue(x.tensor != 0, None)
    if x.dtype == ctx.trt.DataType.BOOL:
        return x
    return _nonzero(ctx, x, suffix)


def _nonzero(ctx, x, suffix):
    eq = elementwise(ctx, x, 0, "EQUAL", suffix=f"{suffix}_eq0")
    return ctx.name(ctx.network.add_unary(eq, ctx.trt.UnaryOperation.NOT), f"{suffix}_nonzero").get_output(0)


_CMP = {}
for _op in ("eq", "ne", "lt", "gt", "le", "ge"):
    for _overload in ("Tensor", "Scalar"):
        _CMP[getattr(getattr(aten, _op), _overload)] = _op


@converter(*_CMP)
def comparison(ctx, node, args, kwargs):
    return compare(ctx, args[0], args[1], _CMP[node.target])


def _bool_only(node) -> str | None:
    dtypes = {a.meta["val"].dtype for a in node.args if hasattr(a, "meta") and "val" in a.meta}
    return None if dtypes <= {torch.bool} else f"bitwise op on {sorted(map(str, dtypes))} (bool tensors only)"


_LOGICAL = {aten.logical_and.default: "AND", aten.logical_or.default: "OR", aten.logical_xor.default: "XOR"}
_BITWISE = {aten.bitwise_and.Tensor: "AND", aten.bitwise_or.Tensor: "OR", aten.bitwise_xor.Tensor: "XOR",
            aten.__and__.Tensor: "AND", aten.__or__.Tensor: "OR", aten.__xor__.Tensor: "XOR"}


@converter(*_LOGICAL)
def logical_binary(ctx, node, args, kwargs):
    return logical(ctx, args[0], args[1], _LOGICAL[node.target])


@converter(*_BITWISE, capability=_bool_only)
def bitwise_binary(ctx, node, args, kwargs):
    return logical(ctx, args[0], args[1], _BITWISE[node.target])


@converter(aten.logical_not.default)
def logical_not_default(ctx, node, args, kwargs):
    x = args[0] if args[0].dtype == ctx.trt.DataType.BOOL else _nonzero(ctx, args[0], "x")
    return logical_not(ctx, x)


@converter(aten.bitwise_not.default, capability=_bool_only)
def bitwise_not(ctx, node, args, kwargs):
    return logical_not(ctx, args[0])


__all__ = ["compare", "logical", "logical_not"]
