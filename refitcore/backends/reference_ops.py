"""Torch implementations of TensorRT layers, with TensorRT's semantics (not PyTorch's) where
they differ: elementwise inputs must have equal rank, average pooling counts padding only when
``average_count_excludes_padding`` is False, slices may have stride 0, shuffle reshape dims use 0
as "copy this dimension" when ``zero_is_placeholder``."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from refitcore.dtypes import TABLE

__all__ = ["OPS", "ELEMENTWISE_OPS", "run_layer", "run_layer_rounded"]

OPS: dict[str, Callable] = {}


def op(name: str):
    def deco(fn):
        OPS[name] = fn
        return fn
    return deco


def _mask_axes(mask: int, rank: int) -> list[int]:
    return [d for d in range(rank) if mask >> d & 1]


def _kernel_and_bias(ins, w) -> tuple:
    """A (de)convolution's kernel and bias: the layer's weights, or tensors set as its inputs 1
    and 2 (Torch-TensorRT does so when they are computed in the network, e.g. a weight norm)."""
    kernel = ins[1] if len(ins) > 1 and ins[1] is not None else w["KERNEL"]
    bias = ins[2] if len(ins) > 2 and ins[2] is not None else w.get("BIAS")
    return kernel, None if bias is None else bias.reshape(-1)


@op("CONVOLUTION")
def convolution(layer, ins, w):
    x = ins[0]
    a = layer["attrs"]
    n = len(a["kernel_size_nd"])
    kernel, bias = _kernel_and_bias(ins, w)
    kernel = kernel.reshape(int(a["num_output_maps"]), x.shape[1] // int(a["num_groups"]), *a["kernel_size_nd"])
    pre, post = a.get("pre_padding") or a["padding_nd"], a.get("post_padding") or a["padding_nd"]
    if list(pre) != list(post):
        pad = []
        for p0, p1 in zip(reversed(pre), reversed(post)):
            pad += [p0, p1]
        x = F.pad(x, pad)
        pre = [0] * n
    fn = F.conv2d if n == 2 else F.conv3d
    return [fn(x, kernel, bias, stride=a["stride_nd"], padding=list(pre), dilation=a["dilation_nd"],
               groups=int(a["num_groups"]))]


@op("DECONVOLUTION")
def deconvolution(layer, ins, w):
    """IDeconvolutionLayer: kernel (in, out/groups, k...) as PyTorch's conv_transpose; the full
    transposed convolution (in - 1) * s + d * (k - 1) + 1 long is cropped by ``pre_padding`` at
    the start and ``post_padding`` at the end (a negative post padding extends it with zeros
    before the bias: PyTorch's output_padding)."""
    x = ins[0]
    a = layer["attrs"]
    n = len(a["kernel_size_nd"])
    groups = int(a["num_groups"])
    out_maps = int(a["num_output_maps"])
    kernel, bias = _kernel_and_bias(ins, w)
    kernel = kernel.reshape(x.shape[1], out_maps // groups, *a["kernel_size_nd"])
    pre, post = list(a.get("pre_padding") or a["padding_nd"]), list(a.get("post_padding") or a["padding_nd"])
    fn = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    y = fn(x, kernel, None, stride=a["stride_nd"], dilation=a["dilation_nd"], groups=groups)
    for d in range(n):
        axis = 2 + d
        if post[d] < 0:
            shape = list(y.shape)
            shape[axis] = -post[d]
            y = torch.cat([y, torch.zeros(shape, dtype=y.dtype)], dim=axis)
        length = y.shape[axis] - pre[d] - max(post[d], 0)
        y = y.narrow(axis, pre[d], length)
    return [y if bias is None else y + bias.reshape(1, -1, *([1] * n))]


_ACT = {
    "RELU": lambda x, a, b: torch.relu(x),
    "SIGMOID": lambda x, a, b: torch.sigmoid(x),
    "TANH": lambda x, a, b: torch.tanh(x),
    "LEAKY_RELU": lambda x, a, b: F.leaky_relu(x, a),
    "ELU": lambda x, a, b: F.elu(x, a),
    "SELU": lambda x, a, b: b * torch.where(x > 0, x, a * (torch.exp(x) - 1)),
    "SOFTSIGN": lambda x, a, b: x / (1 + x.abs()),
    "SOFTPLUS": lambda x, a, b: a * torch.log1p(torch.exp(b * x)),
    "CLIP": lambda x, a, b: torch.clamp(x, a, b),
    "HARD_SIGMOID": lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0),
    "SCALED_TANH": lambda x, a, b: a * torch.tanh(b * x),
    "THRESHOLDED_RELU": lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)),
    "GELU_ERF": lambda x, a, b: F.gelu(x),
    "GELU_TANH": lambda x, a, b: F.gelu(x, approximate="tanh"),
}


@op("ACTIVATION")
def activation(layer, ins, w):
    a = layer["attrs"]
    return [_ACT[a["type"]](ins[0], float(a.get("alpha", 0.0)), float(a.get("beta", 0.0)))]


