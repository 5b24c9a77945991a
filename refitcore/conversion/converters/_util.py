"""Small helpers shared by the converter families."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from refitcore import dtypes
from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.registry import Unsupported
from refitcore.conversion.shape_tensors import ShapeValue, dim_of, shape_vector, symbolic_dims

__all__ = ["arg", "rank", "shape_of", "as_tensor", "equalize_ranks", "reshape", "out_shape", "axes_mask",
           "trt_dtype", "promoted_dtype", "cast", "typed_constant", "torch_dtype_of", "prepend_ones", "to_fp32",
           "from_fp32"]


def arg(args: Sequence[Any], kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def shape_of(t) -> tuple[int, ...]:
    if isinstance(t, StaticValue):
        return t.shape
    return tuple(int(s) for s in t.shape)


def rank(t) -> int:
    return len(shape_of(t))


def out_shape(ctx: ConversionContext) -> tuple[int, ...]:
    """The node's output shape, -1 where it varies with a dynamic input dimension."""
    return symbolic_dims(ctx.current_node.meta["val"])


def reshape(ctx: ConversionContext, x, shape: Sequence[int], suffix: str | None = None):
    """Reshape to static ``shape``; one -1 entry (a dynamic size) is inferred by TensorRT from the
    volume. More than one cannot be told apart: converters pass a shape tensor instead
    (:func:`refitcore.conversion.converters.shape_dynamic.reshape_to`)."""
    dims = tuple(int(s) for s in shape)
    if sum(d < 0 for d in dims) > 1:
        raise Unsupported(f"reshape to {list(dims)}: more than one dynamic dimension without a shape tensor")
    layer = ctx.network.add_shuffle(x)
    layer.reshape_dims = ctx.trt.Dims(dims)
    return ctx.name(layer, suffix).get_output(0)


def prepend_ones(ctx: ConversionContext, x, k: int, suffix: str):
    """``x`` with ``k`` leading 1-dimensions (broadcast-ready), also when ``x`` has dynamic dims."""
    shp = shape_of(x)
    if sum(d < 0 for d in shp) <= 1:
        return reshape(ctx, x, (1,) * k + shp, suffix=suffix)
    dims = shape_vector(ctx, [1] * k + [dim_of(ctx, x, d) if n < 0 else n for d, n in enumerate(shp)])
    layer = ctx.network.add_shuffle(x)
    layer.set_input(1, dims)
    return ctx.name(layer, suffix).get_output(0)


def as_tensor(ctx: ConversionContext, value, *, rank_: int, suffix: str, dtype: torch.dtype | None = None):
    """An ITensor for ``value`` (ITensor, StaticValue or Python scalar) of rank ``rank_``; a
    constant gets ``dtype`` (default: the engine's float type), so it can meet an integer or boolean tensor."""
    if isinstance(value, (StaticValue, int, float, bool)):
        if dtype is not None and not dtype.is_floating_point:
            return typed_constant(ctx, value, dtype, rank=rank_, suffix=suffix)
        if isinstance(value, (int, bool)):
            value = float(value)
        return ctx.constant(value, rank=rank_, suffix=suffix)
    if isinstance(value, torch.Tensor):
        raise TypeError("internal error: raw torch.Tensor reached a converter")
    if isinstance(value, ShapeValue):  # a run-time size used as a number
        value = cast(ctx, value.tensor, torch.float32, suffix=f"{suffix}_size")
    r = rank(value)
    if r < rank_:
        return prepend_ones(ctx, value, rank_ - r, suffix=f"{suffix}_rank")
    return value


def equalize_ranks(ctx: ConversionContext, a, b, *, prefix: str | None = None):
    """TensorRT elementwise layers need inputs of equal rank and type: pad the lower rank with
    leading 1s, and bring both to PyTorch's promoted type (constants are made in that type,
    tensors of another type are cast)."""
    ra = rank(a) if not isinstance(a, (int, float, bool)) else 0
    rb = rank(b) if not isinstance(b, (int, float, bool)) else 0
    r = max(ra, rb)
    dtype = promoted_dtype(ctx, a, b)
    lhs, rhs = ("lhs", "rhs") if prefix is None else (f"{prefix}_lhs", f"{prefix}_rhs")
    a, b = (as_tensor(ctx, a, rank_=r, suffix=lhs, dtype=dtype),
            as_tensor(ctx, b, rank_=r, suffix=rhs, dtype=dtype))
    return cast(ctx, a, dtype, suffix=f"{lhs}_cast"), cast(ctx, b, dtype, suffix=f"{rhs}_cast")


