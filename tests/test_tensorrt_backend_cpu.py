"""What of the TensorRT backend can be checked without a GPU: capability detection and its reasons,
the thin Refitter adapter driven by the real refitter driver against a fake ``trt.Refitter``,
builder/serialization flags, input checks, and ``trtrefit doctor``."""
from __future__ import annotations

import gc
import sys
import types
import weakref

import numpy as np
import pytest
import torch

from refitcore import driver
from refitcore.backends import resolve_backend
from refitcore.backends import tensorrt as trt_backend
from refitcore.backends.tensorrt_probe import interpret, probe
from refitcore.backends.tensorrt_refit import TensorRTRefitter
from refitcore.errors import RefitError, WeightMappingError


# ---- a fake TensorRT: just what the adapter touches ----------------------------------------
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

    def _commit(self, new):
        self.mirror.update({k: np.array(v, copy=True) for k, v in new.items()})

    def _said(self):
        out, self.recorder[:] = list(self.recorder), []
        return out

    def _sync(self):
        self.synced += 1

    def create_refitter(self):
        fake = FakeRefitter(self.device, self.layers, recorder=self.recorder, **self.fake_kwargs)
        self.fake_kwargs = {}   # failures are one-shot: the rollback's refitter behaves
        self.last_fake = fake
        return TensorRTRefitter(fake, trt=fake_trt, shapes={k: v.shape for k, v in self.mirror.items()},
                                on_commit=self._commit, before_refit=self._sync, messages=self._said)


class FakeEngine:
    def __init__(self, impl):
        self._impl = impl


W0 = {"conv KERNEL": np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2),
      "conv BIAS": np.array([0.5, -0.5], dtype=np.float32),
      "fc CONSTANT": np.ones((3,), dtype=np.float32)}
LAYERS = {"conv": ["conv KERNEL", "conv BIAS"], "fc": ["fc CONSTANT"]}


def new_weights(scale=2.0):
    return {k: (v * scale + 1).astype(np.float32) for k, v in W0.items()}


def make_engine(**fake_kwargs):
    return FakeEngine(FakeImpl(W0, LAYERS, **fake_kwargs))


# ---- the adapter under the real driver ---------------------------------------------------------
def test_driver_refits_every_weight_through_the_adapter():
    eng = make_engine()
    new = new_weights()
    driver.apply_mapping(eng, new, in_place=True)
    for k, v in new.items():
        np.testing.assert_array_equal(eng._impl.device[k], v)   # what TensorRT got
        np.testing.assert_array_equal(eng._impl.mirror[k], v)   # what the mirror says
    assert eng._impl.synced == 1, "the device must be synchronized before refit_cuda_engine"


def test_validation_against_prototype_refuses_before_touching():
    eng = make_engine()
    bad = new_weights()
    bad["conv BIAS"] = np.zeros(3, np.float32)           # wrong count
    with pytest.raises(WeightMappingError, match="conv BIAS"):
        driver.apply_mapping(eng, bad, in_place=True)
    assert eng._impl.last_fake.given == {}, "nothing may be set when validation fails"
    np.testing.assert_array_equal(eng._impl.device["conv BIAS"], W0["conv BIAS"])


def test_standalone_weight_left_out_is_an_error_not_stale():
    eng = make_engine()
    partial = new_weights()
    del partial["fc CONSTANT"]   # TensorRT would not report it missing: the driver must
    with pytest.raises(WeightMappingError, match="fc CONSTANT"):
        driver.apply_mapping(eng, partial, in_place=True)


def test_rejected_weight_reports_tensorrt_message_and_rolls_back():
    eng = make_engine(reject={"conv BIAS"})
    with pytest.raises(RefitError) as info:
        driver.apply_mapping(eng, new_weights(), in_place=True)
    text = str(info.value)
    assert "conv BIAS" in text and "rejected by the fake" in text
    assert info.value.rolled_back
    for k, v in W0.items():
        np.testing.assert_array_equal(eng._impl.device[k], v)
        np.testing.assert_array_equal(eng._impl.mirror[k], v)


