"""The TensorRT backend: real engines on a CUDA GPU, through NVIDIA's Python API.

- build: the converted network with ``BuilderFlag.REFIT``; strict fp32 by default (TF32
  cleared; ``tf32=True`` allows it); fp16/bf16 engines are strongly typed networks whose tensors
  and weights carry those types (see :mod:`.tensorrt_build` and docs/precision.md);
- run: torch CUDA tensors bound with ``IExecutionContext.set_tensor_address`` and
  ``execute_async_v3`` on ``torch.cuda.current_stream()``;
- refit: :class:`.tensorrt_refit.TensorRTRefitter` over ``trt.Refitter`` (driven by
  :mod:`refitcore.refitting.driver`);
- serialize: ``serialize_with_config`` with ``EXCLUDE_WEIGHTS`` cleared and ``INCLUDE_REFIT`` set
  where the version has it, so a refitted engine is saved with its new weights and stays
  refittable;
- :func:`usable`: builds, runs and refits a tiny engine once, in a subprocess with a timeout
  (:mod:`.tensorrt_probe`), so a runtime that refuses this GPU, hangs or crashes becomes a reason,
  not a crash.

Documentation relied on (NVIDIA):
- Runtime/ICudaEngine/IExecutionContext, ``set_tensor_address`` and ``execute_async_v3(stream_handle)``:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  ("Modifying or releasing memory that has been registered for the tensors before stream
  synchronization ... results in undefined behavior"; a non-default stream is recommended).
- ICudaEngine ``get_tensor_name``/``get_tensor_mode``/``get_tensor_shape``/``get_tensor_dtype``,
  ``create_serialization_config``, ``serialize_with_config``:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
- SerializationFlag (EXCLUDE_WEIGHTS: "Exclude weights that can be refitted"; INCLUDE_REFIT:
  "Remain refittable if originally so"):
  https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/_static/python-api/infer/Core/SerializationConfig.html
- Refitter: see :mod:`.tensorrt_refit`. "IExecutionContexts associated with the engine remain valid
  for use afterwards" (``refit_cuda_engine``), so one context serves across refits.
- TensorRT-RTX runs on compute capabilities 7.5, 8.6, 8.9, 12.0 (support matrix,
  https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/getting-started/support-matrix.html);
  on 9.0 (H100/H200) it builds plans but refuses to deserialize them.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refitcore import _trt, dtypes
from refitcore.backends.base import HostWeights
from refitcore.backends.tensorrt_build import PlanBuild, build_plan
from refitcore.backends.tensorrt_probe import ProbeResult, probe
from refitcore.backends.tensorrt_refit import TensorRTRefitter, make_error_recorder
from refitcore.backends.tensorrt_shapes import set_input_shapes
from refitcore.capture.shapes import ShapeProfiles
from refitcore.errors import BackendUnavailableError

__all__ = ["NAME", "NOTE", "TensorRTEngine", "usable", "probe_result", "build", "load_engine",
           "serialization_config", "check_inputs"]

NAME = "tensorrt"
NOTE = "tensorrt backend: NVIDIA TensorRT kernels on a CUDA GPU"

_OPTIONS = ("precision", "tf32", "copy_weights")   # copy_weights: TensorRT copies at build anyway


@functools.lru_cache(maxsize=1)
def probe_result() -> ProbeResult:
    """The capability probe's result (tried once per process, in a subprocess with a timeout; see
    :mod:`.tensorrt_probe`): usable or not, why, and the stage it reached."""
    return probe()


def usable() -> tuple[bool, str]:
    """Whether this machine can build *and run* a TensorRT engine, and why not."""
    result = probe_result()
    return result.ok, result.reason


# ---- inputs -------------------------------------------------------------------------
def check_inputs(specs: Sequence[dict], inputs: Sequence[Any], profiles: ShapeProfiles | None = None) -> None:
    """Raise a clear error when ``inputs`` do not match the engine's input specs
    ({name, shape, dtype (TensorRT DataType name)}); with ``profiles``, a shape must lie inside one
    optimization profile instead of equalling the spec."""
    if len(inputs) != len(specs):
        raise ValueError(f"engine takes {len(specs)} input(s) {[s['name'] for s in specs]}, got {len(inputs)}")
    for spec, x in zip(specs, inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input {spec['name']!r}: expected a torch.Tensor, got {type(x).__name__}")
    if profiles is not None:
        by_name = {spec["name"]: tuple(x.shape) for spec, x in zip(specs, inputs)}
        profiles.profile_for([by_name.get(n, ()) for n in profiles.input_names])
    for spec, x in zip(specs, inputs):
        if profiles is None and list(x.shape) != list(spec["shape"]):
            raise ValueError(f"input {spec['name']!r}: expected shape {list(spec['shape'])}, got {list(x.shape)} "
                             f"(the engine was built for static shapes; recompile for another shape)")
        want = dtypes.torch_dtype(spec["dtype"])
        if x.dtype != want:
            raise TypeError(f"input {spec['name']!r}: expected dtype {want}, got {x.dtype}; convert it with "
                            f".to({want})")


def serialization_config(engine, trt=None, *, weights: bool = True):
    """The config that saves an engine refittable, *with* its current (refitted) weights, or without
    them (``weights=False``: a weight-stripped plan, which must be refitted with every weight after
    deserializing). TensorRT's Python API documents ``SerializationFlag.EXCLUDE_WEIGHTS`` as
    "Exclude weights that can be refitted" and ``INCLUDE_REFIT`` as "Remain refittable if originally
    so" (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/SerializationConfig.html);
    Torch-TensorRT's engine cache stores such weight-stripped engines and refits them on a hit."""
    t = trt if trt is not None else _trt.trt()
    config = engine.create_serialization_config()
    if weights:
        config.clear_flag(t.SerializationFlag.EXCLUDE_WEIGHTS)
    else:
        config.set_flag(t.SerializationFlag.EXCLUDE_WEIGHTS)
    if hasattr(t.SerializationFlag, "INCLUDE_REFIT"):
        config.set_flag(t.SerializationFlag.INCLUDE_REFIT)
    return config


