"""refitcore: compile PyTorch models into refittable TensorRT networks, refit them through a cached
weight map or a fallback conversion, and check the result against eager PyTorch.

Importing the package is cheap (no torch, no TensorRT): every public name is imported on first
use (PEP 562), so ``refitcore.options`` and ``refitcore.errors`` load without the heavy stack.
The subpackages follow the pipeline: ``capture`` -> ``conversion`` -> ``partition`` ->
``backends`` -> ``engine`` -> ``refitting`` -> ``cache`` -> ``compiler`` -> ``gating`` -> ``cli``
(``docs/architecture.md``).

The names here are the API the README documents and the results and errors they return. The
building blocks behind them stay in their modules: the cache key (``refitcore.cache.key``:
``cache_key``, ``architecture_fingerprint``), the eager reference model
(``refitcore.capture.eager.eager_model``), the gate's sample loader (``refitcore.gating.samples``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from refitcore._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "compile": "refitcore.compiler.native",
    "MutableEngine": "refitcore.compiler.mutable",
    "refit": "refitcore.refitting.refit",
    "RefitResult": "refitcore.refitting.refit",
    "cached_mapping": "refitcore.refitting.mapping",
    "fallback_mapping": "refitcore.refitting.mapping",
    "apply_mapping": "refitcore.refitting.driver",
    "audit": "refitcore.refitting.audit",
    "audit_paths": "refitcore.refitting.audit",
    "Audit": "refitcore.refitting.audit",
    "verify": "refitcore.refitting.verify",
    "Verdict": "refitcore.refitting.verify",
    "find_culprit": "refitcore.refitting.culprit",
    "Culprit": "refitcore.refitting.culprit",
    "UntrustedFactoryError": "refitcore.capture.eager",
    "Inputs": "refitcore.capture.structured",
    "DimRange": "refitcore.capture.shapes",
    "load": "refitcore.engine.refittable",
    "RefittableEngine": "refitcore.engine.refittable",
    "IOSpec": "refitcore.engine.refittable",
    "WeightMap": "refitcore.conversion.weight_map",
    "WeightSource": "refitcore.conversion.weight_map",
    "gate": "refitcore.gating.gate",
    "GateReport": "refitcore.gating.gate",
    "EngineCache": "refitcore.cache.store",
    "BaseEngineCache": "refitcore.cache.store",
    **dict.fromkeys((
        "RefitCoreError", "UnsupportedOperatorError", "ArchitectureMismatchError", "WeightMappingError",
        "MapCannotServeError", "RefitError", "BundleError", "BackendUnavailableError", "ExportError",
        "MutationError", "ShapeRangeError", "WeightlessEngineError"), "refitcore.errors"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'refitcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:   # what type checkers and IDEs see; never imported at run time
    from refitcore.cache.store import BaseEngineCache, EngineCache
    from refitcore.capture.eager import UntrustedFactoryError
    from refitcore.capture.shapes import DimRange
    from refitcore.capture.structured import Inputs
    from refitcore.compiler.mutable import MutableEngine
    from refitcore.compiler.native import compile
    from refitcore.conversion.weight_map import WeightMap, WeightSource
    from refitcore.engine.refittable import IOSpec, RefittableEngine, load
    from refitcore.errors import (
        ArchitectureMismatchError,
        BackendUnavailableError,
        BundleError,
        ExportError,
        MapCannotServeError,
        MutationError,
        RefitCoreError,
        RefitError,
        ShapeRangeError,
        UnsupportedOperatorError,
        WeightlessEngineError,
        WeightMappingError,
    )
    from refitcore.gating.gate import GateReport, gate
    from refitcore.refitting.audit import Audit, audit, audit_paths
    from refitcore.refitting.culprit import Culprit, find_culprit
    from refitcore.refitting.driver import apply_mapping
    from refitcore.refitting.mapping import cached_mapping, fallback_mapping
    from refitcore.refitting.refit import RefitResult, refit
    from refitcore.refitting.verify import Verdict, verify
