"""The one dtype table: TensorRT ``DataType`` names <-> NumPy dtypes <-> torch dtypes.

Engine weights, prototypes and plans speak TensorRT ``DataType`` names ("FLOAT", "HALF", ...);
arrays are NumPy; tensors are torch. Every translation between the three goes through here.
NumPy has no bfloat16: a BF16 array is its bit patterns as ``uint16`` (``numpy_dtype("BF16")``;
TensorRT has no UINT16 type, so the two never meet). :func:`to_numpy` and :func:`as_torch` translate,
:func:`as_float` reads such an array as numbers, :func:`round_to` rounds once to an engine dtype.
"""
from __future__ import annotations

import warnings
from typing import Any, overload

import numpy as np
import torch

__all__ = ["TABLE", "TORCH_SEGMENT_TABLE", "trt_name", "numpy_dtype", "torch_dtype", "NUMPY_NAMES", "TORCH_NAMES",
           "PRECISIONS", "precision_dtype", "model_precision", "round_to", "saturate_sentinels",
           "SENTINEL_MAGNITUDE", "to_numpy", "as_torch", "as_float"]

# (TensorRT DataType name, NumPy dtype name or None, torch dtype)
TABLE: tuple[tuple[str, str | None, torch.dtype], ...] = (
    ("FLOAT", "float32", torch.float32),
    ("HALF", "float16", torch.float16),
    ("BF16", "uint16", torch.bfloat16),   # bit patterns (NumPy has no bfloat16)
    ("INT32", "int32", torch.int32),
    ("INT64", "int64", torch.int64),
    ("BOOL", "bool", torch.bool),
    ("INT8", "int8", torch.int8),
    ("UINT8", "uint8", torch.uint8),
)

# Not TensorRT types: the parameters and buffers of a partitioned engine's PyTorch segments
# (refitcore.engine.segmented) are stored and refitted in their own dtype, under these names. They never
# name a network tensor (``trt_name`` does not return them).
TORCH_SEGMENT_TABLE: tuple[tuple[str, str, torch.dtype], ...] = (
    ("DOUBLE", "float64", torch.float64),
    ("COMPLEX64", "complex64", torch.complex64),
    ("COMPLEX128", "complex128", torch.complex128),
)

_BY_TRT = {trt: (np_name, tdt) for trt, np_name, tdt in TABLE + TORCH_SEGMENT_TABLE}
_BY_NUMPY = {np_name: trt for trt, np_name, _ in TABLE if np_name is not None}
_BY_TORCH = {tdt: trt for trt, _, tdt in TABLE}
NUMPY_NAMES = tuple(_BY_NUMPY) + tuple(np_name for _, np_name, _ in TORCH_SEGMENT_TABLE)   # stored buffers
TORCH_NAMES = tuple(str(tdt).replace("torch.", "") for _, _, tdt in TABLE)   # "float32", "bfloat16", ...


@overload
def trt_name(dtype: Any, default: str) -> str: ...
@overload
def trt_name(dtype: Any, default: None = None) -> str | None: ...
def trt_name(dtype: Any, default: str | None = None) -> str | None:
    """The TensorRT DataType name of a NumPy or torch dtype (or dtype name), else ``default``."""
    if isinstance(dtype, torch.dtype):
        return _BY_TORCH.get(dtype, default)
    try:
        return _BY_NUMPY.get(np.dtype(dtype).name, default)
    except (TypeError, ValueError):
        return default


def numpy_dtype(name: str) -> np.dtype | None:
    """The NumPy dtype of a TensorRT DataType name (BF16: ``uint16`` bit patterns); None if unknown."""
    np_name = _BY_TRT.get(name, (None, None))[0]
    return None if np_name is None else np.dtype(np_name)


def torch_dtype(name: str, default: torch.dtype | None = None) -> torch.dtype | None:
    """The torch dtype of a TensorRT DataType name, else ``default``."""
    entry = _BY_TRT.get(name)
    return default if entry is None else entry[1]


# Engine precisions (``compile(precision=...)``) -> the torch dtype of the network's floating tensors.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    """The floating dtype of an engine of ``precision`` ('fp32', 'fp16', 'bf16'); ValueError otherwise."""
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}") from None


