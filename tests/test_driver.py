"""The Refitter driver: validate everything before touching the engine, list every problem, roll back
when the backend fails half-way, and cast or refuse state_dict dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.backends.reference import ReferenceRefitter
from tests.conftest import bit_identical, outputs
from tests.dynamic_models import tiny_bert

MODEL = "conv_bias_bn"


@pytest.fixture
def engine(compiled):
    """A private copy of the compiled engine (tests here refit it in place)."""
    return compiled(MODEL).engine.clone()


def _good_mapping(compiled, seed=3):
    c = compiled(MODEL)
    return refitcore.cached_mapping(c.engine.weight_map, c.fresh(seed).state_dict())


def test_apply_mapping_refits(compiled, engine):
    c = compiled(MODEL)
    new = c.fresh(3)
    before = outputs(engine, c.x)
    same = refitcore.apply_mapping(engine, _good_mapping(compiled), in_place=True)
    assert same is engine
    assert not bit_identical(before, outputs(engine, c.x))
    assert refitcore.verify(engine, new, [c.x]).ok


def test_apply_mapping_copy_leaves_the_original_alone(compiled, engine):
    c = compiled(MODEL)
    before = outputs(engine, c.x)
    copy = refitcore.apply_mapping(engine, _good_mapping(compiled))
    assert copy is not engine
    assert bit_identical(before, outputs(engine, c.x))
    assert not bit_identical(before, outputs(copy, c.x))


def test_every_problem_is_listed_and_nothing_changes(compiled, engine):
    c = compiled(MODEL)
    good = _good_mapping(compiled)
    kernel, bias = sorted(good)  # "conv/conv2d BIAS", "conv/conv2d KERNEL"
    assert kernel.endswith("BIAS") and bias.endswith("KERNEL")
    kernel, bias = bias, kernel
    bad = dict(good)
    bad[kernel] = good[kernel].reshape(-1)[:-1]          # wrong element count
    nan_bias = good[bias].copy()
    nan_bias[2] = np.nan
    bad[bias] = nan_bias
    bad["no such layer KERNEL"] = np.zeros(3, np.float32)  # unknown name
    before = outputs(engine, c.x)
    weights_before = {k: v.copy() for k, v in engine.current_weights().items()}
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.apply_mapping(engine, bad, in_place=True)
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = str(info.value)
    for name in (kernel, bias, "no such layer KERNEL"):
        assert name in text
    assert "non-finite" in text
    assert bit_identical(before, outputs(engine, c.x))
    assert all(np.array_equal(weights_before[k], v) for k, v in engine.current_weights().items())


@pytest.mark.parametrize("fault", ["inf", "missing", "int", "shape", "bool"])
def test_single_fault_is_refused(compiled, engine, fault):
    c = compiled(MODEL)
    good = _good_mapping(compiled)
    name = next(n for n in good if n.endswith("KERNEL"))
    bad = dict(good)
    if fault == "inf":
        bad[name] = good[name].copy()
        bad[name].reshape(-1)[0] = -np.inf
    elif fault == "missing":
        del bad[name]
    elif fault == "int":
        bad[name] = good[name].astype(np.int32)
    elif fault == "bool":
        bad[name] = good[name] > 0
    elif fault == "shape":
        bad[name] = np.concatenate([good[name].reshape(-1), np.zeros(1, np.float32)])
    before = outputs(engine, c.x)
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.apply_mapping(engine, bad, in_place=True)
    assert len(info.value.problems) == 1 and name in info.value.problems[0], info.value.problems
    assert bit_identical(before, outputs(engine, c.x))


def test_float64_and_torch_values_are_cast(compiled, engine):
    c = compiled(MODEL)
    good = _good_mapping(compiled)
    as64 = {k: torch.from_numpy(v.astype(np.float64)) for k, v in good.items()}
    refitcore.apply_mapping(engine, as64, in_place=True)
    assert refitcore.verify(engine, c.fresh(3), [c.x]).ok
    huge = dict(good)
    name = next(iter(good))
    huge[name] = good[name].astype(np.float64) * 1e300
    with pytest.raises(refitcore.WeightMappingError, match="overflow"):
        refitcore.apply_mapping(engine, huge, in_place=True)


class PartialRefitter(ReferenceRefitter):
    """A backend refitter that applies a subset of the weights, then reports failure."""

    def refit(self) -> bool:
        names = sorted(self._pending)
        self.engine.commit({n: self._pending[n] for n in names[: max(1, len(names) // 2)]})
        self.errors.append("simulated backend failure after a partial update")
        return False


class RaisingRefitter(ReferenceRefitter):
    """A backend refitter that applies a subset of the weights, then raises (as TensorRT may on a
    CUDA error in the middle of ``refit_cuda_engine``)."""

    def refit(self) -> bool:
        names = sorted(self._pending)
        self.engine.commit({n: self._pending[n] for n in names[: max(1, len(names) // 2)]})
        raise RuntimeError("simulated CUDA error: an illegal memory access was encountered")


class RaisingSetter(ReferenceRefitter):
    """A refitter that accepts the first weight, then raises while the second is set."""

    def set_named_weights(self, name, value) -> bool:
        if self._pending:
            raise MemoryError("simulated: out of host memory while copying a weight")
        return super().set_named_weights(name, value)


class RejectingRefitter(ReferenceRefitter):
    def refit(self) -> bool:
        self.errors.append("simulated: refitter refuses everything")
        return False


def _fail_then(engine, monkeypatch, first, then):
    impl = engine.impl
    made = []

    def create(*, adopt=False):
        cls = first if not made else then
        made.append(cls)
        return cls(impl)

    monkeypatch.setattr(impl, "create_refitter", create)
    return made


def test_partial_backend_failure_is_rolled_back(compiled, engine, monkeypatch):
    c = compiled(MODEL)
    before = outputs(engine, c.x)
    made = _fail_then(engine, monkeypatch, PartialRefitter, ReferenceRefitter)
    with pytest.raises(refitcore.RefitError) as info:
        refitcore.apply_mapping(engine, _good_mapping(compiled), in_place=True)
    assert made == [PartialRefitter, ReferenceRefitter]  # the driver re-applied the previous weights
    assert info.value.rolled_back
    assert "simulated backend failure" in str(info.value)
    assert "previous weights" in str(info.value)
    assert bit_identical(before, outputs(engine, c.x))


@pytest.mark.parametrize("first", [RaisingRefitter, RaisingSetter])
def test_refitter_that_raises_is_rolled_back(compiled, engine, monkeypatch, first):
    c = compiled(MODEL)
    before = outputs(engine, c.x)
    weights_before = {k: v.copy() for k, v in engine.current_weights().items()}
    made = _fail_then(engine, monkeypatch, first, ReferenceRefitter)
    with pytest.raises(refitcore.RefitError) as info:
        refitcore.apply_mapping(engine, _good_mapping(compiled), in_place=True)
    assert made == [first, ReferenceRefitter]  # the driver re-applied the previous weights
    assert info.value.rolled_back
    text = str(info.value)
    assert "simulated" in text and "raised" in text and "previous weights" in text, text
    assert isinstance(info.value.__cause__, (RuntimeError, MemoryError))
    assert bit_identical(before, outputs(engine, c.x))
    after = engine.current_weights()
    assert all(np.array_equal(after[k], v) for k, v in weights_before.items())


def test_refitter_that_raises_and_failed_rollback(compiled, engine, monkeypatch):
    _fail_then(engine, monkeypatch, RaisingRefitter, RejectingRefitter)
    with pytest.raises(refitcore.RefitError) as info:
        refitcore.apply_mapping(engine, _good_mapping(compiled), in_place=True)
    assert not info.value.rolled_back
    assert "ROLLBACK FAILED" in str(info.value) and "simulated CUDA error" in str(info.value)


def test_failed_rollback_is_reported(compiled, engine, monkeypatch):
    _fail_then(engine, monkeypatch, PartialRefitter, RejectingRefitter)
    with pytest.raises(refitcore.RefitError) as info:
        refitcore.apply_mapping(engine, _good_mapping(compiled), in_place=True)
    assert not info.value.rolled_back
    assert "ROLLBACK FAILED" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_state_dict_dtypes_are_cast(compiled, dtype):
    c = compiled(MODEL)
    new = c.fresh(4)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in new.state_dict().items()}
    # Eager reference: the same values the engine receives (fp16/bf16 rounding is the input's, not ours).
    new.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    result = refitcore.refit(c.engine, state, verify_inputs=[c.x])
    assert result.ok and result.path == "cached", str(result)


def test_fp64_overflow_names_the_key(compiled):
    c = compiled(MODEL)
    state = {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in c.fresh(4).state_dict().items()}
    state["bn.weight"] = state["bn.weight"] * 1e300
    before = outputs(c.engine, c.x)
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.refit(c.engine, state, in_place=True)
    assert "'bn.weight'" in str(info.value) and "overflow" in str(info.value)
    assert "conv/conv2d KERNEL" in str(info.value)  # the engine weight that needs it
    assert bit_identical(before, outputs(c.engine, c.x))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_where_float_is_needed(compiled, dtype):
    c = compiled(MODEL)
    state = c.fresh(4).state_dict()
    state["conv.weight"] = (state["conv.weight"] * 10).to(dtype)
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.refit(c.engine, state)
    assert "'conv.weight'" in str(info.value) and str(dtype) in str(info.value)


def test_missing_key_names_key_and_engine_weights(compiled):
    c = compiled(MODEL)
    state = c.fresh(4).state_dict()
    del state["bn.running_var"]
    before = outputs(c.engine, c.x)
    for path in ("cached", "fallback"):
        with pytest.raises(refitcore.RefitCoreError) as info:
            refitcore.refit(c.engine, state, path=path, in_place=True)
        text = str(info.value)
        assert "'bn.running_var'" in text, text
        assert "conv/conv2d KERNEL" in text and "conv/conv2d BIAS" in text, text
    assert bit_identical(before, outputs(c.engine, c.x))


def test_wrong_shape_key_names_key(compiled):
    c = compiled(MODEL)
    state = c.fresh(4).state_dict()
    state["conv.bias"] = torch.zeros(9)
    with pytest.raises(refitcore.RefitCoreError) as info:
        refitcore.refit(c.engine, state)
    assert "'conv.bias'" in str(info.value) and "[9]" in str(info.value) and "[8]" in str(info.value)


def test_tied_parameters_with_different_values(compiled):
    c = compiled("tied_mlp")
    state = c.fresh(2).state_dict()
    assert torch.equal(state["fc1.weight"], state["fc2.weight"])
    state["fc2.weight"] = state["fc2.weight"] + 1.0
    for path in ("cached", "fallback"):
        with pytest.raises(refitcore.WeightMappingError) as info:
            refitcore.refit(c.engine, state, path=path)
        assert "'fc1.weight'" in str(info.value) and "'fc2.weight'" in str(info.value)


def test_tied_parameters_refit(compiled):
    c = compiled("tied_mlp")
    new = c.fresh(2)
    for path in ("cached", "fallback"):
        result = refitcore.refit(c.engine, new.state_dict(), path=path, verify_inputs=[c.x])
        assert result.ok, str(result)
    # A checkpoint that stores a tied tensor once (under either name) is enough.
    for keep in ("fc1.weight", "fc2.weight"):
        state = {k: v for k, v in new.state_dict().items() if k not in ("fc1.weight", "fc2.weight") or k == keep}
        result = refitcore.refit(c.engine, state, path="fallback", verify_inputs=[c.x], reference_model=new)
        assert result.ok, f"{keep}: {result}"


def test_refit_with_verification_leaves_the_source_model_alone(compiled):
    """Verification builds an eager model from the engine's exported program; loading the new
    weights into it must not write through to the compiled model's tensors."""
    c = compiled("tied_mlp")
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    ep_before = {k: v.clone() for k, v in c.engine.exported_program.state_dict.items()}
    result = refitcore.refit(c.engine, c.fresh(6).state_dict(), verify_inputs=[c.x])
    assert result.ok, str(result)
    assert all(torch.equal(before[k], v) for k, v in c.model.state_dict().items())
    assert all(torch.equal(ep_before[k], v) for k, v in c.engine.exported_program.state_dict.items())


