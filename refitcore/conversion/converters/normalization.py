"""BatchNorm that could not be folded (a channel-wise scale layer) and LayerNorm."""
from __future__ import annotations

import torch

from refitcore.conversion import recipes
from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, from_fp32, rank, reshape, shape_of, to_fp32
from refitcore.conversion.registry import Unsupported, converter

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
    # Dynamic dims: 0 copies the input's dimension (zero_is_placeholder), exact for any size.
    kept = tuple(0 if d < 0 else d for d in shape_of(x))
    inp = x if r >= 4 else reshape(ctx, x, kept + (1,) * (4 - r), suffix="to4d")
    scale_w = ctx.new_weights("SCALE", scale.numpy(), "bn_scale",
                              {"gamma": op(gamma), "var": op(var)}, {"eps": eps})
    shift_w = ctx.new_weights("SHIFT", shift.numpy(), "bn_shift",
                              {"gamma": op(gamma), "beta": op(beta), "mean": op(mean), "var": op(var)},
                              {"eps": eps})
    # TensorRT requires scale, shift and the (empty) power weights of one type: in an fp16/bf16 engine
    # an empty FLOAT power makes addScaleNd refuse the layer ("scale.type == shift.type && shift.type ==
    # power.type").
    layer = ctx.network.add_scale_nd(inp, trt.ScaleMode.CHANNEL, shift_w, scale_w, trt.Weights(scale_w.dtype), 1)
    out = ctx.name(layer).get_output(0)
    return out if r >= 4 else reshape(ctx, out, kept, suffix="from4d")


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
    return _normalize(ctx, x, scale, shift, mask, eps)


def _normalize(ctx: ConversionContext, x, scale, shift, axes: int, eps: float, num_groups: int = 1,
               suffix: str | None = None):
    """An INormalizationLayer; in a reduced-precision engine its input, scale and shift (weights
    stored in the engine's type) are cast to float32 and its output back: the statistics in float32."""
    src = to_fp32(ctx, x, "fp32_in")
    narrow = src is not x
    if narrow:
        scale, shift = to_fp32(ctx, scale, "scale_fp32"), to_fp32(ctx, shift, "shift_fp32")
    add = getattr(ctx.network, "add_normalization", None) or ctx.network.add_normalization_v2
    layer = add(src, scale, shift, axes)
    layer.epsilon = float(eps)
    if num_groups != 1:
        layer.num_groups = int(num_groups)
    y = ctx.name(layer, f"{suffix or 'normalize'}_fp32" if narrow else suffix).get_output(0)
    return from_fp32(ctx, y, x, suffix)


def _affine_constant(ctx: ConversionContext, value, default: float, shape, suffix: str):
    """A refittable constant of ``shape`` holding ``value`` (a parameter), or a literal of
    ``default`` when the module has no affine parameter."""
    if value is not None and not isinstance(value, StaticValue):
        raise Unsupported("normalization weight/bias computed from the input are not supported")
    return ctx.constant(torch.full(tuple(shape), default) if value is None else value, shape=shape, suffix=suffix)


def group_norm(ctx: ConversionContext, x, num_groups: int, weight, bias, eps: float):
    """GroupNorm as TensorRT's INormalizationLayer with ``num_groups``, then PyTorch's per-channel
    affine as two elementwise layers. TensorRT's group normalization takes scale and bias per
    *group* ([1, G, 1, ...]; https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Normalization.html,
    "GroupNormalization"), PyTorch's are per channel, so the layer gets literal ones and zeros and
    the parameters are refittable constants [1, C, 1, ...] applied after it (as Torch-TensorRT's
    ``native_group_norm`` does)."""
    r = rank(x)
    channels = shape_of(x)[1]
    if r < 3:
        raise Unsupported(f"group_norm on a rank-{r} input (N, C, ... with spatial axes expected)")
    if channels % num_groups:
        raise Unsupported(f"group_norm with {channels} channels in {num_groups} groups")
    group_shape = (1, num_groups) + (1,) * (r - 2)
    ones = ctx.constant(torch.ones(group_shape), suffix="group_scale")
    zeros = ctx.constant(torch.zeros(group_shape), suffix="group_shift")
    # One group is a plain normalization over channels and spatial axes; with G groups TensorRT
    # takes the spatial axes and splits the channels itself.
    y = _normalize(ctx, x, ones, zeros, sum(1 << d for d in range(1 if num_groups == 1 else 2, r)), eps,
                   num_groups=num_groups, suffix="normalize")
    return _channel_affine(ctx, y, weight, bias)


