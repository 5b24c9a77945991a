"""The GPU path of the Torch-TensorRT engine kind (backend='tensorrt'), driven on the CPU through a fake
of Torch-TensorRT's public API: ``torch_tensorrt.dynamo.compile`` returns Torch-TensorRT's partitioned
module whose ``_run_on_acc_N`` engines are reference engines, ``refit_module_weights`` records its call
and sets a fresh conversion's weights into a copy, and TensorRT's Refitter is a stand-in over a
reference engine. It shows the calls made, that the audit reads the weights back off the engines and
compares them with the witness, and that a refit leaving a weight stale is caught and named.

Needs ``torch_tensorrt`` (the CPU harness builds the witness); skipped with the reason otherwise."""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

import refitcore
from refitcore.engine import torch_tensorrt as ttrt, torch_tensorrt_api
from refitcore.errors import BackendUnavailableError, MapCannotServeError, WeightMappingError
from refitcore.refitting.pipeline import run_refit
from refitcore.refitting.prepare import prepare_weights

AVAILABLE, WHY = torch_tensorrt_api.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

X = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def seeded(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


class FakeWeights:
    def __init__(self, array: np.ndarray):
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


class FakeRefitter:
    """TensorRT's Refitter over a reference engine: reads flat weights, writes through its refitter."""

    def __init__(self, engine):
        self.engine = engine
        self.staged: dict[str, np.ndarray] = {}

    def get_all_weights(self):
        return self.engine.weight_names()

    def get_named_weights(self, name):
        return FakeWeights(np.array(self.engine.current_weights()[name]).reshape(-1))

    def set_named_weights(self, name, weights):
        self.staged[name] = np.asarray(weights)
        return name in self.engine.weight_names()

    def refit_cuda_engine(self):
        refitter = self.engine.create_refitter()
        shapes = {n: v.shape for n, v in self.engine.current_weights().items()}
        for name, arr in self.staged.items():
            if not refitter.set_named_weights(name, arr.reshape(shapes[name])):
                return False
        return refitter.refit()


class FakeTRTEngine:
    """Torch-TensorRT's Python-runtime engine: runs like the reference engine it holds at ``cuda_engine``."""

    def __init__(self, engine):
        self.cuda_engine = engine

    def run(self, inputs):
        return self.cuda_engine.run(inputs)


class FakeTorchTensorRT:
    """``torch_tensorrt`` as the GPU path calls it: ``dynamo.compile`` and ``dynamo.refit_module_weights``
    (whose keyword arguments are those of the real one); ``stale``: a weight its refit does not set."""

    def __init__(self, reference_engine):
        self.reference = reference_engine
        self.calls: list[tuple[str, dict]] = []
        self.stale: str | None = None
        self.runtime = "python"   # Torch-TensorRT's Python runtime (TRTEngine); "c++": no cuda_engine
        self.dynamo = types.SimpleNamespace(compile=self.compile, refit_module_weights=self.refit_module_weights)

    def compile(self, exported, inputs, **settings):
        self.calls.append(("compile", {"inputs": inputs, **settings}))
        module = copy.deepcopy(self.reference.impl.module)
        for segment, sub in module.named_children():
            if segment.startswith(ttrt.ACC) and self.runtime == "python":
                sub.engine = FakeTRTEngine(sub.engine)
        return module

    def refit_module_weights(self, compiled_module, new_weight_module, arg_inputs=None, in_place=False,
                             verify_output=False, use_weight_map_cache=True):
        self.calls.append(("refit_module_weights", {"arg_inputs": arg_inputs, "in_place": in_place,
                                                    "verify_output": verify_output,
                                                    "use_weight_map_cache": use_weight_map_cache}))
        module = compiled_module if in_place else copy.deepcopy(compiled_module)
        fresh = refitcore.fallback_mapping(self.reference, dict(new_weight_module.state_dict))
        for segment, sub in module.named_children():
            if segment.startswith(ttrt.ACC):
                refitter = FakeRefitter(sub.engine.cuda_engine)
                for name in refitter.get_all_weights():
                    if f"{segment}:{name}" != self.stale:
                        refitter.set_named_weights(name, fresh[f"{segment}:{name}"].reshape(-1))
                assert refitter.refit_cuda_engine()
        return module


@pytest.fixture
def fake_gpu(monkeypatch):
    reference = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="reference", min_block_size=1)
    fake = FakeTorchTensorRT(reference)
    api = torch_tensorrt_api.load()
    monkeypatch.setattr(api, "package", fake)
    monkeypatch.setattr(torch_tensorrt_api.TorchTensorRT, "refitter", staticmethod(FakeRefitter))
    monkeypatch.setattr(torch_tensorrt_api.TorchTensorRT, "weights", staticmethod(lambda a: a))
    monkeypatch.setattr(ttrt, "cuda_available", lambda: True)
    monkeypatch.setattr(ttrt, "DEVICE", "cpu")
    return fake


