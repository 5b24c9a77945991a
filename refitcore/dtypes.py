"""The one dtype table: TensorRT ``DataType`` names <-> NumPy dtypes <-> torch dtypes.

Engine weights, prototypes and plans speak TensorRT ``DataType`` names ("FLOAT", "HALF", ...);
arrays are NumPy; tensors are torch. Every translation between the three goes through here.
NumPy has no bfloat16: ``numpy_dtype("BF16")`` is None (the driver refuses such weights).
"""
from __future__ import annotations

from typing import Any, overload

import numpy as np
import torch

__all__ = ["TABLE", "TORCH_SEGMENT_TABLE", "trt_name", "numpy_dtype", "torch_dtype", "NUMPY_NAMES", "TORCH_NAMES"]

# (TensorRT DataType name, NumPy dtype name or None, torch dtype)
TABLE: tuple[tuple[str, str | None, torch.dtype], ...] = (
    ("FLOAT", "float32", torch.float32),
    ("HALF", "float16", torch.float16),
    ("BF16", None, torch.bfloat16),
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
    """The NumPy dtype of a TensorRT DataType name; None where NumPy has none (BF16) or unknown."""
    np_name = _BY_TRT.get(name, (None, None))[0]
    return None if np_name is None else np.dtype(np_name)


def torch_dtype(name: str, default: torch.dtype | None = None) -> torch.dtype | None:
    """The torch dtype of a TensorRT DataType name, else ``default``."""
    entry = _BY_TRT.get(name)
    return default if entry is None else entry[1]
