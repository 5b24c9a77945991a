"""Shared fixtures of the backend tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def real_trt():
    """The TensorRT Python API module (``tensorrt`` or ``tensorrt_rtx``); skips where none imports."""
    from refitcore import _trt

    if not _trt.available():
        pytest.skip("no TensorRT Python API importable (pip install 'pytest-trtrefit[rtx]')")
    return _trt.trt()