def test_refit_failure_after_partial_apply_rolls_back_to_previous_weights():
    eng = make_engine(fail_refit_after=1)   # applies the first weight, then fails
    with pytest.raises(RefitError) as info:
        driver.apply_mapping(eng, new_weights(), in_place=True)
    assert "refit_cuda_engine returned False" in str(info.value)
    assert "fake failure in the middle" in str(info.value)
    assert info.value.rolled_back
    for k, v in W0.items():
        np.testing.assert_array_equal(eng._impl.device[k], v, err_msg=k)
        np.testing.assert_array_equal(eng._impl.mirror[k], v, err_msg=k)


def test_missing_weights_of_a_layer_are_reported():
    impl = FakeImpl(W0, LAYERS)
    r = impl.create_refitter()
    assert r.set_named_weights("conv KERNEL", new_weights()["conv KERNEL"])
    assert r.get_missing_weights() == ["conv BIAS"]
    assert r.refit() is False
    assert any("missing weights" in e and "conv BIAS" in e for e in r.errors)
    np.testing.assert_array_equal(impl.mirror["conv KERNEL"], W0["conv KERNEL"])


@pytest.mark.parametrize("name,value,needle", [
    ("nope", np.zeros(2, np.float32), "no refittable weight of that name"),
    ("conv BIAS", np.zeros(2, np.float16), "dtype HALF where the engine has FLOAT"),
    ("conv BIAS", np.zeros(5, np.float32), "5 values where the engine has 2"),
], ids=["unknown-name", "wrong-dtype", "wrong-count"])
def test_set_named_weights_returns_false_with_reason(name, value, needle):
    r = FakeImpl(W0, LAYERS).create_refitter()
    assert r.set_named_weights(name, value) is False
    assert any(needle in e for e in r.errors), r.errors


def test_prototype_has_trt_dtype_name_count_shape_and_unknown_raises():
    r = FakeImpl(W0, LAYERS).create_refitter()
    p = r.get_weights_prototype("conv KERNEL")
    assert (p.dtype, p.count, p.shape) == ("FLOAT", 8, (2, 1, 2, 2))
    with pytest.raises(KeyError):
        r.get_weights_prototype("nope")


def test_buffers_alive_until_refit_returns_and_caller_mutation_does_not_leak():
    impl = FakeImpl(W0, LAYERS)
    r = impl.create_refitter()
    new = new_weights()
    for k, v in new.items():
        assert r.set_named_weights(k, v)
    expected = {k: v.copy() for k, v in new.items()}
    for v in new.values():
        v[...] = 123.0          # the caller reuses its buffers before refit: must not leak in
    del new, v
    gc.collect()
    fake = impl.last_fake
    assert r.refit()
    assert fake.alive_at_refit and all(fake.alive_at_refit), "a weight buffer died before refit_cuda_engine"
    for k, v in expected.items():
        np.testing.assert_array_equal(impl.device[k], v)
    fake.given.clear()   # TensorRT keeps no Python references: only the adapter could keep them alive
    gc.collect()
    assert all(ref() is None for ref in fake.refs), "buffers should be released once refit has returned"


def test_cpu_torch_tensor_goes_as_host_weights():
    impl = FakeImpl(W0, LAYERS)
    r = impl.create_refitter()
    for k, v in new_weights().items():
        assert r.set_named_weights(k, torch.from_numpy(v))
    assert r.refit()
    np.testing.assert_array_equal(impl.device["conv BIAS"], new_weights()["conv BIAS"])


# ---- the real TensorRT Python API, where importable (network-level only: no GPU) -------------
def _real_trt():
    from refitcore import _trt

    if not _trt.available():
        pytest.skip("no TensorRT Python API importable (pip install 'pytest-trtrefit[rtx]')")
    return _trt.trt()


