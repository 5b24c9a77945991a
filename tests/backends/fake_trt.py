"""A fake TensorRT for the CPU tests of the TensorRT backend: just what the Refitter adapter
touches, with ``trt.Refitter``'s documented behaviour."""
from __future__ import annotations

import gc
import types
import weakref

import numpy as np

from refitcore.backends.tensorrt_refit import TensorRTRefitter
from refitcore.conversion.weight_map import WeightMap


class _Enum:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


class FakeTRT(types.SimpleNamespace):
    pass


fake_trt = FakeTRT()
fake_trt.DataType = types.SimpleNamespace(FLOAT=_Enum("FLOAT"), HALF=_Enum("HALF"), INT32=_Enum("INT32"))
fake_trt.TensorLocation = types.SimpleNamespace(HOST=_Enum("HOST"), DEVICE=_Enum("DEVICE"))
_NP_DT = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32"}


class FakeWeights:
    """Like trt.Weights(ndarray): points at the array without copying it."""

    def __init__(self, a, ptr=None, count=None):
        if isinstance(a, np.ndarray):
            self.array = a
            self.dtype = getattr(fake_trt.DataType, _NP_DT[str(a.dtype)])
            self.size = a.size
        else:  # (dtype, ptr, count): device weights
            self.array, self.dtype, self.ptr, self.size = None, a, ptr, count


fake_trt.Weights = FakeWeights


class FakeRefitter:
    """trt.Refitter's behaviour as documented: set_named_weights returns False for an unknown
    name or a wrong size/dtype, get_missing_weights lists the other weights of a layer whose
    weights were partly set, refit_cuda_engine reads the buffers only then, and may fail after
    applying a subset."""

    def __init__(self, engine: dict, layers: dict[str, list[str]], *, reject=(), fail_refit_after=None,
                 recorder=None):
        self.engine = engine                      # the "device" weights: name -> ndarray
        self.layers = layers                      # layer -> weight names (TensorRT's missing-weights rule)
        self.reject = set(reject)
        self.fail_refit_after = fail_refit_after  # apply this many weights, then fail
        self.recorder = recorder if recorder is not None else []
        self.given: dict[str, FakeWeights] = {}
        self.alive_at_refit: list[bool] = []
        self.refs: list[weakref.ref] = []

    def get_all_weights(self):
        return list(self.engine)

    def get_weights_prototype(self, name):
        if name not in self.engine:
            return types.SimpleNamespace(dtype=fake_trt.DataType.FLOAT, size=-1)
        a = self.engine[name]
        return types.SimpleNamespace(dtype=getattr(fake_trt.DataType, _NP_DT[str(a.dtype)]), size=a.size)

    def set_named_weights(self, name, weights, location=None):
        proto = self.get_weights_prototype(name)
        if name in self.reject:
            self.recorder.append(f"[INVALID_ARGUMENT] weights {name} rejected by the fake")
            return False
        if proto.size < 0 or proto.size != weights.size or proto.dtype.name != weights.dtype.name:
            return False
        self.given[name] = weights
        if weights.array is not None:
            self.refs.append(weakref.ref(weights.array))
        return True

    def get_missing_weights(self):
        touched = [ws for ws in self.layers.values() if any(w in self.given for w in ws)]
        return [w for ws in touched for w in ws if w not in self.given]

    def refit_cuda_engine(self):
        gc.collect()
        self.alive_at_refit = [r() is not None for r in self.refs]
        if self.get_missing_weights():
            return False
        for i, (name, w) in enumerate(self.given.items()):
            if self.fail_refit_after is not None and i >= self.fail_refit_after:
                self.recorder.append("[REFIT_FAILED] fake failure in the middle of a refit")
                return False
            self.engine[name] = np.array(w.array, copy=True).reshape(self.engine[name].shape)
        return True


class FakeImpl:
    """An engine impl whose refitter is the real adapter over a FakeRefitter."""

    backend_name = "fake-tensorrt"

    def __init__(self, weights, layers, **fake_kwargs):
        self.device = {k: np.array(v, copy=True) for k, v in weights.items()}   # what the "GPU" holds
        self.mirror = {k: np.array(v, copy=True) for k, v in weights.items()}   # the backend's host mirror
        self.layers = layers
        self.fake_kwargs = fake_kwargs
        self.recorder: list[str] = []
        self.synced = 0
        self.last_fake: FakeRefitter | None = None

    def current_weights(self):
        return dict(self.mirror)

    def rollback_weights(self):
        return {k: np.array(v, copy=True) for k, v in self.mirror.items()}

    def _commit(self, new):
        self.mirror.update({k: np.array(v, copy=True) for k, v in new.items()})

    def _said(self):
        out, self.recorder[:] = list(self.recorder), []
        return out

    def _sync(self):
        self.synced += 1

    def create_refitter(self, *, adopt=False):
        fake = FakeRefitter(self.device, self.layers, recorder=self.recorder, **self.fake_kwargs)
        self.fake_kwargs = {}   # failures are one-shot: the rollback's refitter behaves
        self.last_fake = fake
        return TensorRTRefitter(fake, trt=fake_trt, shapes={k: v.shape for k, v in self.mirror.items()},
                                on_commit=self._commit, before_refit=self._sync, messages=self._said)



class FakeEngine:
    """What the driver sees of a RefittableEngine: its ``impl``, and its weight map (here: no literal
    constants, so every weight must be finite)."""

    def __init__(self, impl):
        self.impl = impl
        self.weight_map = WeightMap()


W0 = {"conv KERNEL": np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2),
      "conv BIAS": np.array([0.5, -0.5], dtype=np.float32),
      "fc CONSTANT": np.ones((3,), dtype=np.float32)}
LAYERS = {"conv": ["conv KERNEL", "conv BIAS"], "fc": ["fc CONSTANT"]}


def new_weights(scale=2.0):
    return {k: (v * scale + 1).astype(np.float32) for k, v in W0.items()}


def make_engine(**fake_kwargs):
    return FakeEngine(FakeImpl(W0, LAYERS, **fake_kwargs))