@op("POOLING")
def pooling(layer, ins, w):
    """TensorRT pooling: explicit pre/post padding (may differ), output size
    floor((in + pre + post - k) / s) + 1 (EXPLICIT_ROUND_DOWN) or ceil(...) + 1 (EXPLICIT_ROUND_UP,
    without PyTorch's ceil_mode rule that drops a last window starting in the padding). Max pooling
    ignores padding; average pooling divides by the window size, or by the number of non-padding
    elements when ``average_count_excludes_padding``."""
    a = layer["attrs"]
    x = ins[0]
    k, s = list(a["window_size_nd"]), list(a["stride_nd"])
    n = len(k)
    pre, post = list(a["pre_padding"]), list(a["post_padding"])
    mode = a.get("padding_mode") or "EXPLICIT_ROUND_DOWN"
    if mode not in ("EXPLICIT_ROUND_DOWN", "EXPLICIT_ROUND_UP"):
        raise NotImplementedError(f"layer {layer['name']!r}: pooling padding mode {mode}")
    spatial = list(x.shape[-n:])
    extra = []
    for d in range(n):
        span = spatial[d] + pre[d] + post[d] - k[d]
        out = (span // s[d] if mode == "EXPLICIT_ROUND_DOWN" else -(-span // s[d])) + 1
        extra.append(max(0, (out - 1) * s[d] + k[d] - (spatial[d] + pre[d] + post[d])))
    if a["type"] not in ("MAX", "AVERAGE"):
        raise NotImplementedError(f"layer {layer['name']!r}: pooling type {a['type']}")
    if a["type"] == "AVERAGE" and any(extra):
        raise NotImplementedError(f"layer {layer['name']!r}: average pooling windows beyond the padded input "
                                  f"(EXPLICIT_ROUND_UP) are not interpreted")
    pad = []
    for d in reversed(range(n)):
        pad += [pre[d], post[d] + extra[d]]
    pool = {2: F.max_pool2d, 3: F.max_pool3d} if a["type"] == "MAX" else {2: F.avg_pool2d, 3: F.avg_pool3d}
    if n not in pool:
        raise NotImplementedError(f"layer {layer['name']!r}: {n}-D pooling")
    if a["type"] == "MAX":
        return [pool[n](F.pad(x, pad, value=float("-inf")), k, s)]
    mean = pool[n](F.pad(x, pad), k, s)  # zero padding counted: sum / window size
    if not a["average_count_excludes_padding"]:
        return [mean]
    ones = F.pad(torch.ones((1,) * (x.dim() - n) + tuple(spatial), dtype=x.dtype), pad)
    return [mean / pool[n](ones, k, s)]  # sum / number of non-padding elements


@op("SCALE")
def scale(layer, ins, w):
    a = layer["attrs"]
    x = ins[0]
    mode = a["mode"]
    shape = [1] * x.dim()
    if mode == "CHANNEL":
        shape[a["channel_axis"]] = x.shape[a["channel_axis"]]
    elif mode == "ELEMENTWISE":
        shape = [1] + list(x.shape[1:])
    def get(role, default):
        v = w.get(role)
        return default if v is None else v.reshape(shape if mode != "UNIFORM" else [1] * x.dim())
    y = x * get("SCALE", 1.0) + get("SHIFT", 0.0)
    p = w.get("POWER")
    return [y if p is None else torch.pow(y, get("POWER", 1.0))]


# ElementWiseOperation name -> function (the plan check refuses any other at load: refitcore.backends.reference)
ELEMENTWISE_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "SUM": torch.add, "PROD": torch.mul, "SUB": torch.sub, "DIV": torch.div, "MAX": torch.maximum,
    "MIN": torch.minimum, "POW": torch.pow, "FLOOR_DIV": torch.floor_divide, "AND": torch.logical_and,
    "OR": torch.logical_or, "XOR": torch.logical_xor, "EQUAL": torch.eq, "GREATER": torch.gt, "LESS": torch.lt,
}


def _check_broadcast(layer, shapes):
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise ValueError(f"layer {layer['name']!r}: TensorRT needs equal ranks, got shapes {shapes}")
    for dims in zip(*shapes):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"layer {layer['name']!r}: shapes {shapes} do not broadcast")


@op("ELEMENTWISE")
def elementwise(layer, ins, w):
    _check_broadcast(layer, [list(t.shape) for t in ins])
    return [ELEMENTWISE_OPS[layer["attrs"]["op"]](ins[0], ins[1])]


@op("SHUFFLE")
def shuffle(layer, ins, w):
    a = layer["attrs"]
    x = ins[0]
    perm = a["first_transpose"][: x.dim()]
    x = x.permute(list(perm))   # a list: a 0-d tensor has an empty permutation
    dims = a.get("reshape_dims")
    if len(ins) > 1 and ins[1] is not None:   # reshape dimensions from a shape tensor (input 1)
        dims = [int(v) for v in ins[1].reshape(-1).tolist()]
    if dims is not None:
        dims = list(dims)
        if a.get("zero_is_placeholder", True):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        x = x.reshape(dims)
    second = a["second_transpose"][: x.dim()]
    return [x.permute(list(second))]   # a list again: the reshape may give a 0-d tensor


def _axes_input(layer, axes, rank: int, what: str) -> list[int]:
    """The axes of an (un)squeeze layer (input 1, a 1-D shape tensor), made non-negative for a
    tensor of ``rank``; an axis out of [-rank, rank) or given twice is an error, as in TensorRT."""
    values = [int(v) for v in axes.reshape(-1).tolist()]
    if any(not -rank <= v < rank for v in values):
        raise ValueError(f"layer {layer['name']!r}: {what} axes {values} out of range for rank {rank}")
    out = sorted(v % rank for v in values)
    if len(set(out)) != len(out):
        raise ValueError(f"layer {layer['name']!r}: {what} axes {values} name an axis twice")
    return out


@op("UNSQUEEZE")
def unsqueeze(layer, ins, w):
    """IUnsqueezeLayer: a size-1 axis inserted at each of the axes (input 1), which index the
    output (rank = input rank + number of axes; negative axes count from the output's end)."""
    x, axes = ins
    out_rank = x.dim() + axes.numel()
    shape = list(x.shape)
    for d in _axes_input(layer, axes, out_rank, "unsqueeze"):
        shape.insert(d, 1)
    return [x.reshape(shape)]


