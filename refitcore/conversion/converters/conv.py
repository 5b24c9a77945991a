"""Convolution, with eval-mode BatchNorm folded in when lowering planned it."""
from __future__ import annotations

import torch

from ... import recipes
from ..context import ConversionContext, StaticValue
from ..registry import Unsupported, converter
from ._util import arg, rank

aten = torch.ops.aten


def _pair(v, n: int):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _bn_operands(ctx: ConversionContext, bn_node):
    """(gamma, beta, mean, var) StaticValues or None, and eps, of a BatchNorm node."""
    vals = [ctx.value(a) for a in bn_node.args[1:5]]
    eps = float(bn_node.args[6])
    for v, what in zip(vals[2:], ("running_mean", "running_var")):
        if not isinstance(v, StaticValue):
            raise Unsupported(f"BatchNorm {bn_node.name}: {what} must be a buffer, not computed from the input")
    return vals, eps


def convolution(ctx: ConversionContext, x, weight: StaticValue, bias, *, stride, padding, dilation, groups,
                bn_node=None):
    trt = ctx.trt
    if not isinstance(weight, StaticValue):
        raise Unsupported(f"{ctx.node.name}: convolution weights computed from the input are not supported")
    n_spatial = weight.tensor.dim() - 2
    if rank(x) != n_spatial + 2 or n_spatial not in (2, 3):
        raise Unsupported(f"{ctx.node.name}: only 2-D and 3-D convolutions are supported "
                        f"(input rank {rank(x)}, kernel rank {weight.tensor.dim()})")
    w = weight.tensor.detach()
    out_ch = int(w.shape[0])
    if bn_node is None:
        kernel = ctx.new_weights("KERNEL", w.double().numpy(), "copy", {"x": ctx.operand(weight)})
        bias_w = (trt.Weights() if bias is None
                  else ctx.new_weights("BIAS", bias.tensor.detach().double().numpy(), "copy", {"x": ctx.operand(bias)}))
    else:
        # The fold is the recipes' own arithmetic (float64, one cast to float32) on the operands as
        # the cached path sees them (its state_dict check casts floats to float32): compile, cached
        # and fallback give bit-identical engine weights. The operands come from the graph here.
        (gamma, beta, mean, var), eps = _bn_operands(ctx, bn_node)
        t = lambda v: None if v is None else v.tensor.float()  # noqa: E731
        w_fold = recipes.bn_fold_kernel(weight=w.float(), gamma=t(gamma), var=t(var), eps=eps)
        b_fold = recipes.bn_fold_bias(bias=t(bias), gamma=t(gamma), beta=t(beta), mean=t(mean),
                                      var=t(var), eps=eps)
        op = lambda v: None if v is None else ctx.operand(v)  # noqa: E731
        ops = {"weight": op(weight), "bias": op(bias), "gamma": op(gamma), "beta": op(beta),
               "mean": op(mean), "var": op(var)}
        kernel = ctx.new_weights("KERNEL", w_fold.numpy(), "bn_fold_kernel",
                                 {k: ops[k] for k in ("weight", "gamma", "var")}, {"eps": eps})
        bias_w = ctx.new_weights("BIAS", b_fold.numpy(), "bn_fold_bias",
                                 {k: ops[k] for k in ("bias", "gamma", "beta", "mean", "var")}, {"eps": eps})
    layer = ctx.name(ctx.network.add_convolution_nd(x, out_ch, trt.Dims(tuple(w.shape[2:])), kernel, bias_w))
    layer.stride_nd = trt.Dims(tuple(_pair(stride, n_spatial)))
    layer.padding_nd = trt.Dims(tuple(_pair(padding, n_spatial)))
    layer.dilation_nd = trt.Dims(tuple(_pair(dilation, n_spatial)))
    layer.num_groups = int(groups)
    return layer.get_output(0)


@converter(aten.conv2d.default, aten.conv3d.default)
def conv_nd(ctx, node, args, kwargs):
    if isinstance(arg(args, kwargs, 4, "padding", 0), str):
        raise Unsupported("string padding is not supported")
    return convolution(ctx, args[0], args[1], arg(args, kwargs, 2, "bias"),
                       stride=arg(args, kwargs, 3, "stride", 1), padding=arg(args, kwargs, 4, "padding", 0),
                       dilation=arg(args, kwargs, 5, "dilation", 1), groups=arg(args, kwargs, 6, "groups", 1),
                       bn_node=ctx.fused_bn(node))


@converter(aten.convolution.default)
def convolution_default(ctx, node, args, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    if transposed:
        raise Unsupported("transposed convolution is not supported")
    return convolution(ctx, x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       bn_node=ctx.fused_bn(node))