@pytest.mark.parametrize("form", ["module", "exported_program", "state_dict", "checkpoint", "nested_checkpoint"])
@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_every_form_of_new_weights(compiled, tmp_path, form, path):
    c = compiled(MODEL)
    new = c.fresh(8)
    if form == "module":
        weights = new
    elif form == "exported_program":
        weights = torch.export.export(new, (c.x,))
    elif form == "state_dict":
        weights = new.state_dict()
    else:
        weights = tmp_path / "weights.pt"
        torch.save(new.state_dict() if form == "checkpoint" else {"state_dict": new.state_dict(), "epoch": 3},
                   weights)
    result = refitcore.refit(c.engine, weights, path=path, verify_inputs=[c.x], reference_model=new)
    assert result.ok and result.path == path, str(result)


class _NotWeights:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(compiled, tmp_path):
    c = compiled(MODEL)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": c.fresh(8).state_dict(), "extra": _NotWeights()}, path)
    with pytest.raises(refitcore.WeightMappingError, match="weights-only"):
        refitcore.refit(c.engine, path)


class RejectOneRefitter(ReferenceRefitter):
    """Rejects one weight at set time, as TensorRT does for a value it cannot take."""

    def set_named_weights(self, name, value):
        if name.endswith("BIAS"):
            self.errors.append(f"{name!r}: simulated rejection")
            return False
        return super().set_named_weights(name, value)


