"""Activations: one TensorRT activation layer each, or a product for the gated ones."""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext
from refitcore.conversion.converters._util import arg, axes_mask, from_fp32, rank, to_fp32
from refitcore.conversion.registry import Unsupported, converter

aten = torch.ops.aten


def activation(ctx: ConversionContext, x, kind: str, *, alpha: float | None = None, beta: float | None = None,
               suffix: str | None = None):
    layer = ctx.network.add_activation(x, getattr(ctx.trt.ActivationType, kind))
    if alpha is not None:
        layer.alpha = float(alpha)
    if beta is not None:
        layer.beta = float(beta)
    return ctx.name(layer, suffix).get_output(0)


def gated(ctx: ConversionContext, x, kind: str, **params):
    """x * act(x) (SiLU, hardswish)."""
    gate = activation(ctx, x, kind, suffix="gate", **params)
    layer = ctx.network.add_elementwise(x, gate, ctx.trt.ElementWiseOperation.PROD)
    return ctx.name(layer).get_output(0)


@converter(aten.relu.default)
def relu(ctx, node, args, kwargs):
    return activation(ctx, args[0], "RELU")


@converter(aten.sigmoid.default)
def sigmoid(ctx, node, args, kwargs):
    return activation(ctx, args[0], "SIGMOID")


@converter(aten.tanh.default)
def tanh(ctx, node, args, kwargs):
    return activation(ctx, args[0], "TANH")


@converter(aten.gelu.default)
def gelu(ctx, node, args, kwargs):
    approximate = arg(args, kwargs, 1, "approximate", "none")
    return activation(ctx, args[0], "GELU_TANH" if approximate == "tanh" else "GELU_ERF")


@converter(aten.hardtanh.default)
def hardtanh(ctx, node, args, kwargs):
    return activation(ctx, args[0], "CLIP", alpha=arg(args, kwargs, 1, "min_val", -1.0),
                      beta=arg(args, kwargs, 2, "max_val", 1.0))


@converter(aten.clamp.default)
def clamp(ctx, node, args, kwargs):
    lo, hi = arg(args, kwargs, 1, "min"), arg(args, kwargs, 2, "max")
    if lo is None or hi is None:
        raise Unsupported("clamp needs both bounds here")
    return activation(ctx, args[0], "CLIP", alpha=lo, beta=hi)


# PyTorch hardsigmoid(x) = relu6(x + 3) / 6 = clip(x/6 + 1/2, 0, 1): TensorRT's
# HARD_SIGMOID is max(0, min(1, alpha*x + beta)).
@converter(aten.hardsigmoid.default)
def hardsigmoid(ctx, node, args, kwargs):
    return activation(ctx, args[0], "HARD_SIGMOID", alpha=1.0 / 6.0, beta=0.5)


@converter(aten.hardswish.default)
def hardswish(ctx, node, args, kwargs):
    return gated(ctx, args[0], "HARD_SIGMOID", alpha=1.0 / 6.0, beta=0.5)


@converter(aten.silu.default)
def silu(ctx, node, args, kwargs):
    return gated(ctx, args[0], "SIGMOID")


@converter(aten.leaky_relu.default)
def leaky_relu(ctx, node, args, kwargs):
    return activation(ctx, args[0], "LEAKY_RELU", alpha=arg(args, kwargs, 1, "negative_slope", 0.01))


@converter(aten.elu.default)
def elu(ctx, node, args, kwargs):
    if arg(args, kwargs, 2, "scale", 1) != 1 or arg(args, kwargs, 3, "input_scale", 1) != 1:
        raise Unsupported("elu with scale/input_scale is not supported")
    return activation(ctx, args[0], "ELU", alpha=arg(args, kwargs, 1, "alpha", 1.0))


def softmax(ctx: ConversionContext, x, dim: int, *, suffix: str | None = None):
    """Softmax along one axis (ISoftMaxLayer, axes given as a bit mask), in float32 inside a
    reduced-precision engine."""
    r = rank(x)
    if r == 0:
        raise Unsupported("softmax of a 0-d tensor")
    tag = f"{suffix}_" if suffix else ""
    src = to_fp32(ctx, x, f"{tag}fp32_in")
    layer = ctx.network.add_softmax(src)
    layer.axes = 1 << (int(dim) % r)
    y = ctx.name(layer, suffix if src is x else f"{tag}softmax").get_output(0)
    return from_fp32(ctx, y, x, suffix)


def log_softmax(ctx: ConversionContext, x, dim: int):
    """log_softmax(x) = (x - max) - log(sum(exp(x - max))) along one axis: the shifted form PyTorch
    computes, finite wherever x is (log of a softmax layer would give -inf where exp underflows)."""
    trt = ctx.trt
    r = rank(x)
    if r == 0:
        raise Unsupported("log_softmax of a 0-d tensor")
    like, x = x, to_fp32(ctx, x, "fp32_in")   # in float32 inside a reduced-precision engine
    axes = axes_mask([int(dim)], r)
    peak = ctx.name(ctx.network.add_reduce(x, trt.ReduceOperation.MAX, axes, True), "max").get_output(0)
    shifted = ctx.name(ctx.network.add_elementwise(x, peak, trt.ElementWiseOperation.SUB), "shift").get_output(0)
    exp = ctx.name(ctx.network.add_unary(shifted, trt.UnaryOperation.EXP), "exp").get_output(0)
    total = ctx.name(ctx.network.add_reduce(exp, trt.ReduceOperation.SUM, axes, True), "sum").get_output(0)
    log_total = ctx.name(ctx.network.add_unary(total, trt.UnaryOperation.LOG), "log").get_output(0)
    y = ctx.name(ctx.network.add_elementwise(shifted, log_total, trt.ElementWiseOperation.SUB),
                 "log_softmax" if x is not like else None).get_output(0)
    return from_fp32(ctx, y, like)


def _check_float_softmax(node) -> str | None:
    name = "log_softmax" if node.target in (aten._log_softmax.default, aten.log_softmax.int) else "softmax"
    typed = node.target in (aten.softmax.int, aten.log_softmax.int)
    dtype = node.args[2] if typed and len(node.args) > 2 else node.kwargs.get("dtype")
    if not typed and node.args[2]:
        return f"half_to_float {name}"
    if dtype not in (None, torch.float32):
        return f"{name} with dtype={dtype}"
    return None


@converter(aten._softmax.default, aten.softmax.int, capability=_check_float_softmax)
def softmax_default(ctx, node, args, kwargs):
    return softmax(ctx, args[0], args[1])


@converter(aten._log_softmax.default, aten.log_softmax.int, capability=_check_float_softmax)
def log_softmax_default(ctx, node, args, kwargs):
    return log_softmax(ctx, args[0], args[1])