@op("SQUEEZE")
def squeeze(layer, ins, w):
    """ISqueezeLayer: the axes (input 1, indexing the input) removed; each must have size 1."""
    x, axes = ins
    drop = _axes_input(layer, axes, x.dim(), "squeeze")
    if any(x.shape[d] != 1 for d in drop):
        raise ValueError(f"layer {layer['name']!r}: squeeze of axes {drop} of shape {list(x.shape)} "
                         f"(each must have size 1)")
    return [x.reshape([n for d, n in enumerate(x.shape) if d not in drop])]


@op("MATRIX_MULTIPLY")
def matrix_multiply(layer, ins, w):
    a, b = ins
    op0, op1 = layer["attrs"]["op0"], layer["attrs"]["op1"]
    if op0 != "VECTOR" and op1 != "VECTOR" and a.dim() != b.dim():
        raise ValueError(f"layer {layer['name']!r}: matrix multiply needs equal ranks, got {a.dim()} and {b.dim()}")
    if op0 == "TRANSPOSE":
        a = a.transpose(-1, -2)
    if op1 == "TRANSPOSE":
        b = b.transpose(-1, -2)
    return [torch.matmul(a, b)]


@op("EINSUM")
def einsum(layer, ins, w):
    """IEinsumLayer: lowercase subscripts, explicit output, operands of equal dtype (no broadcasting
    of size-1 axes against larger ones)."""
    eq = layer["attrs"]["equation"]
    terms = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, t in zip(terms, ins):
        if len(term) != t.dim():
            raise ValueError(f"layer {layer['name']!r}: subscripts {term!r} for a rank-{t.dim()} tensor")
        for ch, n in zip(term, t.shape):
            if sizes.setdefault(ch, n) != n:
                raise ValueError(f"layer {layer['name']!r}: subscript {ch!r} has sizes {sizes[ch]} and {n}")
    return [torch.einsum(eq, *ins)]


@op("CONSTANT")
def constant(layer, ins, w):
    a = layer["attrs"]
    if "values" in a:   # an integer constant of shape arithmetic, kept in the plan
        return [torch.tensor(a["values"], dtype=_DTYPES[layer["outputs"][0]["dtype"]]).reshape(a["shape"])]
    return [w["CONSTANT"].reshape(a["shape"])]


@op("SHAPE")
def shape(layer, ins, w):
    """IShapeLayer: the input's dimensions as an INT64 vector."""
    return [torch.tensor(list(ins[0].shape), dtype=_DTYPES[layer["outputs"][0]["dtype"]])]


@op("FILL")
def fill(layer, ins, w):
    """IFillLayer LINSPACE of rank 1: out[i] = alpha + i * beta; the length comes from the shape tensor
    (input 0), alpha and beta from inputs 1 and 2 when given."""
    a = layer["attrs"]
    if a["operation"] != "LINSPACE":
        raise NotImplementedError(f"layer {layer['name']!r}: fill operation {a['operation']}")
    ins = list(ins) + [None] * (3 - len(ins))
    dims = [int(v) for v in ins[0].reshape(-1).tolist()] if ins[0] is not None else list(layer["outputs"][0]["shape"])
    if len(dims) != 1:
        raise NotImplementedError(f"layer {layer['name']!r}: LINSPACE fill of rank {len(dims)}")
    alpha = ins[1].reshape(()).item() if ins[1] is not None else a["alpha"]
    beta = ins[2].reshape(-1)[0].item() if ins[2] is not None else a["beta"]
    dtype = _DTYPES[layer["outputs"][0]["dtype"]]
    values = alpha + beta * torch.arange(dims[0], dtype=torch.float64)
    return [values.round().to(dtype) if not dtype.is_floating_point else values.to(dtype)]


# PROD is not here: reduce() takes it one axis at a time (torch.prod reduces one dimension)
_RED: dict[str, Callable[..., torch.Tensor]] = {
    "SUM": torch.sum, "MAX": torch.amax, "MIN": torch.amin, "AVG": torch.mean}


@op("REDUCE")
def reduce(layer, ins, w):
    a = layer["attrs"]
    x = ins[0]
    axes = _mask_axes(a["axes"], x.dim())
    if a["op"] == "PROD":
        y = x
        for d in sorted(axes, reverse=True):
            y = torch.prod(y, d, keepdim=a["keep_dims"])
        return [y]
    return [_RED[a["op"]](x, dim=axes, keepdim=bool(a["keep_dims"]))]