def promoted_dtype(ctx: ConversionContext, *values) -> torch.dtype:
    """PyTorch's type promotion over ITensors, StaticValues and Python scalars."""
    proxies: list[Any] = []   # tensors and Python scalars: torch.result_type takes both
    for v in values:
        if isinstance(v, StaticValue):
            proxies.append(v.tensor)
        elif isinstance(v, (int, float, bool)):
            proxies.append(v)
        elif isinstance(v, ShapeValue):   # a run-time size promotes like a Python int
            proxies.append(1)
        else:
            proxies.append(torch.zeros(1, dtype=torch_dtype_of(ctx, v)))
    dtype = proxies[0] if len(proxies) == 1 else torch.result_type(*proxies[:2])
    for p in proxies[2:]:
        dtype = torch.promote_types(dtype, torch.result_type(p, torch.zeros(1, dtype=dtype)))
    if isinstance(dtype, torch.Tensor):
        dtype = dtype.dtype
    # Floating tensors and weights all have the engine's float type, whatever the graph's.
    return ctx.engine_type(dtype)


def axes_mask(dims: Sequence[int], r: int) -> int:
    mask = 0
    for d in dims:
        mask |= 1 << (d % r)
    return mask


def trt_dtype(ctx: ConversionContext, dtype: torch.dtype):
    """The TensorRT DataType of a graph tensor of ``dtype`` (floating types: the engine's float
    type); Unsupported for types TensorRT tensors cannot hold."""
    name = dtypes.trt_name(ctx.engine_type(dtype))
    if name is None:
        raise Unsupported(f"{dtype} tensors (TensorRT has no such tensor type)")
    return getattr(ctx.trt.DataType, name)


def cast(ctx: ConversionContext, x, dtype: torch.dtype, suffix: str | None = None):
    """An ICastLayer to ``dtype`` (no layer when ``x`` already has it)."""
    target = trt_dtype(ctx, dtype)
    if x.dtype == target:
        return x
    return ctx.name(ctx.network.add_cast(x, target), suffix).get_output(0)


def typed_constant(ctx: ConversionContext, value, dtype: torch.dtype, *, rank: int | None = None,
                   shape: Sequence[int] | None = None, suffix: str = "const"):
    """A constant of ``dtype``: engine weights are floating, so a non-float constant is a float32
    CONSTANT followed by a cast (exact for integers below 2**24); a floating one has the engine's type."""
    t = ctx.constant(value, rank=rank, shape=shape, suffix=suffix)
    if dtype.is_floating_point:
        return cast(ctx, t, dtype, suffix=f"{suffix}_cast")
    src = value.tensor if isinstance(value, StaticValue) else value
    if isinstance(src, torch.Tensor) and not src.is_floating_point() and src.dtype != torch.bool and src.numel() and \
            int(src.abs().max()) >= 2 ** 24:
        raise Unsupported(f"integer constant beyond 2**24 ({int(src.abs().max())}) is not exact as float32")
    return cast(ctx, t, dtype, suffix=f"{suffix}_cast")


def torch_dtype_of(ctx: ConversionContext, x) -> torch.dtype:
    """The torch dtype of an ITensor."""
    dtype = dtypes.torch_dtype(x.dtype.name)
    if dtype is None:
        raise RuntimeError(f"internal error: no torch dtype for TensorRT {x.dtype.name}")
    return dtype


def to_fp32(ctx: ConversionContext, x, suffix: str):
    """``x`` cast to float32 where the engine's float type is narrower: the input of an op that runs
    in float32 inside a reduced-precision engine (normalization statistics, softmax, sums)."""
    if x.dtype in (ctx.trt.DataType.HALF, ctx.trt.DataType.BF16):
        return ctx.name(ctx.network.add_cast(x, ctx.trt.DataType.FLOAT), suffix).get_output(0)
    return x


def from_fp32(ctx: ConversionContext, y, like, suffix: str | None = None):
    """``y`` (the float32 result of an op :func:`to_fp32` fed) cast back to ``like``'s type."""
    if y.dtype == like.dtype:
        return y
    return ctx.name(ctx.network.add_cast(y, like.dtype), suffix).get_output(0)