def test_error_recorder_collects_messages():
    t = _real_trt()
    from refitcore.backends.tensorrt_refit import make_error_recorder

    rec = make_error_recorder(t)
    code = next(iter(t.ErrorCodeTRT.__members__.values()))
    assert rec.report_error(code, "first problem") is False
    rec.report_error(code, "second problem")
    assert rec.num_errors() == 2 and rec.get_error_desc(1) == "second problem"
    taken = rec.take()
    assert len(taken) == 2 and "first problem" in taken[0]
    assert rec.num_errors() == 0 and rec.take() == []


def test_builder_config_sets_refit_and_clears_tf32_by_default():
    t = _real_trt()
    from refitcore import _trt
    from refitcore.backends.tensorrt_build import builder_config

    builder = t.Builder(_trt.logger())
    cfg = builder_config(builder)
    assert cfg.get_flag(t.BuilderFlag.REFIT)
    assert not cfg.get_flag(t.BuilderFlag.TF32)
    assert builder_config(builder, tf32=True).get_flag(t.BuilderFlag.TF32)
    assert not builder_config(builder, refit=False).get_flag(t.BuilderFlag.REFIT)
    with pytest.raises(ValueError, match="precision"):
        builder_config(builder, precision="int8")


def test_fp16_is_refused_with_reason_where_the_api_has_no_fp16_flag():
    t = _real_trt()
    from refitcore import _trt
    from refitcore.backends.tensorrt_build import builder_config
    from refitcore.errors import BackendUnavailableError

    builder = t.Builder(_trt.logger())
    if hasattr(t.BuilderFlag, "FP16"):
        assert builder_config(builder, precision="fp16").get_flag(t.BuilderFlag.FP16)
    else:
        with pytest.raises(BackendUnavailableError, match="FP16"):
            builder_config(builder, precision="fp16")


def test_serialization_config_keeps_weights_and_refittability():
    t = _real_trt()

    class FakeConfig:
        def __init__(self):
            self.flags = {"EXCLUDE_WEIGHTS"}   # as if some earlier code had set it

        def clear_flag(self, f):
            self.flags.discard(f.name)

        def set_flag(self, f):
            self.flags.add(f.name)

    cfg = trt_backend.serialization_config(types.SimpleNamespace(create_serialization_config=FakeConfig), t)
    assert "EXCLUDE_WEIGHTS" not in cfg.flags
    if hasattr(t.SerializationFlag, "INCLUDE_REFIT"):
        assert "INCLUDE_REFIT" in cfg.flags


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


def test_probe_timeout_becomes_a_reason():
    ok, reason = probe(timeout=1.0, command=[sys.executable, "-c", "import time; time.sleep(30)"])
    assert ok is False and "did not finish within 1 s" in reason


def test_probe_crash_becomes_a_reason():
    ok, reason = probe(timeout=60, command=[sys.executable, "-c", "import os; os.abort()"])
    assert ok is False and "killed by signal" in reason


# What TensorRT-RTX 1.7.1.116 said on an NVIDIA H200 (benchmarks/results/build_times.md).
H200_MESSAGE = ("[FAILED_INITIALIZATION] IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine "
                "cannot run on this GPU, which has compute capability 9.0. Supported compute capabilities: 8.0 8.6 "
                "8.9 12.0 12.1 >12.0. TensorRT-RTX does not support this compute capability, so the engine cannot "
                "be rebuilt for it. In throwUnlessComputeCapSupported at /_src/runtime/dispatch/runtime.cpp:84)")


def test_probe_report_is_read_back():
    import json

    report = {"ok": False, "stage": "deserialize", "flavour": "tensorrt_rtx", "version": "1.7.1.116",
              "device": "NVIDIA H200", "cc": "9.0", "reason": H200_MESSAGE}
    line = f"print('REFITCORE-PROBE ' + {json.dumps(json.dumps(report))})"
    ok, reason = probe(timeout=60, command=[sys.executable, "-c", line])
    assert ok is False
    assert reason.startswith("TensorRT-RTX does not support compute capability 9.0 (NVIDIA H200): "
                             "TensorRT-RTX 1.7.1.116 refused to deserialize an engine: [FAILED_INITIALIZATION]"), reason
    assert H200_MESSAGE in reason