@op("NORMALIZATION")
def normalization(layer, ins, w):
    """INormalizationLayer: (x - mean) / sqrt(var + eps) over ``axes`` (biased variance), then
    scale and bias. With ``num_groups`` G != 1 the channels (axis 1) split into G groups, each
    normalized over its channels and the spatial axes, and scale/bias hold one value per group
    ([1, G, 1, ...], TensorRT's GroupNormalization shapes)."""
    x, sc, bi = ins
    a = layer["attrs"]
    axes = _mask_axes(a["axes"], x.dim())
    groups = int(a.get("num_groups", 1) or 1)
    if groups != 1:
        n, c = x.shape[:2]
        if c % groups:
            raise ValueError(f"layer {layer['name']!r}: {c} channels do not split into {groups} groups")
        xg = x.reshape(n, groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, unbiased=False, keepdim=True)
        y = ((xg - mean) / torch.sqrt(var + a["epsilon"])).reshape(x.shape)
        for name, t in (("scale", sc), ("bias", bi)):
            if t.shape[1] != groups or t.numel() != groups:
                raise ValueError(f"layer {layer['name']!r}: group normalization {name} of shape "
                                 f"{list(t.shape)}, one value per group ({groups}) expected")
        sc, bi = (t.repeat_interleave(c // groups, dim=1) for t in (sc, bi))
    else:
        mean = x.mean(dim=axes, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
        y = (x - mean) / torch.sqrt(var + a["epsilon"])
    return [y * sc + bi]


@op("CONCATENATION")
def concatenation(layer, ins, w):
    return [torch.cat(ins, dim=layer["attrs"]["axis"])]


@op("SLICE")
def slice_(layer, ins, w):
    """ISliceLayer with static or shape-tensor start/shape/stride, optionally for some ``axes``
    only. Sample modes: STRICT_BOUNDS (out of range is an
    error), WRAP (coordinates wrap modulo the axis), CLAMP (to the nearest edge), FILL (out of range
    reads the fill value, input 4, or 0), REFLECT (reflected at the middle of the edge pixels,
    repeatedly: TensorRT's Slice operator page; reflection padding)."""
    a = layer["attrs"]
    # start, size and stride may be shape tensors (inputs 1-3) instead of static attributes.
    start, size, stride = ([int(v) for v in t.reshape(-1).tolist()] if t is not None else a[k]
                           for t, k in zip(list(ins[1:4]) + [None] * (4 - len(ins)), ("start", "shape", "stride")))
    mode = a.get("mode") or "STRICT_BOUNDS"
    if mode == "DEFAULT":
        mode = "STRICT_BOUNDS"
    if mode not in ("STRICT_BOUNDS", "WRAP", "CLAMP", "FILL", "REFLECT"):
        raise NotImplementedError(f"layer {layer['name']!r}: slice mode {mode}")
    x = ins[0]
    # axes (static, or input 5): start/size/stride apply to these axes only, the others are whole
    axes = [int(v) for v in ins[5].reshape(-1).tolist()] if len(ins) > 5 and ins[5] is not None else a.get("axes")
    if axes is not None:
        if len(axes) != len(start) or any(not -x.dim() <= d < x.dim() for d in axes):
            raise ValueError(f"layer {layer['name']!r}: slice axes {axes} for {len(start)} starts of a "
                             f"rank-{x.dim()} input")
        full = [[0] * x.dim(), list(x.shape), [1] * x.dim()]
        for j, d in enumerate(axes):
            for k, values in enumerate((start, size, stride)):
                full[k][d % x.dim()] = values[j]
        start, size, stride = full
    fill = ins[4] if len(ins) > 4 and ins[4] is not None else None
    if fill is not None and fill.numel() != 1:
        raise ValueError(f"layer {layer['name']!r}: the fill value must be a scalar")
    for d, (s0, n, st) in enumerate(zip(start, size, stride)):
        size = x.shape[d]
        idx = s0 + st * torch.arange(n)
        inside = (idx >= 0) & (idx < size)
        if mode == "STRICT_BOUNDS":
            if n and not bool(inside.all()):
                raise ValueError(f"layer {layer['name']!r}: slice out of bounds on axis {d}")
        elif mode == "WRAP":
            idx = idx % size
        elif mode == "CLAMP":
            idx = idx.clamp(0, size - 1)
        elif mode == "REFLECT":   # c = |x| mod (2d - 2); 2d - 2 - c where c >= d (one pixel: repeated)
            if size == 0 and n:
                raise ValueError(f"layer {layer['name']!r}: REFLECT slice of an empty axis {d}")
            period = max(2 * size - 2, 1)
            c = idx.abs() % period
            idx = torch.where(c >= size, period - c, c) if size > 1 else torch.zeros_like(idx)
        else:  # FILL
            value = 0.0 if fill is None else fill.reshape(()).to(x.dtype)
            shape = list(x.shape)
            shape[d] = 1
            pad_slab = torch.full(shape, float(value), dtype=x.dtype)
            x = torch.cat([x, pad_slab], dim=d)
            idx = torch.where(inside, idx, torch.full_like(idx, size))  # the appended fill slab
        x = x.index_select(d, idx)
    return [x]


@op("SOFTMAX")
def softmax(layer, ins, w):
    axes = _mask_axes(layer["attrs"]["axes"], ins[0].dim())
    if len(axes) != 1:
        raise ValueError(f"layer {layer['name']!r}: softmax needs exactly one axis")
    return [torch.softmax(ins[0], dim=axes[0])]


@op("PARAMETRIC_RELU")
def parametric_relu(layer, ins, w):
    """IParametricReLULayer: x where x >= 0, slope * x elsewhere; the slope (input 1) broadcasts
    against x as an elementwise operand does (equal ranks)."""
    x, slope = ins
    _check_broadcast(layer, [list(x.shape), list(slope.shape)])
    return [torch.where(x >= 0, x, x * slope)]


# TensorRT's Attention operator page (docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/
# Attention.html) and the IAttention class reference: BMM1 = query x key^T (no scaling: a caller
# scales the query itself), then the mask (bool: True attends; float: added to BMM1's output) or
# the causal mask, then the normalization (SOFTMAX over the key/value sequence axis, or NONE), then
# BMM2 with value. Shapes [b, d_q, s_q, h] for the query and output, [b, d_kv, s_kv, h] for key and
# value (equal), the mask [a0, a1, s_q, s_kv] with a0, a1 broadcastable to b and the heads.
# CausalMaskKind: UPPER_LEFT lets query i attend key j <= i, LOWER_RIGHT j <= i + (s_kv - s_q);
# a mask cannot be combined with causal. ``decomposable`` only allows TensorRT to run it as several
# kernels: the result is the same. With fewer key/value heads than query heads (grouped-query
# attention) query head i reads key/value head i // (d_q / d_kv). The pages do not say what a query
# row whose every key is masked gives: here 0, PyTorch's scaled_dot_product_attention convention
# (softmax of only -inf would be NaN, which then spreads through every later layer of that batch
# element, e.g. the padded rows of a left-padded decoder); a mask without normalization is refused.
_ATTENTION_EXTRA_INPUTS = {4: "normalization quantize scale", 5: "query lengths", 6: "key/value lengths"}


@op("ATTENTION_INPUT")
def attention(layer, ins, w):
    a = layer["attrs"]
    name = layer["name"]
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else None
    for i, what in _ATTENTION_EXTRA_INPUTS.items():
        if len(ins) > i and ins[i] is not None:
            raise NotImplementedError(f"layer {name!r}: attention with a {what} input")
    if len(ins) > max(_ATTENTION_EXTRA_INPUTS) + 1:
        raise NotImplementedError(f"layer {name!r}: attention with {len(ins)} inputs")
    for key in ("query_form", "key_value_form"):
        if (a.get(key) or "PADDED_BHND") != "PADDED_BHND":
            raise NotImplementedError(f"layer {name!r}: attention {key} {a[key]} (only PADDED_BHND)")
    if int(a.get("num_ranks") or 1) != 1:
        raise NotImplementedError(f"layer {name!r}: multi-device attention (num_ranks={a['num_ranks']})")
    norm, causal = a.get("norm_op") or "SOFTMAX", a.get("causal_kind") or "NONE"
    if norm not in ("SOFTMAX", "NONE"):
        raise NotImplementedError(f"layer {name!r}: attention normalization {norm}")
    if causal not in ("NONE", "UPPER_LEFT", "LOWER_RIGHT"):
        raise NotImplementedError(f"layer {name!r}: causal mask kind {causal}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"layer {name!r}: attention of query {list(q.shape)}, key {list(k.shape)}, "
                         f"value {list(v.shape)}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_q % heads_kv:
        raise ValueError(f"layer {name!r}: {heads_q} query heads do not group over {heads_kv} key/value heads")
    if heads_kv != heads_q:
        k, v = (t.repeat_interleave(heads_q // heads_kv, dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2))
    s_q, s_kv = scores.shape[-2:]
    if mask is not None:
        if causal != "NONE":
            raise ValueError(f"layer {name!r}: attention with both a mask and a causal mask")
        if (mask.dim() != 4 or list(mask.shape[-2:]) != [s_q, s_kv]
                or any(m not in (1, n) for m, n in zip(mask.shape[:2], scores.shape[:2]))):
            raise ValueError(f"layer {name!r}: attention mask of shape {list(mask.shape)} for scores "
                             f"{list(scores.shape)}")
    elif causal != "NONE":
        offset = s_kv - s_q if causal == "LOWER_RIGHT" else 0
        mask = torch.ones(s_q, s_kv, dtype=torch.bool).tril(offset)
    if mask is not None:
        if norm == "NONE":   # the pages define masking through the softmax only
            raise NotImplementedError(f"layer {name!r}: a mask or causal mask without normalization")
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if norm == "SOFTMAX":
        blocked = torch.isneginf(scores).all(-1, keepdim=True)
        scores = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
    return [torch.matmul(scores, v)]


@op("ATTENTION_OUTPUT")
def attention_output(layer, ins, w):
    """The IAttention's output boundary: its ATTENTION_INPUT layer computed the attention."""
    return [ins[0]]


_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "EXP": torch.exp, "LOG": torch.log, "SQRT": torch.sqrt, "RECIP": torch.reciprocal, "ABS": torch.abs,
    "NEG": torch.neg, "SIN": torch.sin, "COS": torch.cos, "TAN": torch.tan, "SINH": torch.sinh,
    "COSH": torch.cosh, "ASIN": torch.asin, "ACOS": torch.acos, "ATAN": torch.atan, "ASINH": torch.asinh,
    "ACOSH": torch.acosh, "ATANH": torch.atanh, "CEIL": torch.ceil, "FLOOR": torch.floor, "ERF": torch.erf,
    "NOT": torch.logical_not, "SIGN": torch.sign, "ROUND": torch.round, "ISINF": torch.isinf,
    "ISNAN": torch.isnan,
}


@op("UNARY")
def unary(layer, ins, w):
    return [_UNARY[layer["attrs"]["op"]](ins[0])]


@op("IDENTITY")
def identity(layer, ins, w):
    return [ins[0].to(_DTYPES[layer["outputs"][0]["dtype"]])]


_DTYPES = {name: tdt for name, _, tdt in TABLE}


@op("CAST")
def cast(layer, ins, w):
    return [ins[0].to(_DTYPES[layer["attrs"]["to_type"]])]


@op("GATHER")
def gather(layer, ins, w):
    """IGatherLayer: DEFAULT mode gives data.shape[:axis] + indices.shape + data.shape[axis+1:];
    ELEMENT mode is torch.gather along ``axis`` (output shape = indices shape); ND mode, after
    ``num_elementwise_dims`` b leading axes shared by data and indices, reads data at the
    coordinates in the last axis of the indices (output indices.shape[:-1] + data.shape[b + k:],
    k = indices.shape[-1]). Indices outside [0, size) are an error here (the converters make
    negative indices non-negative)."""
    a = layer["attrs"]
    mode = a.get("mode") or "DEFAULT"
    data, idx = ins
    name = layer["name"]
    idx = idx.long()
    batch = int(a.get("num_elementwise_dims") or 0)
    if mode == "ND":
        return [_gather_nd(name, data, idx, batch)]
    axis = a["axis"]
    if batch:
        raise NotImplementedError(f"layer {name!r}: {mode} gather with num_elementwise_dims")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= data.shape[axis]):
        # TensorRT's Gather operator page: every index in [0, input_dimensions[axis])
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise ValueError(f"layer {name!r}: gather index {bad} out of range [0, {data.shape[axis]}) "
                         f"(TensorRT documents no negative indices: a converter must make them non-negative)")
    if mode == "ELEMENT":
        if idx.dim() != data.dim():
            raise ValueError(f"layer {name!r}: ELEMENT gather needs indices of the data's rank")
        return [torch.gather(data, axis, idx)]
    if mode != "DEFAULT":
        raise NotImplementedError(f"layer {name!r}: gather mode {mode}")
    flat = torch.index_select(data, axis, idx.reshape(-1))
    shape = list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:])
    return [flat.reshape(shape)]


def _nd_coordinates(name: str, data: torch.Tensor, idx: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Flat row numbers into ``data`` viewed as [batch volume * data.shape[b:b+k] volume, rest] of
    the coordinates in ``idx``'s last axis (after ``batch`` leading axes shared with data), and k."""
    k = idx.shape[-1]
    if list(idx.shape[:batch]) != list(data.shape[:batch]) or batch + k > data.dim():
        raise ValueError(f"layer {name!r}: ND indices {list(idx.shape)} for data {list(data.shape)} "
                         f"with {batch} element-wise axes")
    sizes = torch.tensor(data.shape[batch:batch + k])
    if idx.numel() and (bool((idx < 0).any()) or bool((idx >= sizes).any())):
        raise ValueError(f"layer {name!r}: ND index out of range {list(data.shape[batch:batch + k])}")
    strides = torch.tensor([int(torch.prod(sizes[j + 1:])) for j in range(k)], dtype=torch.long)
    rows = (idx * strides).sum(-1)   # within one batch element
    volume = int(torch.prod(sizes))
    batch_volume = int(torch.prod(torch.tensor(data.shape[:batch]))) if batch else 1
    offsets = torch.arange(batch_volume).reshape(list(data.shape[:batch]) + [1] * (rows.dim() - batch)) * volume
    return rows + offsets, k


def _gather_nd(name: str, data: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
    rows, k = _nd_coordinates(name, data, idx, batch)
    rest = list(data.shape[batch + k:])
    table = data.reshape([-1] + rest)
    return table[rows.reshape(-1)].reshape(list(idx.shape[:-1]) + rest)


@op("SCATTER")
def scatter(layer, ins, w):
    """IScatterLayer (TensorRT's Scatter operator page): the data with elements replaced by the
    updates. ELEMENT: output[... index[i] along ``axis`` ...] = updates[i] (torch.scatter);
    ND: the coordinates in the last axis of the indices (k of them) address slices of
    data.shape[k:], each replaced by the matching slice of the updates. Duplicate coordinates
    leave the order of writes unspecified (TensorRT's words): a network relying on it is refused."""
    data, idx, updates = ins
    a = layer["attrs"]
    mode, name = a.get("mode") or "ELEMENT", layer["name"]
    idx = idx.long()
    if mode == "ELEMENT":
        axis = int(a.get("axis") or 0)
        if idx.shape != updates.shape or idx.dim() != data.dim():
            raise ValueError(f"layer {name!r}: ELEMENT scatter of updates {list(updates.shape)} at indices "
                             f"{list(idx.shape)} into {list(data.shape)}")
        n = data.shape[axis]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"layer {name!r}: scatter index out of range [0, {n})")
        writes = torch.zeros(data.shape, dtype=torch.long).scatter_add_(axis, idx, torch.ones_like(idx))
        if bool((writes > 1).any()):
            raise ValueError(f"layer {name!r}: scatter writes one element twice (TensorRT leaves the result "
                             f"unspecified)")
        return [data.scatter(axis, idx, updates.to(data.dtype))]
    if mode != "ND":
        raise NotImplementedError(f"layer {name!r}: scatter mode {mode}")
    rows, k = _nd_coordinates(name, data, idx, 0)
    rest = list(data.shape[k:])
    rows = rows.reshape(-1)
    if len(set(rows.tolist())) != rows.numel():
        raise ValueError(f"layer {name!r}: scatter writes one slice twice (TensorRT leaves the result unspecified)")
    out = data.reshape([-1] + rest).clone()
    out[rows] = updates.reshape([-1] + rest).to(data.dtype)
    return [out.reshape(data.shape)]


@op("NON_ZERO")
def non_zero(layer, ins, w):
    """INonZeroLayer: the coordinates of the non-zero elements, [rank, count], in row-major order,
    of the layer's index type."""
    dtype = _DTYPES[layer["outputs"][0]["dtype"]]
    return [torch.nonzero(ins[0]).t().contiguous().to(dtype)]


@op("SELECT")
def select(layer, ins, w):
    cond, a, b = ins
    _check_broadcast(layer, [list(t.shape) for t in ins])
    return [torch.where(cond.bool(), a, b)]


@op("PADDING")
def padding(layer, ins, w):
    a = layer["attrs"]
    pad = []
    for p0, p1 in zip(reversed(a["pre_padding_nd"]), reversed(a["post_padding_nd"])):
        pad += [p0, p1]
    return [F.pad(ins[0], pad)]


def _resize_source(layer, out_len: int, in_len: int, a: dict) -> torch.Tensor:
    """Input coordinates of each output index on one axis, by TensorRT's coordinate transformation
    (float64, so the reference does not add rounding of its own)."""
    x = torch.arange(out_len, dtype=torch.float64)
    ct = a.get("coordinate_transformation") or "ASYMMETRIC"
    if out_len == 1 and (a.get("selector_for_single_pixel") == "UPPER"):
        return torch.zeros(1, dtype=torch.float64)
    if ct == "ALIGN_CORNERS":
        if out_len == 1:
            raise ValueError(f"layer {layer['name']!r}: ALIGN_CORNERS to one pixel with the FORMULA selector")
        return x * (in_len - 1) / (out_len - 1)
    if ct == "ASYMMETRIC":
        return x * in_len / out_len
    if ct == "HALF_PIXEL":
        return (x + 0.5) * in_len / out_len - 0.5
    raise NotImplementedError(f"layer {layer['name']!r}: coordinate transformation {ct}")


_ROUND = {"FLOOR": torch.floor, "CEIL": torch.ceil, "HALF_UP": lambda v: torch.floor(v + 0.5),
          "HALF_DOWN": lambda v: torch.ceil(v - 0.5)}


def _resize_shape(layer, ins) -> list[int]:
    """The output shape of an IResizeLayer: a shape tensor (input 1), the static ``shape``, or the
    static ``scales``, where each output length is floor(input length * scale), computed in float32
    as TensorRT's own shape inference does (float64 differs, e.g. 20 * 2.3f gives 46 in float32,
    45 in float64)."""
    a = layer["attrs"]
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:
        shape = [int(v) for v in ins[1].reshape(-1).tolist()]
    elif len(a.get("shape") or []) == x.dim():
        shape = list(a["shape"])
    elif len(a.get("scales") or []) == x.dim():
        scaled = torch.tensor(list(x.shape), dtype=torch.float32) * torch.tensor(a["scales"], dtype=torch.float32)
        shape = [int(v) for v in torch.floor(scaled).tolist()]
    else:
        raise ValueError(f"layer {layer['name']!r}: a resize needs an output shape or one scale per axis "
                         f"of its rank-{x.dim()} input (shape={a.get('shape')}, scales={a.get('scales')})")
    if len(shape) != x.dim() or any(n < 0 for n in shape):
        raise ValueError(f"layer {layer['name']!r}: resize of a rank-{x.dim()} input to shape {shape}")
    return shape


def _cubic_weights(t: torch.Tensor, coeff: float) -> torch.Tensor:
    """Keys' cubic convolution weights of the 4 neighbours floor(x) - 1 .. floor(x) + 2 of a source
    coordinate x with fraction t = x - floor(x), for the coefficient A (``cubic_coeff``)."""
    def kernel(d):
        d = d.abs()
        near = ((coeff + 2) * d - (coeff + 3)) * d * d + 1
        far = ((coeff * d - 5 * coeff) * d + 8 * coeff) * d - 4 * coeff
        return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))
    return torch.stack([kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)], dim=-1)


