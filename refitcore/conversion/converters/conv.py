"""Convolution, with eval-mode BatchNorm folded in when lowering planned it."""
from __future__ import annotations

import torch

from refitcore.conversion import recipes
from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, out_shape, rank, reshape, shape_of
from refitcore.conversion.registry import Unsupported, converter

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
                transposed: bool = False, output_padding=0, bn_node=None):
    """IConvolutionLayer, or IDeconvolutionLayer for a transposed convolution, with a following
    eval-mode BatchNorm folded in. 1-D convolutions run as 2-D ones over (L, 1) (TensorRT's
    convolutions are 2-D and 3-D), with the kernel (.., k) stored as (.., k, 1): same values.

    A transposed convolution's kernel is laid out (in, out/groups, k...) in PyTorch and in
    TensorRT (Torch-TensorRT's ``impl/deconv.py`` passes it unchanged, num_output_maps =
    out/groups * groups); its output channels are axis 1 *per group*, so a BatchNorm folds along
    axis 1 of the kernel viewed as (groups, in/groups, out/groups, k...), and the recipe says so
    (params ``axis=1``, ``groups``). ``output_padding`` extends the end of each axis: TensorRT's
    post padding is ``padding - output_padding`` (as in Torch-TensorRT)."""
    trt = ctx.trt
    if not isinstance(weight, StaticValue):
        raise Unsupported(f"{ctx.current_node.name}: convolution weights computed from the input are not supported")
    n_spatial = weight.tensor.dim() - 2
    if rank(x) != n_spatial + 2 or n_spatial not in (1, 2, 3):
        raise Unsupported(f"{ctx.current_node.name}: only 1-D, 2-D and 3-D convolutions are supported "
                          f"(input rank {rank(x)}, kernel rank {weight.tensor.dim()})")
    groups = int(groups)
    stride, padding, dilation = (_pair(v, n_spatial) for v in (stride, padding, dilation))
    output_padding = _pair(output_padding, n_spatial)
    w = weight.tensor.detach()
    out_ch = int(w.shape[1]) * groups if transposed else int(w.shape[0])
    if n_spatial == 1:  # run as 2-D over (L, 1); named before the weights below, which are the conv's
        stride, dilation = [stride[0], 1], [dilation[0], 1]
        padding, output_padding = [padding[0], 0], [output_padding[0], 0]
        x = reshape(ctx, x, shape_of(x) + (1,), suffix="to2d")
    as_2d = (lambda a: a.reshape(tuple(a.shape) + (1,))) if n_spatial == 1 else (lambda a: a)
    if bn_node is None:
        kernel = ctx.new_weights("KERNEL", as_2d(w.double()).numpy(), "copy", {"x": ctx.operand(weight)})
        bias_w = (trt.Weights() if bias is None
                  else ctx.new_weights("BIAS", bias.tensor.detach().double().numpy(), "copy", {"x": ctx.operand(bias)}))
    else:
        # The fold is the recipes' own arithmetic (float64, one cast to float32) on the operands as
        # the cached path sees them; the operands come from the graph here.
        (gamma, beta, mean, var), eps = _bn_operands(ctx, bn_node)
        fold_params = {"eps": eps, "axis": 1, "groups": groups} if transposed else {"eps": eps}
        t = lambda v: None if v is None else v.tensor.float()  # noqa: E731
        w_fold = recipes.bn_fold_kernel(weight=w.float(), gamma=t(gamma), var=t(var), **fold_params)
        b_fold = recipes.bn_fold_bias(bias=t(bias), gamma=t(gamma), beta=t(beta), mean=t(mean),
                                      var=t(var), eps=eps)
        op = lambda v: None if v is None else ctx.operand(v)  # noqa: E731
        ops = {"weight": op(weight), "bias": op(bias), "gamma": op(gamma), "beta": op(beta),
               "mean": op(mean), "var": op(var)}
        kernel = ctx.new_weights("KERNEL", as_2d(w_fold).numpy(), "bn_fold_kernel",
                                 {k: ops[k] for k in ("weight", "gamma", "var")}, fold_params)
        bias_w = ctx.new_weights("BIAS", b_fold.numpy(), "bn_fold_bias",
                                 {k: ops[k] for k in ("bias", "gamma", "beta", "mean", "var")}, {"eps": eps})
    ksize = trt.Dims(tuple(w.shape[2:]) + ((1,) if n_spatial == 1 else ()))
    add = ctx.network.add_deconvolution_nd if transposed else ctx.network.add_convolution_nd
    layer = ctx.name(add(x, out_ch, ksize, kernel, bias_w))
    layer.stride_nd = trt.Dims(tuple(stride))
    layer.dilation_nd = trt.Dims(tuple(dilation))
    layer.num_groups = groups
    if transposed:
        layer.pre_padding = trt.Dims(tuple(padding))
        layer.post_padding = trt.Dims(tuple(p - o for p, o in zip(padding, output_padding)))
    else:
        layer.padding_nd = trt.Dims(tuple(padding))
    y = layer.get_output(0)
    if n_spatial == 1:
        y = reshape(ctx, y, out_shape(ctx), suffix="to1d")
    return y


@converter(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
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
    return convolution(ctx, x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       transposed=bool(transposed), output_padding=output_padding, bn_node=ctx.fused_bn(node))


@converter(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def conv_transpose(ctx, node, args, kwargs):
    """conv_transpose{1,2,3}d(x, w, bias, stride, padding, output_padding, groups, dilation)."""
    return convolution(ctx, args[0], args[1], arg(args, kwargs, 2, "bias"), stride=arg(args, kwargs, 3, "stride", 1),
                       padding=arg(args, kwargs, 4, "padding", 0),
                       output_padding=arg(args, kwargs, 5, "output_padding", 0),
                       groups=arg(args, kwargs, 6, "groups", 1), dilation=arg(args, kwargs, 7, "dilation", 1),
                       transposed=True, bn_node=ctx.fused_bn(node))
