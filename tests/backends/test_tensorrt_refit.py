"""The thin Refitter adapter (refitcore/backends/tensorrt_refit.py), driven by the real refitter
driver against a fake ``trt.Refitter``, and its error recorder on the real TensorRT API."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from refitcore.errors import RefitError, WeightMappingError
from refitcore.refitting import driver
from tests.backends.fake_trt import LAYERS, W0, FakeImpl, make_engine, new_weights


# ---- the adapter under the real driver ---------------------------------------------------------
def test_driver_refits_every_weight_through_the_adapter():
    eng = make_engine()
    new = new_weights()
    driver.apply_mapping(eng, new, in_place=True)
    for k, v in new.items():
        np.testing.assert_array_equal(eng.impl.device[k], v)   # what TensorRT got
        np.testing.assert_array_equal(eng.impl.mirror[k], v)   # what the mirror says
    assert eng.impl.synced == 1, "the device must be synchronized before refit_cuda_engine"


def test_validation_against_prototype_refuses_before_touching():
    eng = make_engine()
    bad = new_weights()
    bad["conv BIAS"] = np.zeros(3, np.float32)           # wrong count
    with pytest.raises(WeightMappingError, match="conv BIAS"):
        driver.apply_mapping(eng, bad, in_place=True)
    assert eng.impl.last_fake.given == {}, "nothing may be set when validation fails"
    np.testing.assert_array_equal(eng.impl.device["conv BIAS"], W0["conv BIAS"])


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
        np.testing.assert_array_equal(eng.impl.device[k], v)
        np.testing.assert_array_equal(eng.impl.mirror[k], v)


def test_refit_failure_after_partial_apply_rolls_back_to_previous_weights():
    eng = make_engine(fail_refit_after=1)   # applies the first weight, then fails
    with pytest.raises(RefitError) as info:
        driver.apply_mapping(eng, new_weights(), in_place=True)
    assert "refit_cuda_engine returned False" in str(info.value)
    assert "fake failure in the middle" in str(info.value)
    assert info.value.rolled_back
    for k, v in W0.items():
        np.testing.assert_array_equal(eng.impl.device[k], v, err_msg=k)
        np.testing.assert_array_equal(eng.impl.mirror[k], v, err_msg=k)


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


def test_error_recorder_collects_messages(real_trt):
    t = real_trt
    from refitcore.backends.tensorrt_refit import make_error_recorder

    rec = make_error_recorder(t)
    code = next(iter(t.ErrorCodeTRT.__members__.values()))
    assert rec.report_error(code, "first problem") is False
    rec.report_error(code, "second problem")
    assert rec.num_errors() == 2 and rec.get_error_desc(1) == "second problem"
    taken = rec.take()
    assert len(taken) == 2 and "first problem" in taken[0]
    assert rec.num_errors() == 0 and rec.take() == []
