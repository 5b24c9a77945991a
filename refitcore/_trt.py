"""The one place that imports TensorRT.

``tensorrt`` (NVIDIA's full TensorRT) is preferred; ``tensorrt_rtx`` (TensorRT-RTX,
the same Python API, installable from PyPI) is the fallback. Everything else in the
project asks this module, so the import is lazy and happens at most once.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

__all__ = ["TensorRTUnavailableError", "trt", "flavour", "available", "logger"]

_CANDIDATES = ("tensorrt", "tensorrt_rtx")


class TensorRTUnavailableError(ImportError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported."""


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    reasons = []
    for name in _CANDIDATES:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - ImportError, or a broken native library (OSError): a reason, not a crash
            reasons.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if not hasattr(module, "Builder"):
            # NVIDIA's PyPI placeholder package imports but has no API.
            reasons.append(f"{name}: imported but has no Builder (a placeholder package?)")
            continue
        return module, name
    return None, "; ".join(reasons)


def trt() -> ModuleType:
    """Return the TensorRT module, or raise :class:`TensorRTUnavailableError` saying how to get one."""
    module, info = _load()
    if module is None:
        raise TensorRTUnavailableError(
            "no TensorRT Python API could be imported "
            f"({info}). Install one: `pip install 'pytest-trtrefit[rtx]'` (TensorRT-RTX, "
            "enough to build networks on any machine) or `pip install 'pytest-trtrefit[tensorrt]'`."
        )
    return module


def available() -> bool:
    return _load()[0] is not None


def flavour() -> str:
    """'tensorrt' or 'tensorrt_rtx' (raises when neither is importable)."""
    trt()
    return _load()[1]


def version() -> str:
    return str(getattr(trt(), "__version__", "unknown"))


@functools.lru_cache(maxsize=1)
def logger():
    """A process-wide TensorRT logger (TensorRT wants one logger per process)."""
    t: Any = trt()   # TensorRT's classes exist at run time only: subclass it as Any

    class Logger(t.ILogger):
        def __init__(self):
            t.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):  # TensorRT's callback
            if severity <= t.ILogger.Severity.WARNING:
                self.messages.append(f"[{severity.name}] {msg}")
                del self.messages[:-200]

        def take(self) -> list[str]:
            out, self.messages = self.messages, []
            return out

    return Logger()