class MissingRefitter(ReferenceRefitter):
    def get_missing_weights(self):
        return ["conv/conv2d BIAS"]


@pytest.mark.parametrize("refitter,words", [(RejectOneRefitter, ["'conv/conv2d BIAS': the refitter rejected"]),
                                            (MissingRefitter, ["still misses 1 weight", "conv/conv2d BIAS"])],
                         ids=["rejected", "missing"])
def test_backend_refusals_are_reported_and_rolled_back(compiled, engine, monkeypatch, refitter, words):
    c = compiled(MODEL)
    before = outputs(engine, c.x)
    made = _fail_then(engine, monkeypatch, refitter, ReferenceRefitter)
    with pytest.raises(refitcore.RefitError) as info:
        refitcore.apply_mapping(engine, _good_mapping(compiled), in_place=True)
    assert made == [refitter, ReferenceRefitter] and info.value.rolled_back
    for w in words:
        assert w in str(info.value)
    assert bit_identical(before, outputs(engine, c.x))


def test_large_finite_values_pass_the_finiteness_check_under_strict_numpy_errors():
    """The fast finiteness check (one dot product) may overflow on large finite values: that is
    settled element-wise, never raised or warned, whatever numpy's error settings."""
    import warnings

    from refitcore.refitting.validate import all_finite

    big = np.full(64, 1e25, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            assert all_finite(big)
            assert not all_finite(np.array([1.0, np.inf], np.float32))
            assert not all_finite(np.array([np.nan], np.float64))


def _mlp_with_dropout():
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 3)).eval()


