"""Pooling and spatial means.

TensorRT's average pooling excludes padding from the count by default
(``average_count_excludes_padding`` is True); PyTorch's avg_pool2d includes it by default
(``count_include_pad=True``), so the flag is always set explicitly.
"""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext
from refitcore.conversion.converters._util import arg, axes_mask, from_fp32, out_shape, rank, reshape, shape_of, to_fp32
from refitcore.conversion.registry import Unsupported, converter

aten = torch.ops.aten


def _pair(v, n=2):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _ceil_extra(size: int, k: int, s: int, p: int) -> int:
    """Extra post padding that PyTorch's ceil_mode adds on one axis: the output is
    ceil((size + 2p - k) / s) + 1, less one when the last window would start in the right padding
    (it must start inside the input or its left padding)."""
    out = -(-(size + 2 * p - k) // s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return max(0, (out - 1) * s + k - (size + 2 * p))


def pooling(ctx: ConversionContext, x, kind: str, kernel, stride, padding, *, ceil_mode=False,
            count_include_pad=True, n: int = 2):
    """TensorRT pooling over the last ``n`` axes with explicit pre/post padding. PyTorch's
    ceil_mode becomes extra post padding (TensorRT's EXPLICIT_ROUND_UP lacks PyTorch's
    last-window rule, so it is not used). TensorRT pools 2-D and 3-D windows: a 1-D pooling runs
    as a 2-D one over (L, 1)."""
    trt = ctx.trt
    kernel = _pair(kernel, n)
    stride = _pair(stride or kernel, n)
    padding = _pair(padding, n)
    if n == 1:
        x2 = reshape(ctx, x, shape_of(x) + (1,), suffix="to2d")
        y = pooling(ctx, x2, kind, kernel + [1], stride + [1], padding + [0], ceil_mode=ceil_mode,
                    count_include_pad=count_include_pad, n=2)
        return reshape(ctx, y, shape_of(y)[:-1], suffix="to1d")
    if rank(x) < n + 1:
        raise Unsupported(f"pooling over {n} axes needs an input of rank >= {n + 1}")
    spatial = shape_of(x)[-n:]
    if ceil_mode and any(d < 0 for d in spatial):
        raise Unsupported("ceil_mode pooling over a dynamic spatial dimension")
    extra = [_ceil_extra(spatial[d], kernel[d], stride[d], padding[d]) if ceil_mode else 0 for d in range(n)]
    exclude_padding = not count_include_pad
    if kind == "AVERAGE" and any(extra):
        if any(padding) and count_include_pad:
            # PyTorch counts the symmetric padding but not the ceil_mode overhang: no single
            # TensorRT pooling divisor does both.
            raise Unsupported("ceil_mode average pooling with padding and count_include_pad=True")
        exclude_padding = True  # the overhang is the only padding, and PyTorch does not count it
    layer = ctx.network.add_pooling_nd(x, getattr(trt.PoolingType, kind), trt.Dims(tuple(kernel)))
    layer.stride_nd = trt.Dims(tuple(stride))
    layer.pre_padding = trt.Dims(tuple(padding))
    layer.post_padding = trt.Dims(tuple(p + e for p, e in zip(padding, extra)))
    if kind == "AVERAGE":
        layer.average_count_excludes_padding = exclude_padding
    return ctx.name(layer).get_output(0)


def reduce_mean(ctx: ConversionContext, x, dims, keepdim: bool):
    r = rank(x)
    src = to_fp32(ctx, x, "fp32_in")   # a mean accumulates: float32 in a reduced-precision engine
    layer = ctx.network.add_reduce(src, ctx.trt.ReduceOperation.AVG, axes_mask(dims, r), bool(keepdim))
    return from_fp32(ctx, ctx.name(layer, "mean" if src is not x else None).get_output(0), x)


_SPATIAL = {aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3,
            aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


@converter(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def max_pool(ctx, node, args, kwargs):
    n = _SPATIAL[node.target]
    if any(d != 1 for d in _pair(arg(args, kwargs, 4, "dilation", 1), n)):
        raise Unsupported("dilated max pooling is not supported")
    return pooling(ctx, args[0], "MAX", args[1], arg(args, kwargs, 2, "stride", None),
                   arg(args, kwargs, 3, "padding", 0), ceil_mode=arg(args, kwargs, 5, "ceil_mode", False), n=n)


@converter(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool(ctx, node, args, kwargs):
    n = _SPATIAL[node.target]
    if arg(args, kwargs, 6, "divisor_override") is not None:
        raise Unsupported(f"avg_pool{n}d divisor_override is not supported")
    return pooling(ctx, args[0], "AVERAGE", args[1], arg(args, kwargs, 2, "stride", None),
                   arg(args, kwargs, 3, "padding", 0), ceil_mode=arg(args, kwargs, 4, "ceil_mode", False),
                   count_include_pad=arg(args, kwargs, 5, "count_include_pad", True), n=n)


@converter(aten.adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(ctx, node, args, kwargs):
    x, out_hw = args[0], _pair(args[1])
    h, w = shape_of(x)[-2:]
    if out_hw == [1, 1]:
        return reduce_mean(ctx, x, [-2, -1], True)
    if h < 0 or w < 0:
        raise Unsupported(f"adaptive pooling of a dynamic spatial size to {out_hw} (only to 1x1)")
    if h % out_hw[0] == 0 and w % out_hw[1] == 0:
        k = [h // out_hw[0], w // out_hw[1]]
        return pooling(ctx, x, "AVERAGE", k, k, 0)
    return adaptive_avg_matmul(ctx, x, h, w, out_hw)


@converter(aten.adaptive_avg_pool1d.default)
def adaptive_avg_pool1d(ctx, node, args, kwargs):
    """As a 2-D adaptive pooling over (L, 1)."""
    x, size = args[0], _pair(args[1], 1)[0]
    x2 = reshape(ctx, x, shape_of(x) + (1,), suffix="to2d")
    length = shape_of(x)[-1]
    if size == 1:
        y = reduce_mean(ctx, x2, [-2], True)
    elif length % size == 0:
        y = pooling(ctx, x2, "AVERAGE", [length // size, 1], [length // size, 1], 0)
    else:
        y = adaptive_avg_matmul(ctx, x2, length, 1, [size, 1])
    return reshape(ctx, y, out_shape(ctx), suffix="to1d")


def _even_3d(node) -> str | None:
    d, h, w = node.args[0].meta["val"].shape[-3:]
    out = _pair(node.args[1], 3)
    if out == [1, 1, 1] or all(int(s) % o == 0 for s, o in zip((d, h, w), out)):
        return None
    return f"adaptive_avg_pool3d to {out} from {[int(d), int(h), int(w)]} (uneven windows)"


@converter(aten.adaptive_avg_pool3d.default, capability=_even_3d)
def adaptive_avg_pool3d(ctx, node, args, kwargs):
    x, out = args[0], _pair(args[1], 3)
    if out == [1, 1, 1]:
        return reduce_mean(ctx, x, [-3, -2, -1], True)
    k = [s // o for s, o in zip(shape_of(x)[-3:], out)]
    return pooling(ctx, x, "AVERAGE", k, k, 0, n=3)


def adaptive_window_matrix(size: int, out: int) -> torch.Tensor:
    """[out, size] averaging matrix: row i averages input [floor(i*size/out), ceil((i+1)*size/out))."""
    m = torch.zeros(out, size)
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_matmul(ctx: ConversionContext, x, h: int, w: int, out_hw):
    """Uneven windows: adaptive average pooling is separable, y = A_h @ x @ A_w^T with literal
    averaging matrices (exact, also when the output is larger than the input)."""
    trt = ctx.trt
    r = rank(x)
    a_w = ctx.constant(adaptive_window_matrix(w, out_hw[1]).t().contiguous(), rank=r, suffix="cols")
    a_h = ctx.constant(adaptive_window_matrix(h, out_hw[0]), rank=r, suffix="rows")
    cols = ctx.network.add_matrix_multiply(x, trt.MatrixOperation.NONE, a_w, trt.MatrixOperation.NONE)
    y = ctx.name(cols, "w").get_output(0)
    rows = ctx.network.add_matrix_multiply(a_h, trt.MatrixOperation.NONE, y, trt.MatrixOperation.NONE)
    return ctx.name(rows).get_output(0)


@converter(aten.mean.dim)
def mean_dim(ctx, node, args, kwargs):
    dims = arg(args, kwargs, 1, "dim")
    if dims is None:
        dims = list(range(rank(args[0])))
    return reduce_mean(ctx, args[0], dims if isinstance(dims, (list, tuple)) else [dims],
                       arg(args, kwargs, 2, "keepdim", False))