def _channel_affine(ctx: ConversionContext, y, weight, bias):
    """y * weight + bias with per-channel [1, C, 1, ...] refittable constants (skipped when absent)."""
    trt = ctx.trt
    r, channels = rank(y), shape_of(y)[1]
    pshape = (1, channels) + (1,) * (r - 2)
    if weight is not None:
        w = _affine_constant(ctx, weight, 1.0, pshape, "weight")
        y = ctx.name(ctx.network.add_elementwise(y, w, trt.ElementWiseOperation.PROD),
                     "scale" if bias is not None else None).get_output(0)
    if bias is not None:
        b = _affine_constant(ctx, bias, 0.0, pshape, "bias")
        y = ctx.name(ctx.network.add_elementwise(y, b, trt.ElementWiseOperation.SUM)).get_output(0)
    if weight is None and bias is None:
        y = ctx.name(ctx.network.add_identity(y)).get_output(0)
    return y


@converter(aten.group_norm.default)
def group_norm_default(ctx, node, args, kwargs):
    return group_norm(ctx, args[0], int(args[1]), arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"),
                      float(arg(args, kwargs, 4, "eps", 1e-5)))


def instance_norm(ctx: ConversionContext, x, weight, bias, eps: float):
    """InstanceNorm (statistics of the input) as an INormalizationLayer over the spatial axes with
    per-channel scale and bias [1, C, 1, ...] (TensorRT's InstanceNormalization shapes), both
    refittable constants."""
    r = rank(x)
    if r < 3:
        raise Unsupported(f"instance_norm on a rank-{r} input")
    pshape = (1, shape_of(x)[1]) + (1,) * (r - 2)
    scale = _affine_constant(ctx, weight, 1.0, pshape, "weight")
    shift = _affine_constant(ctx, bias, 0.0, pshape, "bias")
    return _normalize(ctx, x, scale, shift, sum(1 << d for d in range(2, r)), eps)


def _input_stats(node) -> str | None:
    use_input_stats = arg(node.args, node.kwargs, 5, "use_input_stats", True)
    return None if use_input_stats else "instance_norm with running statistics (use_input_stats=False)"


@converter(aten.instance_norm.default, capability=_input_stats)
def instance_norm_default(ctx, node, args, kwargs):
    return instance_norm(ctx, args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias"),
                         float(arg(args, kwargs, 7, "eps", 1e-5)))


def rms_norm(ctx: ConversionContext, x, normalized_shape, weight, eps: float):
    """x / sqrt(mean(x^2 over the last axes) + eps) * weight, in elementwise and reduce layers."""
    trt = ctx.trt
    r, k = rank(x), len(normalized_shape)
    like, x = x, to_fp32(ctx, x, "fp32_in")   # the statistics in float32 in a reduced-precision engine
    narrow = x is not like
    sq = ctx.name(ctx.network.add_elementwise(x, x, trt.ElementWiseOperation.PROD), "square").get_output(0)
    mean = ctx.name(ctx.network.add_reduce(sq, trt.ReduceOperation.AVG, sum(1 << d for d in range(r - k, r)), True),
                    "mean").get_output(0)
    eps_t = ctx.constant(torch.tensor(float(eps)), rank=r, suffix="eps", dtype=torch.float32 if narrow else None)
    var = ctx.name(ctx.network.add_elementwise(mean, eps_t, trt.ElementWiseOperation.SUM), "add_eps").get_output(0)
    root = ctx.name(ctx.network.add_unary(var, trt.UnaryOperation.SQRT), "sqrt").get_output(0)
    y = ctx.name(ctx.network.add_elementwise(x, root, trt.ElementWiseOperation.DIV),
                 "normalize" if weight is not None or narrow else None).get_output(0)
    y = from_fp32(ctx, y, like, "normalized" if weight is not None else None)
    if weight is None:
        return y
    w = _affine_constant(ctx, weight, 1.0, (1,) * (r - k) + tuple(normalized_shape), "weight")
    return ctx.name(ctx.network.add_elementwise(y, w, trt.ElementWiseOperation.PROD)).get_output(0)


@converter(aten.rms_norm.default)
def rms_norm_default(ctx, node, args, kwargs):
    eps = arg(args, kwargs, 3, "eps")
    if eps is None:  # PyTorch's default: the machine epsilon of the input's type
        eps = torch.finfo(node.args[0].meta["val"].dtype).eps
    return rms_norm(ctx, args[0], list(args[1]), arg(args, kwargs, 2, "weight"), float(eps))
