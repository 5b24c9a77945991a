"""The TensorRT backend (real engines on a CUDA GPU)."""
from __future__ import annotations

import functools

from .. import _trt

__all__ = ["NAME", "usable", "build"]

NAME = "tensorrt"


@functools.lru_cache(maxsize=1)
def usable() -> tuple[bool, str]:
    """Whether this machine can build *and run* a TensorRT engine, and why not."""
    if not _trt.available():
        try:
            _trt.trt()
        except _trt.TensorRTUnavailableError as err:
            return False, str(err)
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    return False, "the TensorRT backend is not implemented yet"


def build(result, **options):
    ok, reason = usable()
    raise RuntimeError(f"TensorRT backend unavailable: {reason}")