class TensorRTEngine(HostWeights):
    """A deserialized TensorRT engine, its execution context, and a host mirror of its refittable
    weights (TensorRT cannot read weights back out of an engine: the mirror serves
    ``current_weights``, rollback and save)."""

    backend_name = NAME
    note = NOTE

    def __init__(self, plan: bytes, weights: dict[str, np.ndarray], meta: dict):
        t = _trt.trt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the TensorRT backend needs a CUDA device; torch sees none "
                                          "(torch.cuda.is_available() is False)")
        self.meta = meta
        self._plan = plan
        self._profiles = ShapeProfiles.from_json(meta["profiles"]) if meta.get("profiles") else None
        self._profile_index = 0   # a new execution context starts on profile 0
        # The current device, not the one recorded at build time: a loaded engine runs where it is loaded.
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._recorder = make_error_recorder(t)
        self._logger = _trt.logger()
        self._logger.take()
        self._runtime = t.Runtime(self._logger)
        self._runtime.error_recorder = self._recorder
        with torch.cuda.device(self._device):
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                said = self._said()
                cap = torch.cuda.get_device_capability(self._device)
                err = BackendUnavailableError(
                    f"{_trt.flavour()} {_trt.version()} could not deserialize the engine on "
                    f"{torch.cuda.get_device_name(self._device)} (compute capability {cap[0]}.{cap[1]}): "
                    + ("; ".join(said) if said else "no message from TensorRT"))
                err.tensorrt_messages = said   # TensorRT's own words, for the capability probe
                raise err
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendUnavailableError("TensorRT could not create an execution context: "
                                              + ("; ".join(self._said()) or "no message"))
        self._inputs, self._outputs = self._read_io(t)
        self._shapes = {k: tuple(v) for k, v in meta["weight_shapes"].items()}
        missing = sorted(set(self._shapes) - set(weights))
        if missing:
            raise ValueError(f"weights missing for {missing[:5]}")
        self._weights = {k: np.asarray(weights[k]).reshape(self._shapes[k]) for k in self._shapes}

    def _said(self) -> list[str]:
        return self._recorder.take() + self._logger.take()

    def _read_io(self, t):
        ins: list[dict[str, Any]] = []
        outs: list[dict[str, Any]] = []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            spec = {"name": name, "shape": [int(s) for s in self._engine.get_tensor_shape(name)],
                    "dtype": self._engine.get_tensor_dtype(name).name}
            if any(s < 0 for s in spec["shape"]) and self._profiles is None:
                raise BackendUnavailableError(f"tensor {name!r} has a dynamic shape {spec['shape']}; refitcore builds "
                                              f"static shapes only")
            (ins if self._engine.get_tensor_mode(name) == t.TensorIOMode.INPUT else outs).append(spec)
        order = {n: i for i, n in enumerate(self.meta.get("input_names", []))}
        ins.sort(key=lambda s: order.get(s["name"], len(order)))
        order = {n: i for i, n in enumerate(self.meta.get("output_names", []))}
        outs.sort(key=lambda s: order.get(s["name"], len(order)))
        return ins, outs

    # ---- introspection ---------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [s["name"] for s in self._outputs]

    def weight_names(self) -> list[str]:
        return list(self._shapes)

    def rollback_weights(self) -> dict[str, np.ndarray]:
        """Copies of the host mirror (its first arrays may be shared with the caller who built or
        loaded the engine, so they are not trusted to stay unchanged)."""
        return {k: np.array(v, copy=True) for k, v in self._weights.items()}

    # ---- execution ---------------------------------------------------------------------
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on ``inputs`` (CPU or CUDA tensors); outputs come back on CUDA when every input was
        on CUDA (stream-ordered on the current stream, not synchronized), else on the CPU."""
        check_inputs(self._inputs, inputs, self._profiles)
        dev = self._device
        on_cuda = all(x.is_cuda for x in inputs)
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev)
            # Temporaries are stream-ordered on this stream, so the caching allocator cannot hand
            # their memory to anything else before the engine has consumed them.
            xs = [x.detach().to(dev).contiguous() for x in inputs]
            out_shapes = [s["shape"] for s in self._outputs]
            if self._profiles is not None:
                # Dynamic shapes: input shapes go on the context before enqueueing; the outputs'
                # concrete shapes are then the context's (see .tensorrt_shapes for the docs).
                self._profile_index = set_input_shapes(
                    self._context, self._profiles, self.input_names, [tuple(x.shape) for x in xs],
                    current=self._profile_index, stream_handle=stream.cuda_stream, said=self._said)
                out_shapes = [tuple(self._context.get_tensor_shape(s["name"])) for s in self._outputs]
            outs = [torch.empty(shape, dtype=dtypes.torch_dtype(s["dtype"]), device=dev)
                    for shape, s in zip(out_shapes, self._outputs)]
            for spec, tensor in list(zip(self._inputs, xs)) + list(zip(self._outputs, outs)):
                if not self._context.set_tensor_address(spec["name"], int(tensor.data_ptr())):
                    raise RuntimeError(f"TensorRT refused the address of tensor {spec['name']!r}: "
                                       + ("; ".join(self._said()) or "no message"))
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed: " + ("; ".join(self._said()) or "no message"))
        if on_cuda:
            return outs
        return [o.to("cpu") for o in outs]   # synchronizes with the stream

    # ---- refit ---------------------------------------------------------------------------
    def create_refitter(self, *, adopt: bool = False) -> TensorRTRefitter:
        """``adopt`` changes nothing here: TensorRT copies the values to the device at refit, and the
        host mirror keeps copies of its own."""
        t = _trt.trt()
        refitter = t.Refitter(self._engine, self._logger)
        refitter.error_recorder = self._recorder
        return TensorRTRefitter(refitter, trt=t, shapes=self._shapes, on_commit=self._commit,
                                before_refit=lambda: torch.cuda.synchronize(self._device), messages=self._said)

    def _commit(self, new: dict[str, np.ndarray]) -> None:
        merged = dict(self._weights)
        merged.update({k: np.array(v, copy=True) for k, v in new.items()})
        self._weights = merged

    # ---- serialization ---------------------------------------------------------------------
    def serialize_plan(self, *, weights: bool = True) -> bytes:
        t = _trt.trt()
        if hasattr(self._engine, "create_serialization_config"):
            memory = self._engine.serialize_with_config(serialization_config(self._engine, t, weights=weights))
        else:  # TensorRT < 10: serialize() keeps the weights and refittability (no weightless plans)
            memory = self._engine.serialize()
        if memory is None:
            raise RuntimeError("TensorRT could not serialize the engine: " + ("; ".join(self._said()) or "no message"))
        return bytes(memoryview(memory))

    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able header with the plan under "blobs", {weight name: array}); ``weights=False``:
        a weight-stripped plan and no host mirror."""
        return ({"backend": NAME, "meta": self.meta, "blobs": {"plan": self.serialize_plan(weights=weights)}},
                dict(self._weights) if weights else {})

    @classmethod
    def deserialize(cls, header: dict, arrays: dict[str, np.ndarray]) -> TensorRTEngine:
        blobs = header.get("blobs") or {}
        if "plan" not in blobs:
            raise ValueError("a TensorRT engine header needs its plan (blobs['plan'])")
        return cls(bytes(blobs["plan"]), arrays, header["meta"])