_RESIZE_AXES = {"NEAREST": 8, "LINEAR": 3, "CUBIC": 2}


@op("RESIZE")
def resize(layer, ins, w):
    """IResizeLayer (output shape from a shape tensor, the static shape or the scales): each axis
    whose length changes is resampled separately, the source coordinate of an output index given
    by the coordinate transformation from the input and output lengths (TensorRT's
    ResizeCoordinateTransformation formulas use the lengths, not the scales). NEAREST: the
    source coordinate rounded by ``nearest_rounding``, clamped into the input; LINEAR: the two
    neighbours of the coordinate clamped into [0, len - 1], weighted by distance; CUBIC (the 2
    innermost axes): the 4 neighbours, weighted by Keys' cubic kernel with ``cubic_coeff``, indices
    clamped to the edge, or, with ``exclude_outside``, neighbours outside the input weighted 0 and
    the rest renormalized (the definitions of ONNX Resize, whose attributes TensorRT's mirror)."""
    a = layer["attrs"]
    x = ins[0]
    shape = _resize_shape(layer, ins)
    mode = a.get("resize_mode") or "NEAREST"
    if mode not in _RESIZE_AXES:
        raise NotImplementedError(f"layer {layer['name']!r}: resize mode {mode}")
    changed = [d for d in range(x.dim()) if shape[d] != x.shape[d]]
    if changed and changed[0] < x.dim() - _RESIZE_AXES[mode]:
        raise ValueError(f"layer {layer['name']!r}: TensorRT's {mode} resize changes at most the "
                         f"{_RESIZE_AXES[mode]} innermost axes, not axis {changed[0]} of {list(x.shape)}")
    y = x
    for d in changed:
        src = _resize_source(layer, shape[d], x.shape[d], a)
        n = x.shape[d]
        view = [1] * y.dim()
        view[d] = -1
        if mode == "NEAREST":
            rounding = a.get("nearest_rounding") or "FLOOR"
            if rounding not in _ROUND:
                raise NotImplementedError(f"layer {layer['name']!r}: nearest rounding {rounding}")
            idx = _ROUND[rounding](src).long().clamp(0, n - 1)
            y = y.index_select(d, idx)
        elif mode == "LINEAR":
            src = src.clamp(0, n - 1)
            i0 = src.floor().long()
            i1 = (i0 + 1).clamp(max=n - 1)
            frac = (src - i0).to(y.dtype).reshape(view)
            y = y.index_select(d, i0) * (1 - frac) + y.index_select(d, i1) * frac
        else:  # CUBIC
            base = src.floor()
            weights = _cubic_weights(src - base, float(a.get("cubic_coeff", -0.75)))
            taps = base.long().unsqueeze(-1) + torch.arange(-1, 3)
            if a.get("exclude_outside"):
                weights = torch.where((taps >= 0) & (taps < n), weights, torch.zeros_like(weights))
                weights = weights / weights.sum(-1, keepdim=True)
            taps = taps.clamp(0, n - 1)
            out = None
            for j in range(4):
                term = y.index_select(d, taps[:, j]) * weights[:, j].to(y.dtype).reshape(view)
                out = term if out is None else out + term
            y = out
    return [y]