def _eager(model):
    with torch.no_grad():
        return model(X)


def test_compile_goes_through_the_public_api(fake_gpu):
    engine = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)
    assert isinstance(engine.impl, ttrt.TorchTensorRTGpuImpl) and engine.impl.backend_name == "tensorrt"
    (name, call), = fake_gpu.calls
    assert name == "compile" and call["immutable_weights"] is False
    assert call["min_block_size"] == 1
    assert not any(n.startswith("_run_on_gpu") for n in engine.weight_names)   # the MLP is one TensorRT engine
    assert torch.equal(call["inputs"][0], X)
    # the weights are read back off the engines, named as Torch-TensorRT names them
    assert sorted(engine.impl.weight_names()) == sorted(engine.weight_map.sources)
    assert any("[MATRIX_MULTIPLY]" in n or "CONSTANT" in n for n in engine.impl.weight_names())
    assert torch.allclose(engine(X), _eager(seeded(0)), rtol=1e-5, atol=1e-5)


def test_fallback_refit_calls_refit_module_weights_and_is_audited_exactly(fake_gpu):
    engine = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)
    new = seeded(1)
    for path in ("fallback", "auto"):
        fake_gpu.calls.clear()
        result = refitcore.refit(engine, new, path=path, verify_inputs=[X])
        assert result, str(result)
        (name, call), = fake_gpu.calls
        assert name == "refit_module_weights"
        assert call["in_place"] is False and call["verify_output"] is False and call["use_weight_map_cache"] is False
        assert torch.equal(call["arg_inputs"][0], X)
        assert torch.allclose(result.engine(X), _eager(new), rtol=1e-5, atol=1e-5)
        witness = refitcore.fallback_mapping(engine, new)
        held = result.engine.impl.current_weights()
        assert held.keys() == witness.keys()
        assert all(np.array_equal(held[k], witness[k]) for k in held)
    # the compiled engine is untouched (refit works on a copy)
    assert torch.allclose(engine(X), _eager(seeded(0)), rtol=1e-5, atol=1e-5)


def test_engine_weights_that_differ_from_the_witness_network_are_named(fake_gpu):
    """A compiled module partitioned otherwise than the CPU harness's network: refused, naming each weight."""
    with pytest.raises(WeightMappingError, match=r"list different weights") as err:
        refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=5)
    assert "fc1.weight" in str(err.value), str(err.value)


def test_a_weight_the_refit_leaves_stale_is_caught_and_named(fake_gpu):
    engine = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)
    stale = next(n for n in engine.weight_names if "fc2" in n and "weight" in n)
    fake_gpu.stale = stale
    before = engine.impl.current_weights()
    result = refitcore.refit(engine, seeded(1), path="fallback", verify_inputs=[X], in_place=True)
    assert not result, str(result)
    failing = {d.name for d in result.audit.failures}
    assert failing == {stale}, str(result.audit)
    after = engine.impl.current_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)   # rolled back through the Refitter
    # the output mismatch carries the culprit: the weight, its segment and module path
    report = run_refit(engine, prepare_weights(engine, seeded(1)), paths=("fallback",), reference=seeded(1),
                       samples=[(X,)], record_errors=True)
    assert not report and report.culprit is not None and report.culprit.name == stale, report.culprit
    culprit = str(report.culprit)
    assert "segment='_run_on_acc_0'" in culprit and "module='fc2'" in culprit, culprit


def test_cached_path_is_refused_with_the_reason(fake_gpu):
    engine = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)
    with pytest.raises(MapCannotServeError, match="construct_refit_mapping_from_weight_name_map"):
        refitcore.refit(engine, seeded(1), path="cached", verify_inputs=[X])
    assert fake_gpu.calls[-1][0] == "compile"   # refit_module_weights was not called


def test_engines_of_the_cpp_runtime_are_refused_with_the_reason(fake_gpu):
    fake_gpu.runtime = "c++"
    with pytest.raises(torch_tensorrt_api.TorchTensorRTUnavailableError, match=r"_run_on_acc_0 runs on "
                       r"Torch-TensorRT's C\+\+ runtime \(ReferenceEngine\)"):
        refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)


def test_without_cuda_the_refusal_stays():
    if ttrt.cuda_available():
        pytest.skip("a CUDA device is present: the GPU path runs here")
    with pytest.raises(BackendUnavailableError, match=r"need a CUDA GPU and torch.cuda.is_available\(\) is False"):
        refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt")