@pytest.mark.parametrize("make, inputs", [
    pytest.param(_mlp_with_dropout, lambda: (torch.randn(2, 6),), id="mlp_dropout"),
    pytest.param(tiny_bert, lambda: (torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)),
                 id="tiny_bert"),
])
@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_a_raw_export_without_batchnorm_refits_through_both_paths(make, inputs, path):
    """``torch.export.export`` as users call it (no BatchNorm, so nothing but the program's dialect
    says it is not lowered yet) as the new weights."""
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    engine = refitcore.compile(model, x, backend="reference")
    new = make().eval()
    program = torch.export.export(new, x)
    result = refitcore.refit(engine, program, path=path, verify_inputs=[x], reference_model=new)
    assert result.ok and result.path == path, str(result)


@pytest.mark.parametrize("bits, what", [(0x7FC0, "nan"), (0x7F80, "inf"), (0xFF80, "-inf")])
def test_a_non_finite_bfloat16_weight_is_refused_and_nothing_changes(bits, what):
    """bfloat16 engine weights are uint16 bit patterns, integers to NumPy: the driver reads them as
    bfloat16 to find NaN/Inf, naming the weight and the index."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    engine = refitcore.compile(model, x, backend="reference", precision="bf16")
    good = refitcore.cached_mapping(engine.weight_map, model.state_dict())
    name = next(k for k in sorted(good) if k.endswith("weight CONSTANT") or "KERNEL" in k)
    bad = dict(good)
    arr = np.array(good[name], copy=True)
    assert arr.dtype == np.uint16
    arr.reshape(-1)[5] = bits
    bad[name] = arr
    before = {k: v.copy() for k, v in engine.current_weights().items()}
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.apply_mapping(engine, bad, in_place=True)
    text = str(info.value)
    assert name in text and "non-finite" in text and what.lstrip("-") in text
    assert all(np.array_equal(before[k], v) for k, v in engine.current_weights().items())
    refitcore.apply_mapping(engine, good, in_place=True)    # the same weights, finite: accepted
