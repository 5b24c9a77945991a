"""refitcore: compile PyTorch models into refittable TensorRT networks, refit them through a cached
weight map or a fallback conversion, and check the result against eager PyTorch."""
from __future__ import annotations

from .audit import Audit, audit
from .bundle import load
from .compile import compile
from .driver import apply_mapping
from .mapping import cached_mapping, fallback_mapping
from .refit import RefitResult, refit
from .verify import Verdict, verify
from .engine import IOSpec, RefittableEngine
from .errors import (ArchitectureMismatchError, BackendUnavailableError, BundleError, RefitCoreError, RefitError,
                     UnsupportedOperatorError, WeightMappingError)
from .weight_map import WeightMap, WeightSource

__all__ = [
    "compile", "refit", "RefitResult", "cached_mapping", "fallback_mapping", "apply_mapping", "audit", "Audit",
    "verify", "Verdict", "load", "RefittableEngine", "IOSpec", "WeightMap", "WeightSource",
    "RefitCoreError", "UnsupportedOperatorError", "ArchitectureMismatchError", "WeightMappingError",
    "RefitError", "BundleError", "BackendUnavailableError",
]
__version__ = "0.1.0"