# TensorRT's GridSample operator page
# (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/GridSample.html):
# interpolation NEAREST / LINEAR, out-of-bound locations read 0 (FILL), the nearest border value
# (CLAMP) or are reflected by the borders until inbounds (REFLECT); align_corners maps -1 and 1 to
# the centres of the corner pixels (True) or to their outer edges (False). These are the
# definitions of F.grid_sample's modes, which the interpreter therefore calls.
_GRID_MODES = {"NEAREST": "nearest", "LINEAR": "bilinear"}
_GRID_PADDING = {"FILL": "zeros", "CLAMP": "border", "REFLECT": "reflection"}


@op("GRID_SAMPLE")
def grid_sample(layer, ins, w):
    """IGridSampleLayer: input [N, C, H, W], grid [N, H_out, W_out, 2] (x, y in [-1, 1])."""
    a = layer["attrs"]
    x, grid = ins
    mode, padding = a.get("interpolation_mode") or "LINEAR", a.get("sample_mode") or "FILL"
    if mode not in _GRID_MODES or padding not in _GRID_PADDING:
        raise NotImplementedError(f"layer {layer['name']!r}: grid sample {mode} with sample mode {padding}")
    if x.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != x.shape[0]:
        raise ValueError(f"layer {layer['name']!r}: grid sample of {list(x.shape)} at a grid {list(grid.shape)}")
    return [F.grid_sample(x, grid.to(x.dtype), mode=_GRID_MODES[mode], padding_mode=_GRID_PADDING[padding],
                          align_corners=bool(a.get("align_corners")))]


