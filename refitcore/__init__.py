"""refitcore: compile PyTorch models into refittable TensorRT networks, refit them through a cached
weight map or a fallback conversion, and check the result against eager PyTorch."""
from __future__ import annotations

from .audit import Audit, audit, audit_paths
from .cache import BaseEngineCache, EngineCache
from .engine import load
from .compile import compile
from .culprit import Culprit, find_culprit
from .driver import apply_mapping
from .eager import EagerModelError, UntrustedFactoryError, eager_model
from .fingerprint import CacheKey, architecture_fingerprint, cache_key
from .gate import GateReport, gate
from .mapping import cached_mapping, fallback_mapping
from .mutable import MutableEngine
from .refit import RefitResult, refit
from .samples import load_samples
from .verify import Verdict, verify
from .structured import Inputs
from .engine import IOSpec, RefittableEngine
from .errors import (ArchitectureMismatchError, BackendUnavailableError, BundleError, ExportError, MapCannotServeError,
                     RefitCoreError, RefitError, ShapeRangeError, UnsupportedOperatorError, WeightlessEngineError,
                     WeightMappingError)
from .shapes import DimRange
from .weight_map import WeightMap, WeightSource

__all__ = [
    "compile", "refit", "RefitResult", "cached_mapping", "fallback_mapping", "apply_mapping", "audit", "audit_paths", "Audit",
    "verify", "Verdict", "Inputs", "load", "RefittableEngine", "IOSpec", "WeightMap", "WeightSource",
    "RefitCoreError", "UnsupportedOperatorError", "ArchitectureMismatchError", "WeightMappingError", "MapCannotServeError",
    "RefitError", "BundleError", "BackendUnavailableError", "ExportError",
    "gate", "GateReport", "find_culprit", "Culprit", "eager_model", "EagerModelError", "UntrustedFactoryError",
    "load_samples", "ShapeRangeError", "WeightlessEngineError", "DimRange",
    "EngineCache", "BaseEngineCache", "CacheKey", "cache_key", "architecture_fingerprint", "MutableEngine",
]
__version__ = "0.1.0"
