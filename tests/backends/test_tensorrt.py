"""The TensorRT backend module (refitcore/backends/tensorrt.py) without a GPU: serialization flags,
input checks, build refusals, what ``usable`` says here, and save/load of a plan as a raw buffer."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from refitcore.backends import resolve_backend, tensorrt as trt_backend
from refitcore.backends.base import WeightsPrototype
from tests.backends.fake_trt import W0


def test_serialization_config_keeps_weights_and_refittability(real_trt):
    t = real_trt

    class FakeConfig:
        def __init__(self):
            self.flags = {"EXCLUDE_WEIGHTS"}   # as if some earlier code had set it

        def clear_flag(self, f):
            self.flags.discard(f.name)

        def set_flag(self, f):
            self.flags.add(f.name)

    engine = types.SimpleNamespace(create_serialization_config=FakeConfig)
    cfg = trt_backend.serialization_config(engine, t)
    assert "EXCLUDE_WEIGHTS" not in cfg.flags
    if hasattr(t.SerializationFlag, "INCLUDE_REFIT"):
        assert "INCLUDE_REFIT" in cfg.flags
    # A weightless plan (the engine cache's entries): refittable weights left out, still refittable.
    stripped = trt_backend.serialization_config(engine, t, weights=False)
    assert "EXCLUDE_WEIGHTS" in stripped.flags
    if hasattr(t.SerializationFlag, "INCLUDE_REFIT"):
        assert "INCLUDE_REFIT" in stripped.flags


# ---- inputs -----------------------------------------------------------------------------------
SPECS = [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "FLOAT"}]


@pytest.mark.parametrize("inputs,exc,needle", [
    ([], ValueError, "takes 1 input"),
    ([np.zeros((1, 3, 8, 8), np.float32)], TypeError, "expected a torch.Tensor"),
    ([torch.zeros(1, 3, 8, 9)], ValueError, "expected shape [1, 3, 8, 8], got [1, 3, 8, 9]"),
    ([torch.zeros(1, 3, 8, 8, dtype=torch.float16)], TypeError, "expected dtype torch.float32"),
], ids=["count", "type", "shape", "dtype"])
def test_check_inputs_errors(inputs, exc, needle):
    with pytest.raises(exc) as info:
        trt_backend.check_inputs(SPECS, inputs)
    assert needle in str(info.value)


def test_check_inputs_accepts_matching():
    trt_backend.check_inputs(SPECS, [torch.zeros(1, 3, 8, 8)])


# ---- capability detection ------------------------------------------------------------------------
def test_usable_gives_a_precise_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this checks the CPU-only answer")
    from refitcore import _trt

    ok, reason = trt_backend.usable()
    assert ok is False
    if _trt.available():
        assert reason.startswith("no CUDA device: torch.cuda.is_available() is False"), reason
    else:
        assert "no TensorRT Python API could be imported" in reason, reason
    name, why = resolve_backend("auto")
    assert name == "reference" and reason in why


def test_build_refuses_without_cuda_and_unknown_options():
    from refitcore.errors import BackendUnavailableError

    with pytest.raises(TypeError, match="unknown TensorRT build option"):
        trt_backend.build(object(), precison="fp32")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
            trt_backend.build(object())


# ---- save/load: the plan travels as a raw buffer next to the weights --------------------------
class _SavedImpl:
    backend_name = "tensorrt"
    note = "fake"

    def __init__(self, plan: bytes, weights: dict, meta: dict):
        self.plan, self.weights, self.meta = plan, weights, meta

    def weight_names(self):
        return list(self.weights)

    def prototype(self, name):
        a = self.weights[name]
        return WeightsPrototype(name, "FLOAT", int(a.size), tuple(a.shape))

    def serialize(self, *, weights=True):
        header = {"backend": "tensorrt", "meta": self.meta, "blobs": {"plan": self.plan}}
        return header, dict(self.weights) if weights else {}

    @classmethod
    def deserialize(cls, header, arrays):
        return cls(bytes(header["blobs"]["plan"]), arrays, header["meta"])


def _saved_engine(meta):
    from refitcore.conversion.weight_map import WeightMap, WeightSource
    from refitcore.engine.records import EngineRecord
    from refitcore.engine.refittable import IOSpec, RefittableEngine
    from refitcore.engine.whole import KIND

    impl = _SavedImpl(bytes(range(256)) * 3, {"conv KERNEL": W0["conv KERNEL"]}, meta)
    io = IOSpec(("x",), ((1, 1, 3, 3),), ("float32",), ("output_0",), ((1, 2, 2, 2),))
    # a loaded engine must hold exactly the weights its map names
    wm = WeightMap({"conv KERNEL": WeightSource("copy", {"x": {"key": "conv.weight"}}, {}, (2, 1, 2, 2))})
    wm.key_specs = {"conv.weight": [[2, 1, 2, 2], "float32"]}   # what compile records: a file must declare its keys
    return RefittableEngine(KIND, impl, wm, io, EngineRecord("fingerprint"))


def test_bundle_carries_the_plan_bytes_and_weights(tmp_path, monkeypatch):
    import refitcore
    from refitcore import _trt

    meta = {"flavour": _trt.flavour() if _trt.available() else None, "trt_version": "x",
            "weight_shapes": {"conv KERNEL": [2, 1, 2, 2]}}
    engine = _saved_engine(meta)
    monkeypatch.setattr(trt_backend, "TensorRTEngine", _SavedImpl)   # no GPU here to deserialize on
    engine.save(tmp_path / "e.trtrefit")
    loaded = refitcore.load(tmp_path / "e.trtrefit")
    assert loaded.impl.plan == engine.impl.plan
    np.testing.assert_array_equal(loaded.impl.weights["conv KERNEL"], W0["conv KERNEL"])
    assert loaded.impl.meta == meta


def test_load_refuses_a_plan_of_another_tensorrt_flavour(tmp_path, monkeypatch):
    import refitcore
    from refitcore import _trt
    from refitcore.errors import BackendUnavailableError, BundleError

    if not _trt.available():
        pytest.skip("no TensorRT Python API importable: the flavour check needs one")
    other = "tensorrt" if _trt.flavour() == "tensorrt_rtx" else "tensorrt_rtx"
    engine = _saved_engine({"flavour": other, "trt_version": "10.9", "weight_shapes": {}})
    monkeypatch.setattr(trt_backend, "TensorRTEngine", _SavedImpl)
    engine.save(tmp_path / "e.trtrefit")
    with pytest.raises((BackendUnavailableError, BundleError), match="Recompile the model here"):
        refitcore.load(tmp_path / "e.trtrefit")
