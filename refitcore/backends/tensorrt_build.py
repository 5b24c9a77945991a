"""Building a refittable TensorRT plan: builder configuration, build, and what the builder said.

Kept apart from the runtime so that the build alone can run where engines cannot (TensorRT-RTX
builds on a compute capability 9.0 GPU but refuses to run there), e.g. for
``benchmarks/build_times.py``.

Documentation relied on:
- REFIT flag, ``build_serialized_network``: "Refitting an Engine",
  https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/inference-library/refitting-engines.html
  (``config.set_flag(trt.BuilderFlag.REFIT)``; ``builder.build_serialized_network(network, config)``).
- TF32 is enabled by default in a builder config, and clearing ``BuilderFlag.TF32`` keeps fp32
  convolutions and matrix multiplies in IEEE fp32: "Precision Control",
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/inference-library/precision-control.html
  (TensorRT-RTX 1.7 reports ``get_flag(TF32) == True`` on a fresh config, checked on the CPU machine).
- Reduced precision is in the network, not the builder: the converters build strongly typed networks
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT-RTX's always are, and it has no FP16
  builder flag: https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/_static/python-api/infer/Core/Builder.html)
  whose tensors and weights carry fp16/bf16 types, and a strongly typed network takes no precision
  builder flags ("Strong Typing vs Weak Typing", same Precision Control page). ``precision`` is
  checked and recorded here; it sets no flag.
- ``Builder.is_network_supported`` reports violated constraints to the error recorder
  (Python API docstring of ``tensorrt.Builder``).
"""
from __future__ import annotations

import dataclasses
import time

from refitcore import _trt, dtypes
from refitcore.backends.tensorrt_shapes import add_profiles

__all__ = ["PRECISIONS", "PlanBuild", "builder_config", "build_plan"]

PRECISIONS = tuple(dtypes.PRECISIONS)   # the network's float type (refitcore.conversion.convert)


@dataclasses.dataclass
class PlanBuild:
    """A serialized plan and what it cost."""

    plan: bytes
    seconds: float
    precision: str
    tf32: bool
    network_supported: bool | None          # Builder.is_network_supported, where the API has it
    messages: list[str]                     # warnings and errors TensorRT logged/recorded during the build

    @property
    def nbytes(self) -> int:
        return len(self.plan)


def builder_config(builder, *, precision: str = "fp32", tf32: bool = False, refit: bool = True, trt=None):
    """A builder config with ``BuilderFlag.REFIT`` (unless ``refit=False``, for comparisons only),
    TF32 cleared unless ``tf32=True`` (strict IEEE fp32 by default). ``precision`` must be one of
    :data:`PRECISIONS`; it sets no flag (the strongly typed network's types are the precision)."""
    t = trt if trt is not None else _trt.trt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = builder.create_builder_config()
    if refit:
        config.set_flag(t.BuilderFlag.REFIT)
    # TF32 is on by default; strict fp32 clears it (documented option tf32=True keeps it).
    if hasattr(t.BuilderFlag, "TF32"):
        if tf32:
            config.set_flag(t.BuilderFlag.TF32)
        else:
            config.clear_flag(t.BuilderFlag.TF32)
    elif tf32:
        raise ValueError("tf32=True: this TensorRT has no BuilderFlag.TF32")
    return config


def _drain(recorder) -> list[str]:
    return recorder.take() if recorder is not None else []


def build_plan(builder, network, *, precision: str = "fp32", tf32: bool = False, refit: bool = True,
               recorder=None, check_support: bool = True, profiles=None) -> PlanBuild:
    """Build ``network`` into a serialized plan; raise a :class:`RuntimeError` carrying TensorRT's
    own messages when the builder refuses it. ``profiles`` (:class:`refitcore.capture.shapes.ShapeProfiles`)
    become optimization profiles (needed when an input has -1 dimensions)."""
    t = _trt.trt()
    log = _trt.logger()
    log.take()  # start from a clean slate: only this build's messages are reported
    if recorder is not None:
        builder.error_recorder = recorder
    config = builder_config(builder, precision=precision, tf32=tf32, refit=refit, trt=t)
    add_profiles(builder, config, profiles)
    supported = None
    if check_support and hasattr(builder, "is_network_supported"):
        try:
            supported = bool(builder.is_network_supported(network, config))
        except Exception as err:  # noqa: BLE001 - an API that cannot answer here is not a verdict on the network
            supported = None
            log.messages.append(f"[is_network_supported] {type(err).__name__}: {err}")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    messages = _drain(recorder) + log.take()
    if serialized is None:
        detail = "; ".join(messages[-10:]) or "no message from TensorRT"
        raise RuntimeError(f"TensorRT could not build the network ({network.num_layers} layers, "
                           f"precision={precision}, REFIT={refit}): {detail}")
    plan = bytes(memoryview(serialized))
    return PlanBuild(plan, seconds, precision, tf32, supported, messages)
