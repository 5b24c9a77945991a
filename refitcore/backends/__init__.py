"""Backends: build a converted network into an engine, run it, refit it, serialize it.

- ``reference``: a CPU interpreter of the very INetworkDefinition we built (it reads each
  layer's type, attributes and weights off the TensorRT objects) plus a weight store with the
  Refitter's contract. It proves the network and the weight mapping right without a GPU; it
  does not exercise TensorRT's kernels.
- ``tensorrt``: the real TensorRT builder/runtime/refitter on a CUDA GPU.
"""
from __future__ import annotations

import logging

from refitcore.options import BACKENDS  # the names, written once (shared with the CLI and the plugin)

__all__ = ["get_backend", "resolve_backend", "choose_backend", "BACKENDS"]

log = logging.getLogger("refitcore")


def get_backend(name: str):
    if name == "reference":
        from refitcore.backends import reference

        return reference
    if name == "tensorrt":
        from refitcore.backends import tensorrt

        return tensorrt
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def resolve_backend(name: str) -> tuple[str, str]:
    """(backend name, reason) for a requested backend; 'auto' picks TensorRT only when it can
    build *and run* an engine here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name != "auto":
        return name, "requested"
    from refitcore.backends import tensorrt

    usable, reason = tensorrt.usable()
    if usable:
        return "tensorrt", "a CUDA GPU with a TensorRT that builds and runs engines is present"
    return "reference", f"TensorRT backend unusable here: {reason}"


def choose_backend(name: str) -> tuple[str, str]:
    """:func:`resolve_backend` for a build: 'auto' also says which backend it chose and why (a warning,
    since every report of a reference-backend run must be read knowing TensorRT's kernels did not run)."""
    chosen, reason = resolve_backend(name)
    if name == "auto":
        log.warning("refitcore: backend 'auto' chose %r: %s", chosen, reason)
    return chosen, reason