def model_precision(model: torch.nn.Module) -> str:
    """The precision a model computes in: 'fp16' or 'bf16' when every floating parameter (a model
    without parameters: every floating buffer) is float16, or every one bfloat16 (``model.half()``,
    ``model.to(torch.bfloat16)``, a checkpoint loaded in bf16); 'fp32' otherwise (float32, float64, a
    mix of dtypes, no floating tensors). ``compile(precision=None)`` compiles at this precision."""
    floating = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if not floating:
        floating = {t.dtype for t in model.buffers() if t.is_floating_point()}
    if len(floating) == 1:
        (dtype,) = floating
        return next((name for name, d in PRECISIONS.items() if d == dtype and name != "fp32"), "fp32")
    return "fp32"


def _round_to_odd_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded to odd (toward zero, then the last bit set where inexact): rounding
    that once more to a format of at most 22 significand bits (bfloat16's 8) is the correctly
    rounded result of the float64 value, which rounding to nearest twice is not."""
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != x
    f = torch.where(inexact & (back.abs() > x.abs()), torch.nextafter(f, torch.zeros_like(f)), f)
    bits = f.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


# float32 code masks with ``torch.finfo(torch.float32).min`` (transformers' attention masks, T5's
# position bias): a value that means "minus infinity, but finite". Finite values of at least
# SENTINEL_MAGNITUDE (2**127, within a factor of two of float32's largest finite value) are read as such
# a sentinel, not as a number: in a narrower engine dtype they become that dtype's own sentinel
# (``finfo(dtype).min`` / ``.max``, what the same code writes when the model runs in that dtype), where
# rounding would make them inf (and a mask row of -inf makes softmax NaN). A weight's own values never
# come near (a refit refuses anything beyond float16's 65504 in a float16 engine, see
# refitcore.refitting.validate.precision_problems), so the rule only ever meets such masks; folded
# with a weight (``bias + finfo.min`` is ``finfo.min`` in float32) they stay sentinels. docs/precision.md.
SENTINEL_MAGNITUDE = 2.0 ** 127


def saturate_sentinels(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` with its mask sentinels (finite values of magnitude >= :data:`SENTINEL_MAGNITUDE`) replaced by
    ``dtype``'s largest finite value of the same sign, where ``dtype`` cannot hold them; ``t`` itself
    (not a copy) when it has none."""
    wide = torch.finfo(torch.float32).max
    if not (t.is_floating_point() and dtype.is_floating_point) or torch.finfo(dtype).max >= wide:
        return t
    if t.numel() == 0 or torch.finfo(t.dtype).max < SENTINEL_MAGNITUDE:
        return t
    mag = t.abs()
    sentinel = (mag >= SENTINEL_MAGNITUDE) & (mag <= wide)
    if not bool(sentinel.any()):
        return t
    top = torch.finfo(dtype).max
    return torch.where(sentinel, torch.where(t > 0, top, -top).to(t.dtype), t)


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded ONCE to ``dtype`` (to nearest, ties to even): the correctly rounded value of
    what ``t`` holds, also from float64 (torch rounds float64 -> float16/bfloat16 through float32,
    twice). Engine weights of every refit path and of compile are rounded here. Mask sentinels
    (float32's ``finfo.min``, see :data:`SENTINEL_MAGNITUDE`) become ``dtype``'s own."""
    if t.dtype == dtype or not (t.is_floating_point() and dtype.is_floating_point):
        return t.to(dtype)
    t = saturate_sentinels(t, dtype)
    if t.dtype == torch.float64 and dtype == torch.float16:
        return torch.from_numpy(t.detach().cpu().numpy().astype(np.float16))   # NumPy rounds float64 -> half once
    if t.dtype == torch.float64 and dtype == torch.bfloat16:
        return _round_to_odd_f32(t.detach()).to(torch.bfloat16)
    return t.to(dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a NumPy array; bfloat16 as its ``uint16`` bit patterns (shares memory)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def as_torch(arr: np.ndarray) -> torch.Tensor:
    """A NumPy array as a tensor; ``uint16`` arrays are bfloat16 bit patterns (shares memory where it can).
    A read-only array (an engine weight that is a view of a mapped checkpoint) gives a tensor that
    must only be read: callers read weights, never write them, so torch's warning about it is
    silenced here rather than paid for with a copy."""
    arr = np.asarray(arr)
    bf16 = arr.dtype == np.uint16
    if bf16:
        arr = np.ascontiguousarray(arr).view(np.int16)
    if arr.flags.writeable:
        t = torch.from_numpy(arr)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if bf16 else t


def as_float(arr: np.ndarray) -> np.ndarray:
    """A weight array as numbers NumPy can compute with: bfloat16 bit patterns as float32 (exact),
    other arrays as they are."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint16:
        return as_torch(arr).to(torch.float32).numpy()
    return arr
