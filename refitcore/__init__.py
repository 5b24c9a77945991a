"""refitcore: compile PyTorch models into refittable TensorRT networks, refit them through a cached
weight map or a fallback conversion, and check the result against eager PyTorch."""
from __future__ import annotations

from .compile import compile
from .engine import IOSpec, RefittableEngine
from .errors import (ArchitectureMismatchError, BackendUnavailableError, BundleError, RefitCoreError, RefitError,
                     UnsupportedOperatorError, WeightMappingError)
from .weight_map import WeightMap, WeightSource

__all__ = [
    "compile", "RefittableEngine", "IOSpec", "WeightMap", "WeightSource",
    "RefitCoreError", "UnsupportedOperatorError", "ArchitectureMismatchError", "WeightMappingError",
    "RefitError", "BundleError", "BackendUnavailableError",
]
__version__ = "0.1.0"
