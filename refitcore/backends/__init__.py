"""Backends: build a converted network into an engine, run it, refit it, serialize it.

- ``reference``: a CPU interpreter of the very INetworkDefinition we built (it reads each
  layer's type, attributes and weights off the TensorRT objects) plus a weight store with the
  Refitter's contract. It proves the network and the weight mapping right without a GPU; it
  does not exercise TensorRT's kernels.
- ``tensorrt``: the real TensorRT builder/runtime/refitter on a CUDA GPU.
"""
from __future__ import annotations

__all__ = ["get_backend", "resolve_backend", "BACKENDS"]

from refitcore.options import BACKENDS  # the names, written once (shared with the CLI and the plugin)


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