@op("CUMULATIVE")
def cumulative(layer, ins, w):
    """ICumulativeLayer SUM along the axis in input 1 (a 0-D tensor): forward/reverse,
    inclusive (y[j] = x[0..j]) or exclusive (x[0..j-1])."""
    a = layer["attrs"]
    x, axis = ins
    if a.get("op", "SUM") != "SUM":
        raise NotImplementedError(f"layer {layer['name']!r}: cumulative op {a['op']}")
    if axis.dim() != 0:
        raise ValueError(f"layer {layer['name']!r}: the axis must be a 0-D tensor")
    d = int(axis) % x.dim()
    y = x.flip(d) if a.get("reverse") else x
    y = torch.cumsum(y, d)
    if a.get("exclusive"):
        y = y - (x.flip(d) if a.get("reverse") else x)
    return [y.flip(d) if a.get("reverse") else y]


@op("TOPK")
def topk(layer, ins, w):
    """ITopKLayer: the k largest (MAX, descending) or smallest (MIN, ascending) along the one axis
    in ``axes``; indices of the layer's ``indices_type`` (int32 by default)."""
    a = layer["attrs"]
    x = ins[0]
    axes = _mask_axes(a["axes"], x.dim())
    if len(axes) != 1:
        raise ValueError(f"layer {layer['name']!r}: top-k needs exactly one axis")
    values, indices = torch.topk(x, int(a["k"]), dim=axes[0], largest=a["op"] == "MAX", sorted=True)
    return [values, indices.to(_DTYPES[layer["outputs"][1]["dtype"]])]   # indices_type: INT32 or INT64


