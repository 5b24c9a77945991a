"""The thin adapter between TensorRT's ``Refitter`` and :mod:`refitcore.refitting.driver`.

The driver owns the logic (validate everything first, set every weight, check none missing,
refit, roll back on failure); this adapter only translates, and adds what TensorRT leaves to the
caller:

- ``set_named_weights`` copies the value and keeps the copy (and the ``trt.Weights`` that points
  at it) alive until ``refit_cuda_engine`` returns: TensorRT reads the memory only then, and
  "Modifying the weights before refit_cuda_engine or refit_cuda_engine_async returns will result
  in undefined behavior"; "Provided weights on CPU or GPU can be unset and released, or updated
  after refit_cuda_engine returns" (Python API, ``tensorrt.Refitter.set_named_weights`` /
  ``refit_cuda_engine``,
  https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/Refitter.html, and
  the docstrings of the tensorrt_rtx 1.7 bindings, which carry the same words).
- A torch CUDA tensor is handed over device-resident, with ``TensorLocation.DEVICE`` ("It is
  allowed to provide some weights on CPU and others on GPU", same page; "Refitting an Engine",
  https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/inference-library/refitting-engines.html).
  NumPy arrays go as host weights.
- ``get_weights_prototype`` answers a size of -1 for an unknown name (same page); the adapter
  turns that into ``KeyError`` and the prototype into a :class:`WeightsPrototype` whose
  ``dtype`` is the TensorRT ``DataType`` name, as the reference backend's.
- ``set_named_weights`` returning False and ``refit_cuda_engine`` returning False are recorded in
  ``.errors`` together with what TensorRT's error recorder and logger said ("If False is
  returned, a subset of weights may have been refitted": the driver then rolls back).
- The engine must have no pending work during a refit ("The behavior is undefined if the engine
  has pending enqueued work", same page): ``before_refit`` synchronizes the device.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from refitcore import dtypes
from refitcore.backends.base import WeightsPrototype

__all__ = ["TensorRTRefitter", "make_error_recorder"]


def make_error_recorder(trt: Any):
    """An ``IErrorRecorder`` that keeps every error TensorRT reports, for our exceptions.

    Interface: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1v__1__0_1_1_i_error_recorder.html
    (a Python subclass must call ``IErrorRecorder.__init__`` and implement num_errors,
    get_error_code, get_error_desc, has_overflowed, clear, report_error)."""

    class ErrorRecorder(trt.IErrorRecorder):
        MAX = 256

        def __init__(self):
            trt.IErrorRecorder.__init__(self)
            self._lock = threading.Lock()   # TensorRT may report from several threads
            self._errors: list[tuple[Any, str]] = []
            self._overflowed = False

        def num_errors(self):
            return len(self._errors)

        def get_error_code(self, index):
            return self._errors[index][0]

        def get_error_desc(self, index):
            return self._errors[index][1]

        def has_overflowed(self):
            return self._overflowed

        def clear(self):
            with self._lock:
                self._errors = []
                self._overflowed = False

        def report_error(self, code, desc):
            with self._lock:
                if len(self._errors) >= self.MAX:
                    self._overflowed = True
                else:
                    self._errors.append((code, str(desc)))
            return False  # not fatal by our decision: TensorRT's own return values decide

        def take(self) -> list[str]:
            with self._lock:
                out = [f"[{getattr(c, 'name', c)}] {d}" for c, d in self._errors]
                if self._overflowed:
                    out.append("[error recorder] further errors were dropped")
                self._errors = []
                self._overflowed = False
            return out

    return ErrorRecorder()


def _is_cuda_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and getattr(value, "is_cuda", False)



def host_weights(t, arr: np.ndarray):
    """``trt.Weights`` pointing at a host array (no copy); a ``uint16`` array holds bfloat16 bit
    patterns (:mod:`refitcore.dtypes`), which NumPy cannot type: handed over by pointer as BF16."""
    if arr.dtype == np.uint16:
        return t.Weights(t.DataType.BF16, int(arr.ctypes.data), int(arr.size))
    return t.Weights(arr)

class TensorRTRefitter:
    """TensorRT's ``Refitter`` with the contract :mod:`refitcore.refitting.driver` expects.

    Arguments: ``refitter`` (a ``trt.Refitter`` or anything with its methods), ``trt`` (the
    TensorRT module: ``Weights``, ``DataType``, ``TensorLocation``), ``shapes`` (weight name ->
    shape, for prototypes and the host mirror), ``on_commit`` (called with {name: ndarray} after a
    successful refit, to update the engine's host mirror), ``before_refit`` (e.g. synchronize
    the device), ``messages`` (returns and clears what TensorRT reported since the last call)."""

    def __init__(self, refitter, *, trt, shapes: Mapping[str, tuple[int, ...]],
                 on_commit: Callable[[dict[str, np.ndarray]], None],
                 before_refit: Callable[[], None] | None = None,
                 messages: Callable[[], list[str]] | None = None):
        self._refitter = refitter
        self._trt = trt
        self._shapes = dict(shapes)
        self._on_commit = on_commit
        self._before_refit = before_refit
        self._messages = messages or list
        # name -> (buffer handed to TensorRT, trt.Weights pointing at it, host copy or None)
        self._pending: dict[str, tuple[Any, Any, np.ndarray | None]] = {}
        self.errors: list[str] = []

    # ---- introspection -----------------------------------------------------------
    def get_all_weights(self) -> list[str]:
        return [str(n) for n in self._refitter.get_all_weights()]

    def get_weights_prototype(self, name: str) -> WeightsPrototype:
        proto = self._refitter.get_weights_prototype(name)
        count = int(proto.size)
        if count < 0:  # TensorRT: "size ... is -1 when the name ... does not correspond to any refittable weights"
            raise KeyError(name)
        shape = tuple(self._shapes.get(name, (count,)))
        return WeightsPrototype(name, proto.dtype.name, count, shape)

    def get_missing_weights(self) -> list[str]:
        return [str(n) for n in self._refitter.get_missing_weights()]

    # ---- setting -----------------------------------------------------------------
    def _reject(self, name: str, why: str) -> bool:
        said = self._messages()
        self.errors.append(f"{name!r}: {why}" + (f"; TensorRT said: {' | '.join(said)}" if said else ""))
        return False

    def set_named_weights(self, name: str, value: Any) -> bool:
        """Hand ``value`` (ndarray, or torch tensor: CUDA tensors stay on the device) to TensorRT
        under ``name``; False (with the reason in ``.errors``) when it does not fit or TensorRT
        rejects it. The value is copied: later changes by the caller do not leak in."""
        t = self._trt
        try:
            proto = self.get_weights_prototype(name)
        except KeyError:
            return self._reject(name, "the engine has no refittable weight of that name")
        location = t.TensorLocation.HOST
        if _is_cuda_tensor(value):
            buf = value.detach().contiguous().clone()       # device-resident copy, kept until refit returns
            dtype = dtypes.trt_name(buf.dtype, str(buf.dtype))
            count = int(buf.numel())
            host = None                                     # fetched only once the refit succeeded
            location = t.TensorLocation.DEVICE
        else:
            if type(value).__module__.startswith("torch"):
                value = dtypes.to_numpy(value.detach().cpu())   # bfloat16 as its bit patterns
            buf = np.array(value, copy=True, order="C")
            dtype = dtypes.trt_name(buf.dtype, str(buf.dtype))
            count = int(buf.size)
            host = buf
        if dtype != proto.dtype:
            return self._reject(name, f"dtype {dtype} where the engine has {proto.dtype}")
        if count != proto.count:
            return self._reject(name, f"{count} values where the engine has {proto.count}")
        if location == t.TensorLocation.DEVICE:
            weights = t.Weights(getattr(t.DataType, dtype), int(buf.data_ptr()), count)
            try:
                ok = self._refitter.set_named_weights(name, weights, location)
            except TypeError:
                # A TensorRT without the location overload: hand over a host copy instead.
                host = dtypes.to_numpy(buf.cpu())
                buf, location = host, t.TensorLocation.HOST
                weights = host_weights(t, buf)
                ok = self._refitter.set_named_weights(name, weights)
        else:
            weights = host_weights(t, buf)   # no copy: points at buf, which self._pending keeps alive
            ok = self._refitter.set_named_weights(name, weights)
        if not ok:
            return self._reject(name, "TensorRT's Refitter.set_named_weights rejected the value "
                                      f"({proto.dtype} x {proto.count}, {location.name.lower()})")
        self._pending[name] = (buf, weights, host)
        return True

    # ---- refit ---------------------------------------------------------------------
    def refit(self) -> bool:
        """``refit_cuda_engine``; on success the engine's host mirror takes the new values."""
        if self._before_refit is not None:
            self._before_refit()
        try:
            ok = bool(self._refitter.refit_cuda_engine())
            said = self._messages()
            if not ok:
                missing = self.get_missing_weights()
                self.errors.append("TensorRT's Refitter.refit_cuda_engine returned False (a subset of the weights "
                                   "may have been applied)" + (f"; missing weights: {missing[:10]}" if missing else "")
                                   + (f"; TensorRT said: {' | '.join(said)}" if said else ""))
                return False
            committed = {}
            for name, (buf, _weights, host) in self._pending.items():
                arr = host if host is not None else dtypes.to_numpy(buf.cpu())
                committed[name] = arr.reshape(self._shapes.get(name, arr.shape))
            self._on_commit(committed)
            return True
        finally:
            # Only now may the buffers go: TensorRT has finished reading them.
            self._pending.clear()
