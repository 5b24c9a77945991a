"""Reshapes, permutations, slicing, concatenation and pass-through ops."""
from __future__ import annotations

import operator

import torch

from refitcore.conversion.context import ConversionContext
from refitcore.conversion.converters._util import arg, as_tensor, out_shape, rank, reshape, shape_of
from refitcore.conversion.converters.shape_dynamic import (
    expand_dynamic,
    is_dynamic,
    reshape_to_meta,
    same_shape,
    slice_dynamic,
)
from refitcore.conversion.registry import Unsupported, converter
from refitcore.conversion.shape_tensors import dim_of, shape_vector

aten = torch.ops.aten


@converter(operator.getitem)
def getitem(ctx, node, args, kwargs):
    return args[0][args[1]]


@converter(aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh_copy.default,
           aten.detach.default)
def passthrough(ctx, node, args, kwargs):
    return args[0]


@converter(aten.dropout.default)
def dropout(ctx, node, args, kwargs):
    return args[0]  # exported in eval mode: identity


@converter(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
           aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
           aten.unflatten.int)
def view(ctx, node, args, kwargs):
    if is_dynamic(ctx, args[0]):
        if same_shape(node.meta["val"], node.args[0].meta["val"]):
            return args[0]
        return reshape_to_meta(ctx, args[0])
    shape = out_shape(ctx)
    if shape == shape_of(args[0]):
        return args[0]
    return reshape(ctx, args[0], shape)


def permute(ctx: ConversionContext, x, perm):
    r = rank(x)
    layer = ctx.network.add_shuffle(x)
    layer.first_transpose = ctx.trt.Permutation([p % r for p in perm])
    return ctx.name(layer).get_output(0)


@converter(aten.permute.default)
def permute_default(ctx, node, args, kwargs):
    return permute(ctx, args[0], list(args[1]))


@converter(aten.transpose.int, aten.swapaxes.default)
def transpose(ctx, node, args, kwargs):
    r = rank(args[0])
    perm = list(range(r))
    d0, d1 = args[1] % r, args[2] % r
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute(ctx, args[0], perm)


@converter(aten.t.default)
def t(ctx, node, args, kwargs):
    return permute(ctx, args[0], [1, 0]) if rank(args[0]) == 2 else args[0]


def slice_(ctx: ConversionContext, x, start, shape, stride, suffix=None):
    """A static ISliceLayer; a -1 in ``shape`` keeps a whole dynamic axis (start 0, stride 1), its
    size then read from the input's shape at run time."""
    trt = ctx.trt
    sizes = None
    if any(s < 0 for s in shape):
        if any(s < 0 and (b != 0 or st != 1) for s, b, st in zip(shape, start, stride)):
            raise Unsupported("a strided or offset slice along a dynamic dimension")
        sizes = shape_vector(ctx, [dim_of(ctx, x, d) if s < 0 else s for d, s in enumerate(shape)])
    layer = ctx.network.add_slice(x, trt.Dims(tuple(start)), trt.Dims(tuple(max(s, 1) for s in shape)),
                                  trt.Dims(tuple(stride)))
    if sizes is not None:
        layer.set_input(2, sizes)
    return ctx.name(layer, suffix).get_output(0)


@converter(aten.slice.Tensor)
def slice_tensor(ctx, node, args, kwargs):
    x = args[0]
    shp = shape_of(x)
    r = len(shp)
    dim = arg(args, kwargs, 1, "dim", 0) % r
    start = arg(args, kwargs, 2, "start", None) or 0
    step = arg(args, kwargs, 4, "step", 1)
    if is_dynamic(ctx, x, start):
        if same_shape(node.meta["val"], node.args[0].meta["val"]) and start == 0 and step == 1:
            return x
        return slice_dynamic(ctx, x, dim, start, step)
    if start < 0:
        start += shp[dim]
    start = max(0, min(start, shp[dim]))
    out = out_shape(ctx)
    if out == shp:
        return x
    starts = [0] * r
    starts[dim] = start
    strides = [1] * r
    strides[dim] = step
    return slice_(ctx, x, starts, out, strides)


@converter(aten.select.int)
def select(ctx, node, args, kwargs):
    x, dim, index = args[0], args[1], args[2]
    shp = shape_of(x)
    dim %= len(shp)
    if shp[dim] >= 0:
        index %= shp[dim]
    elif index < 0:
        raise Unsupported(f"select of index {index} from the end of dynamic dimension {dim}")
    starts = [0] * len(shp)
    starts[dim] = index
    size = list(shp)
    size[dim] = 1
    y = slice_(ctx, x, starts, size, [1] * len(shp), suffix="slice")
    if is_dynamic(ctx, x):
        return reshape_to_meta(ctx, y)
    return reshape(ctx, y, out_shape(ctx))


