"""Linear layers and matrix products."""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, as_tensor, rank
from refitcore.conversion.converters.elementwise import elementwise
from refitcore.conversion.registry import Unsupported, converter

aten = torch.ops.aten


def linear(ctx: ConversionContext, x, weight, bias):
    """y = x @ W^T + b: W is a named constant [1.., out, in] multiplied with op1=TRANSPOSE."""
    trt = ctx.trt
    if not isinstance(weight, StaticValue):
        raise Unsupported("linear weight computed from the input")
    r = rank(x)
    if r < 2:
        raise Unsupported("linear on a 1-D input")
    w = ctx.constant(weight, rank=r, suffix="weight")
    mm = ctx.network.add_matrix_multiply(x, trt.MatrixOperation.NONE, w, trt.MatrixOperation.TRANSPOSE)
    if bias is None:
        return ctx.name(mm).get_output(0)
    y = ctx.name(mm, "matmul").get_output(0)
    b = ctx.constant(bias, rank=r, suffix="bias")
    return ctx.name(ctx.network.add_elementwise(y, b, trt.ElementWiseOperation.SUM)).get_output(0)


def _matrix_multiply(ctx: ConversionContext, a, b, what: str, operands: tuple[str, str]):
    """An IMatrixMultiplyLayer of two operands of rank >= 2 (constants named by ``operands``), unnamed."""
    trt = ctx.trt
    r = max(rank(a), rank(b))
    if min(rank(a), rank(b)) < 2:
        raise Unsupported(f"{what} with a 1-D operand")
    a = as_tensor(ctx, a, rank_=r, suffix=operands[0])
    b = as_tensor(ctx, b, rank_=r, suffix=operands[1])
    return ctx.network.add_matrix_multiply(a, trt.MatrixOperation.NONE, b, trt.MatrixOperation.NONE)


def matmul(ctx: ConversionContext, a, b):
    return ctx.name(_matrix_multiply(ctx, a, b, "matmul", ("lhs", "rhs"))).get_output(0)


@converter(aten.linear.default)
def linear_default(ctx, node, args, kwargs):
    return linear(ctx, args[0], args[1], arg(args, kwargs, 2, "bias"))


@converter(aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul_default(ctx, node, args, kwargs):
    return matmul(ctx, args[0], args[1])


def _trt_equation(equation: str) -> str:
    """TensorRT's einsum takes lowercase subscripts only and no ellipsis: rename each distinct
    subscript to a lowercase letter, drop spaces."""
    eq = equation.replace(" ", "")
    if "..." in eq:
        raise Unsupported("einsum with an ellipsis")
    if "->" not in eq:
        raise Unsupported("einsum without an explicit output ('->')")
    letters: dict[str, str] = {}
    out = []
    for ch in eq:
        if ch.isalpha():
            if ch not in letters:
                if len(letters) == 26:
                    raise Unsupported("einsum with more than 26 subscripts")
                letters[ch] = chr(ord("a") + len(letters))
            out.append(letters[ch])
        else:
            out.append(ch)
    return "".join(out)


def einsum(ctx: ConversionContext, equation: str, operands):
    eq = _trt_equation(equation)
    terms = eq.split("->")[0].split(",")
    if len(terms) != len(operands):
        raise Unsupported(f"einsum {equation!r} names {len(terms)} operands, got {len(operands)}")
    tensors = [as_tensor(ctx, v, rank_=len(term), suffix=f"in{i}") for i, (v, term) in enumerate(zip(operands, terms))]
    layer = ctx.network.add_einsum(tensors, eq)
    return ctx.name(layer).get_output(0)


@converter(aten.einsum.default)
def einsum_default(ctx, node, args, kwargs):
    return einsum(ctx, args[0], list(args[1]))


def _scaled(ctx: ConversionContext, x, factor, suffix: str):
    if factor in (None, 1):
        return x
    if isinstance(x, StaticValue):
        return StaticValue(x.tensor * factor, {"op": "aten.mul.Tensor", "args": [ctx.operand(x), float(factor)],
                                               "kwargs": {}})
    return elementwise(ctx, x, float(factor), "PROD", suffix=suffix)


def addmm(ctx: ConversionContext, bias, a, b, *, beta=1, alpha=1):
    """beta * bias + alpha * (a @ b) (addmm, baddbmm): GPT-2's Conv1D is addmm(bias, x, W) with W
    laid out (in, out), multiplied without a transpose; W and bias are refittable constants."""
    layer = _matrix_multiply(ctx, a, b, "addmm", ("mat1", "mat2"))
    product = _scaled(ctx, ctx.name(layer, "matmul").get_output(0), alpha, "alpha")
    if beta == 0:
        return product
    bias = _scaled(ctx, bias, beta, "beta")
    if isinstance(bias, StaticValue):
        bias = ctx.constant(bias, rank=max(rank(a), rank(b)), suffix="bias")
    return elementwise(ctx, product, bias, "SUM")


@converter(aten.addmm.default, aten.baddbmm.default)
def addmm_default(ctx, node, args, kwargs):
    return addmm(ctx, args[0], args[1], args[2], beta=kwargs.get("beta", 1), alpha=kwargs.get("alpha", 1))
