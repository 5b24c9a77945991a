"""BatchNorm that could not be folded (a channel-wise scale layer) and LayerNorm."""
from __future__ import annotations

import torch

from ... import recipes
from ..context import ConversionContext, StaticValue
from ..registry import Unsupported, converter
from ._util import arg, rank, reshape, shape_of

aten = torch.ops.aten


def batch_norm_scale(ctx: ConversionContext, x, gamma, beta, mean, var, eps: float):
    """y = x * gamma/sqrt(var+eps) + (beta - mean*gamma/sqrt(var+eps)), as an IScaleLayer (CHANNEL)."""
    trt = ctx.trt
    for v, what in ((mean, "running_mean"), (var, "running_var")):
        if not isinstance(v, StaticValue):
            raise Unsupported(f"BatchNorm {what} must be a buffer")
    # The recipes' own arithmetic (float64, one cast to float32): every path gives the same weights.
    # Operands as the cached path sees them (its state_dict check casts floats to float32).
    t = lambda v: None if v is None else v.tensor.float()  # noqa: E731
    scale = recipes.bn_scale(gamma=t(gamma), var=t(var), eps=eps)
    shift = recipes.bn_shift(gamma=t(gamma), beta=t(beta), mean=t(mean), var=t(var), eps=eps)
    op = lambda v: None if v is None else ctx.operand(v)  # noqa: E731
    r = rank(x)
    inp = x if r >= 4 else reshape(ctx, x, shape_of(x) + (1,) * (4 - r), suffix="to4d")
    scale_w = ctx.new_weights("SCALE", scale.numpy(), "bn_scale",
                              {"gamma": op(gamma), "var": op(var)}, {"eps": eps})
    shift_w = ctx.new_weights("SHIFT", shift.numpy(), "bn_shift",
                              {"gamma": op(gamma), "beta": op(beta), "mean": op(mean), "var": op(var)},
                              {"eps": eps})
    layer = ctx.network.add_scale_nd(inp, trt.ScaleMode.CHANNEL, shift_w, scale_w, trt.Weights(), 1)
    out = ctx.name(layer).get_output(0)
    return out if r >= 4 else reshape(ctx, out, shape_of(x), suffix="from4d")


@converter(aten._native_batch_norm_legit_no_training.default)
def batch_norm(ctx, node, args, kwargs):
    # (An empty plan is falsy: test membership, never "plan and ...".)
    conv = {v: k for k, v in ctx.fusions_conv_to_bn.items()}.get(node.name)
    if conv is not None:
        return (args[0], None, None)  # folded into the convolution that feeds it
    x, gamma, beta, mean, var, _momentum, eps = args[:7]
    return (batch_norm_scale(ctx, x, gamma, beta, mean, var, float(eps)), None, None)


@converter(aten.layer_norm.default)
def layer_norm(ctx, node, args, kwargs):
    x, normalized_shape = args[0], list(args[1])
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = float(arg(args, kwargs, 4, "eps", 1e-5))
    return normalization(ctx, x, normalized_shape, weight, bias, eps)


def normalization(ctx: ConversionContext, x, normalized_shape, weight, bias, eps: float):
    r = rank(x)
    k = len(normalized_shape)
    pshape = (1,) * (r - k) + tuple(normalized_shape)
    if not all(v is None or isinstance(v, StaticValue) for v in (weight, bias)):
        raise Unsupported("LayerNorm weight/bias computed from the input are not supported")
    # Without affine parameters the scale/shift are literal ones/zeros (recorded as constants).
    scale = ctx.constant(torch.ones(pshape) if weight is None else weight, shape=pshape, suffix="weight")
    shift = ctx.constant(torch.zeros(pshape) if bias is None else bias, shape=pshape, suffix="bias")
    mask = 0
    for d in range(r - k, r):
        mask |= 1 << d
    add = getattr(ctx.network, "add_normalization", None) or ctx.network.add_normalization_v2
    layer = add(x, scale, shift, mask)
    layer.epsilon = eps
    return ctx.name(layer).get_output(0)