def _split(ctx, x, sizes, dim):
    shp = shape_of(x)
    dim %= len(shp)
    if shp[dim] < 0:
        raise Unsupported(f"split/unbind along dynamic dimension {dim}")
    outs, offset = [], 0
    for i, size in enumerate(sizes):
        starts = [0] * len(shp)
        starts[dim] = offset
        shape = list(shp)
        shape[dim] = size
        outs.append(slice_(ctx, x, starts, shape, [1] * len(shp), suffix=f"part{i}"))
        offset += size
    return outs


@converter(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def split(ctx, node, args, kwargs):
    x = args[0]
    dim = arg(args, kwargs, 2, "dim", 0)
    sizes = [int(v.shape[dim]) for v in node.meta["val"]]
    return _split(ctx, x, sizes, dim)


@converter(aten.cat.default)
def cat(ctx, node, args, kwargs):
    dim = arg(args, kwargs, 1, "dim", 0)
    r = len(out_shape(ctx))
    # torch.cat skips 1-D tensors of size 0 whatever the others' rank (a transformers DynamicCache's
    # first update concatenates onto one); TensorRT has no such rule.
    vals = [getattr(n, "meta", {}).get("val") for n in node.args[0]]
    skip = [r != 1 and isinstance(v, torch.Tensor) and tuple(v.shape) == (0,) for v in vals]
    tensors = [t for t, s in zip(args[0], skip) if not s] if not all(skip) else list(args[0])
    tensors = [as_tensor(ctx, t, rank_=r, suffix=f"in{i}") for i, t in enumerate(tensors)]
    layer = ctx.network.add_concatenation(tensors)
    layer.axis = dim % r
    return ctx.name(layer).get_output(0)


@converter(aten.expand.default)
def expand(ctx, node, args, kwargs):
    x = args[0]
    out = out_shape(ctx)
    x = as_tensor(ctx, x, rank_=len(out), suffix="src", dtype=node.meta["val"].dtype)
    shp = shape_of(x)
    if is_dynamic(ctx, x):
        if same_shape(node.meta["val"], node.args[0].meta["val"]):
            return x
        return expand_dynamic(ctx, x)
    if shp == out:
        return x
    # A slice with stride 0 along a size-1 axis repeats it (TensorRT ISliceLayer semantics).
    strides = [0 if s == 1 and o != 1 else 1 for s, o in zip(shp, out)]
    return slice_(ctx, x, [0] * len(out), out, strides)



def _slice_mode(ctx: ConversionContext, x, start, shape, mode: str, *, fill=None, suffix=None):
    """An ISliceLayer in ``mode`` (SampleMode WRAP or FILL): out-of-range coordinates wrap around, or
    read ``fill`` (a literal scalar constant, input 4)."""
    trt = ctx.trt
    fill_value = None if fill is None else ctx.constant(torch.tensor(float(fill)), shape=(), suffix="fill")
    sizes = None
    if any(s < 0 for s in shape):  # whole dynamic axes (start 0): their size comes from the input
        sizes = shape_vector(ctx, [dim_of(ctx, x, d) if s < 0 else s for d, s in enumerate(shape)])
    layer = ctx.network.add_slice(x, trt.Dims(tuple(start)), trt.Dims(tuple(max(s, 1) for s in shape)),
                                  trt.Dims((1,) * len(shape)))
    if sizes is not None:
        layer.set_input(2, sizes)
    layer.mode = getattr(trt.SampleMode, mode)
    if fill_value is not None:
        layer.set_input(4, fill_value)
    return ctx.name(layer, suffix).get_output(0)


def roll(ctx: ConversionContext, x, shifts, dims):
    """torch.roll as one wrapping slice: out[i] = x[(i - shift) mod n] on each rolled axis."""
    shp = shape_of(x)
    r = len(shp)
    if not dims:
        raise Unsupported("roll without dims (flattened roll)")
    if any(shp[d % r] < 0 for d in dims):
        raise Unsupported("roll along a dynamic dimension")
    start = [0] * r
    for s, d in zip(shifts, dims):
        d %= r
        start[d] = (start[d] - s) % shp[d]
    if not any(start):
        return x
    return _slice_mode(ctx, x, start, shp, "WRAP")


@converter(aten.roll.default)
def roll_default(ctx, node, args, kwargs):
    shifts = arg(args, kwargs, 1, "shifts")
    dims = arg(args, kwargs, 2, "dims", [])
    shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        raise Unsupported("roll without dims (flattened roll)")
    if len(shifts) != len(dims):
        raise Unsupported(f"roll with {len(shifts)} shifts for {len(dims)} dims")
    return roll(ctx, args[0], shifts, dims)


def constant_pad(ctx: ConversionContext, x, pad, value: float = 0.0):
    """F.pad(mode='constant') as a FILL slice starting at -pre (negative pads crop)."""
    shp = shape_of(x)
    r = len(shp)
    if len(pad) % 2 or len(pad) // 2 > r:
        raise Unsupported(f"pad of length {len(pad)} for a rank-{r} tensor")
    start, shape = [0] * r, list(shp)
    for i in range(len(pad) // 2):  # pad lists (pre, post) pairs from the last axis backwards
        d = r - 1 - i
        if shp[d] < 0 and (pad[2 * i] or pad[2 * i + 1]):
            raise Unsupported(f"padding along dynamic dimension {d}")
        start[d] = -int(pad[2 * i])
        shape[d] = shp[d] + int(pad[2 * i]) + int(pad[2 * i + 1])
    if not any(start) and tuple(shape) == shp:
        return x
    # The fill value is always given (input 4), so nothing rests on TensorRT's default for it.
    return _slice_mode(ctx, x, start, shape, "FILL", fill=value)


@converter(aten.constant_pad_nd.default)
def constant_pad_nd(ctx, node, args, kwargs):
    return constant_pad(ctx, args[0], list(args[1]), float(arg(args, kwargs, 2, "value", 0.0)))


@converter(aten.pad.default)
def pad_default(ctx, node, args, kwargs):
    mode = arg(args, kwargs, 2, "mode", "constant")
    if mode != "constant":
        raise Unsupported(f"pad mode {mode!r}")
    return constant_pad(ctx, args[0], list(args[1]), float(arg(args, kwargs, 3, "value", None) or 0.0))


@converter(aten.stack.default)
def stack(ctx, node, args, kwargs):
    tensors = list(args[0])
    out = out_shape(ctx)
    r = len(out)
    dim = arg(args, kwargs, 1, "dim", 0) % r
    one = out[:dim] + (1,) + out[dim + 1:]
    parts = [reshape(ctx, as_tensor(ctx, t, rank_=r - 1, suffix=f"in{i}"), one, suffix=f"unsqueeze{i}")
             for i, t in enumerate(tensors)]
    layer = ctx.network.add_concatenation(parts)
    layer.axis = dim
    return ctx.name(layer).get_output(0)


@converter(aten.unbind.int)
def unbind(ctx, node, args, kwargs):
    x = args[0]
    shp = shape_of(x)
    dim = arg(args, kwargs, 1, "dim", 0) % len(shp)
    parts = _split(ctx, x, [1] * shp[dim], dim)
    return [reshape(ctx, p, shp[:dim] + shp[dim + 1:], suffix=f"squeeze{i}") for i, p in enumerate(parts)]


def repeat(ctx: ConversionContext, x, repeats):
    """Tensor.repeat / torch.tile: one WRAP slice over the output shape (out[i] = x[i mod n]
    on every axis), after padding the input's rank with leading 1s."""
    shp = shape_of(x)
    r = max(len(repeats), len(shp))
    repeats = [1] * (r - len(repeats)) + list(repeats)
    if len(shp) < r:
        x = reshape(ctx, x, (1,) * (r - len(shp)) + shp, suffix="rank")
        shp = shape_of(x)
    out = [s * k for s, k in zip(shp, repeats)]
    if list(shp) == out:
        return x
    return _slice_mode(ctx, x, [0] * r, out, "WRAP")


@converter(aten.repeat.default, aten.tile.default)
def repeat_default(ctx, node, args, kwargs):
    return repeat(ctx, args[0], list(args[1]))


def pixel_shuffle(ctx: ConversionContext, x, factor: int, inverse: bool = False):
    """pixel_shuffle: (N.., C*r*r, H, W) -> view (N.., C, r, r, H, W) -> permute to
    (N.., C, H, r, W, r) -> (N.., C, H*r, W*r); pixel_unshuffle is the inverse. One shuffle layer
    (reshape then second transpose) and one reshape."""
    shp = shape_of(x)
    lead, (c, h, w) = shp[:-3], shp[-3:]
    k = len(lead)
    r = int(factor)
    if inverse:
        split = lead + (c, h // r, r, w // r, r)
        perm = list(range(k + 1)) + [k + 2, k + 4, k + 1, k + 3]
        final = lead + (c * r * r, h // r, w // r)
    else:
        split = lead + (c // (r * r), r, r, h, w)
        perm = list(range(k + 1)) + [k + 3, k + 1, k + 4, k + 2]
        final = lead + (c // (r * r), h * r, w * r)
    layer = ctx.network.add_shuffle(x)
    layer.reshape_dims = ctx.trt.Dims(split)
    layer.second_transpose = ctx.trt.Permutation(perm)
    y = ctx.name(layer, "split").get_output(0)
    return reshape(ctx, y, final)


@converter(aten.pixel_shuffle.default)
def pixel_shuffle_default(ctx, node, args, kwargs):
    return pixel_shuffle(ctx, args[0], args[1])


@converter(aten.pixel_unshuffle.default)
def pixel_unshuffle_default(ctx, node, args, kwargs):
    return pixel_shuffle(ctx, args[0], args[1], inverse=True)