def build(result, **options: Any) -> TensorRTEngine:
    """Build the converted network (``result``: :class:`refitcore.conversion.convert.ConversionResult`)
    into a refittable engine. Options: ``precision`` ('fp32' default, 'fp16' or 'bf16':
    recorded; the network's types carry it), ``tf32`` (False: strict IEEE fp32)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown TensorRT build option(s) {unknown}; known: {list(_OPTIONS)}")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the TensorRT backend needs a CUDA device; torch sees none "
                                      "(torch.cuda.is_available() is False). Use backend='reference' or 'auto'.")
    t = _trt.trt()
    recorder = make_error_recorder(t)
    profiles = getattr(result, "profiles", None)
    pb: PlanBuild = build_plan(result.builder, result.network, precision=options.get("precision", "fp32"),
                               tf32=bool(options.get("tf32", False)), recorder=recorder, profiles=profiles)
    weights = {k: np.asarray(v) for k, v in result.weights.items()}
    meta = {
        "flavour": _trt.flavour(), "trt_version": _trt.version(), "precision": pb.precision, "tf32": pb.tf32,
        "device_index": int(torch.cuda.current_device()),
        "device_name": torch.cuda.get_device_name(), "input_names": list(result.input_names),
        "output_names": list(result.output_names),
        "weight_shapes": {k: list(v.shape) for k, v in weights.items()},
        "build_seconds": pb.seconds, "plan_bytes": pb.nbytes,
        "profiles": profiles.to_json() if profiles is not None else None,
    }
    engine = TensorRTEngine(pb.plan, weights, meta)
    # INT64 constants of shape arithmetic are structure: never set by refit, whether or not
    # TensorRT lists them as refittable.
    refittable = set(engine.create_refitter().get_all_weights()) - set(getattr(result, "shape_constants", ()))
    named = set(weights)
    if refittable != named:
        raise RuntimeError(
            "internal error: TensorRT's refittable weights differ from the weights the converter named: "
            f"not refittable {sorted(named - refittable)[:10]}, unnamed refittable {sorted(refittable - named)[:10]}")
    return engine


def load_engine(header: dict, weights: dict[str, np.ndarray]) -> TensorRTEngine:
    if header.get("backend") != NAME:
        raise ValueError(f"not a TensorRT-backend plan (backend={header.get('backend')!r})")
    meta = header.get("meta") or {}
    if meta.get("flavour") and _trt.available() and meta["flavour"] != _trt.flavour():
        raise BackendUnavailableError(f"this engine was built with {meta['flavour']} {meta.get('trt_version')}; "
                                      f"{_trt.flavour()} {_trt.version()} cannot load it. Recompile the model here.")
    return TensorRTEngine.deserialize(header, weights)