def test_probe_without_report_is_an_error_not_a_pass():
    ok, reason = probe(timeout=60, command=[sys.executable, "-c", "print('hello')"])
    assert ok is False and "exited with status 0 without a report" in reason


@pytest.mark.parametrize("report,ok,needle", [
    ({"ok": True, "flavour": "tensorrt", "version": "10.9", "device": "RTX 4090", "cc": "8.9"}, True,
     "built, ran and refitted"),
    ({"ok": False, "stage": "build", "flavour": "tensorrt_rtx", "version": "1.7", "device": "GPU", "cc": "8.6",
      "reason": "Error Code 1: Myelin"}, False, "failed to build a test engine on GPU (compute capability 8.6)"),
    ({"ok": False, "stage": "refit", "flavour": "tensorrt", "version": "10.9", "reason": "refit had no effect"},
     False, "failed to refit"),
], ids=["ok", "build-fails", "refit-fails"])
def test_interpret(report, ok, needle):
    got_ok, reason = interpret(report)
    assert got_ok is ok and needle in reason


def test_build_refuses_without_cuda_and_unknown_options():
    from refitcore.errors import BackendUnavailableError

    with pytest.raises(TypeError, match="unknown TensorRT build option"):
        trt_backend.build(object(), precison="fp32")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
            trt_backend.build(object())


# ---- doctor -------------------------------------------------------------------------------------
def test_doctor_lists_tensorrt_line_matching_usable(capsys):
    from refitcore import doctor

    checks = doctor.doctor()
    items = {c.item: c for c in checks}
    ok, reason = trt_backend.usable()
    trt_line = items["tensorrt backend (build, run, refit)"]
    assert trt_line.value is ok and trt_line.reason == reason
    assert items["backend 'auto' picks"].value == ("tensorrt" if ok else "reference")
    text = doctor.render(checks)
    assert reason in text and ("[ ok ]" if ok else "[FAIL]") in text
    assert doctor.main([]) == 0
    assert doctor.main(["--require-tensorrt"]) == (0 if ok else 1)
    assert doctor.main(["--json"]) == 0
    assert '"item": "backend \'auto\' picks"' in capsys.readouterr().out


# ---- save/load: the plan travels as a raw buffer next to the weights --------------------------
class _SavedImpl:
    backend_name = "tensorrt"
    note = "fake"

    def __init__(self, plan: bytes, weights: dict, meta: dict):
        self.plan, self.weights, self.meta = plan, weights, meta

    def weight_names(self):
        return list(self.weights)

    def serialize(self):
        return {"backend": "tensorrt", "meta": self.meta, "blobs": {"plan": self.plan}}, dict(self.weights)

    @classmethod
    def deserialize(cls, header, arrays):
        return cls(bytes(header["blobs"]["plan"]), arrays, header["meta"])


def _saved_engine(meta):
    from refitcore.engine import IOSpec, RefittableEngine
    from refitcore.weight_map import WeightMap

    impl = _SavedImpl(bytes(range(256)) * 3, {"conv KERNEL": W0["conv KERNEL"]}, meta)
    io = IOSpec(("x",), ((1, 1, 3, 3),), ("float32",), ("output_0",), ((1, 2, 2, 2),))
    return RefittableEngine(impl, WeightMap(), io, "fingerprint")


def test_bundle_carries_the_plan_bytes_and_weights(tmp_path, monkeypatch):
    import refitcore
    from refitcore import _trt

    meta = {"flavour": _trt.flavour() if _trt.available() else None, "trt_version": "x",
            "weight_shapes": {"conv KERNEL": [2, 1, 2, 2]}}
    engine = _saved_engine(meta)
    monkeypatch.setattr(trt_backend, "TensorRTEngine", _SavedImpl)   # no GPU here to deserialize on
    engine.save(tmp_path / "e.trtrefit")
    loaded = refitcore.load(tmp_path / "e.trtrefit")
    assert loaded._impl.plan == engine._impl.plan
    np.testing.assert_array_equal(loaded._impl.weights["conv KERNEL"], W0["conv KERNEL"])
    assert loaded._impl.meta == meta


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