def _loop_boundary(layer, ins, w):
    raise ValueError(f"layer {layer['name']!r}: a {layer['type']} layer runs only as part of its loop "
                     f"{layer['attrs'].get('loop')!r} (refitcore.backends.reference runs loops)")


for _kind in ("TRIP_LIMIT", "ITERATOR", "RECURRENCE", "LOOP_OUTPUT"):
    OPS[_kind] = _loop_boundary


def run_layer(layer: dict, ins: list, weights: dict):
    try:
        fn = OPS[layer["type"]]
    except KeyError:
        raise NotImplementedError(f"reference backend: no interpreter for layer type {layer['type']}") from None
    return fn(layer, ins, weights)




_NARROW = (torch.float16, torch.bfloat16)


def _widened(value):
    return value.to(torch.float32) if isinstance(value, torch.Tensor) and value.dtype in _NARROW else value


def run_layer_rounded(layer: dict, ins: list, weights: dict):
    """:func:`run_layer` with reduced precision emulated at the layer's boundary: HALF/BF16 inputs
    and weights widened (exactly) to float32, the layer computed in float32 (a matrix multiply or
    convolution accumulates in float32), each output rounded once to the type the network declares
    for it. A float32 layer runs as it is."""
    if layer["type"] == "CONSTANT" or (
            not any(isinstance(v, torch.Tensor) and v.dtype in _NARROW for v in list(ins) + list(weights.values()))
            and not any(o.get("dtype") in ("HALF", "BF16") for o in layer["outputs"])):
        # A constant's output is its weights, of their own type: nothing is computed, nothing rounded
        # (and no widened copy of every HALF/BF16 weight is held while the network runs).
        return run_layer(layer, ins, weights)
    outs = run_layer(layer, [_widened(v) for v in ins], {k: _widened(v) for k, v in weights.items()})
    return [v.to(_DTYPES[spec["dtype"]]) if spec.get("dtype") in ("HALF", "BF16") and v.dtype != _DTYPES[spec["dtype"]]
            else v for v, spec in zip(outs, layer["outputs"])]
