"""The Torch-TensorRT engine kind: Torch-TensorRT's own network, run by the reference backend, refitted by
Torch-TensorRT's own refit code, and every weight it sets checked against a witness (a fresh conversion read
off the network). Planted bugs in its refit map (an entry dropped, two entries swapped) fail and name the weight.

Needs ``torch_tensorrt`` (the ``torch_tensorrt`` extra); skipped with the reason otherwise."""
from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import refitcore
from refitcore.engine import torch_tensorrt_api
from refitcore.errors import BackendUnavailableError, MapCannotServeError, WeightMappingError
from refitcore.refitting.pipeline import WITNESS, run_refit
from refitcore.refitting.prepare import prepare_weights

AVAILABLE, WHY = torch_tensorrt_api.available()
needs_ttrt = pytest.mark.skipif(not AVAILABLE, reason=WHY)
IN_ORDER = ("needs the reference interpreter to run layers in dependency order: Torch-TensorRT's dynamic reshape "
            "takes a shape tensor made by a layer it adds later")


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with random weights (BatchNorm statistics included)."""
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


class Block(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetLike(torch.nn.Module):
    """conv stem + BatchNorm, a residual block, average pool, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.layer1 = Block(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = self.layer1(torch.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


class PoolSplit(torch.nn.Module):
    """Two convolutions around a max pool that ``torch_executed_ops`` sends to PyTorch: two engines."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(self.c2(y).mean((2, 3)))


def bn_eps():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6, eps=1e-3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(6 * 8 * 8, 4)).eval()


def clamped():
    """ReLU6: Torch-TensorRT records its bounds as CONSTANT weights (the witness reads them while they live)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU6(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 3)).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
MAXPOOL = ["aten.max_pool2d.default", "aten.max_pool2d_with_indices.default"]


def compiled(model: torch.nn.Module, x: torch.Tensor = X, **settings):
    settings.setdefault("min_block_size", 1)
    return refitcore.compile(model, x, compiler="torch_tensorrt", backend="reference", **settings)


@pytest.fixture(scope="module")
def resnet():
    model = randomized(ResNetLike(), 1)
    return model, compiled(model)


def eager(model, x=X):
    with torch.no_grad():
        return model(x)


@needs_ttrt
@pytest.mark.parametrize("make", [ResNetLike, bn_eps, clamped], ids=["resnet_like", "bn_eps_1e-3", "relu6"])
def test_compile_matches_eager_and_refit_matches_the_new_weights(make):
    a, b = randomized(make(), 1), randomized(make(), 2)
    engine = compiled(a)
    assert all(n.startswith("_run_on_acc_0:") for n in engine.weight_names), engine.weight_names
    assert any(n.endswith(" KERNEL") and "[CONVOLUTION]-[aten_ops.convolution.default]-[" in n
               for n in engine.weight_names), engine.weight_names
    torch.testing.assert_close(engine(X), eager(a), rtol=1e-4, atol=1e-4)
    result = refitcore.refit(engine, b, path="fallback", verify_inputs=[X], in_place=True)
    assert result, str(result)
    assert result.audit is not None and result.audit.ok and len(result.audit.diffs) == len(engine.weight_names)
    assert "witness_mapping_s" in result.timings
    torch.testing.assert_close(engine(X), eager(b), rtol=1e-4, atol=1e-4)


@needs_ttrt
def test_auto_is_torch_tensorrts_default_path_and_cached_says_it_was_removed(resnet):
    model, engine = resnet
    new = randomized(ResNetLike(), 3)
    result = refitcore.refit(engine, new, path="auto", verify_inputs=[X])
    assert result and result.path == "fallback" and not result.fell_back, str(result)
    with pytest.raises(MapCannotServeError, match=r"removed in 2\.13 by upstream PR #4342"):
        refitcore.refit(engine, new, path="cached")
    # refitcore's own cached map cannot replay Torch-TensorRT's converters either, and says whose they are
    with pytest.raises(MapCannotServeError, match="computed by Torch-TensorRT's converters"):
        refitcore.cached_mapping(engine.weight_map, new)


@needs_ttrt
def test_a_state_dict_refits_like_the_module(resnet):
    _, engine = resnet
    new = randomized(ResNetLike(), 4)
    result = refitcore.refit(engine, new.state_dict(), path="fallback", verify_inputs=[X], reference_model=new)
    assert result, str(result)
    torch.testing.assert_close(result.engine(X), eager(new), rtol=1e-4, atol=1e-4)


@needs_ttrt
def test_weights_are_named_with_segment_node_and_module(resnet):
    _, engine = resnet
    name = next(n for n in engine.weight_names if "layer1.conv2" in n and n.endswith("KERNEL"))
    src = engine.weight_map[name]
    assert src.recipe == "converted"
    assert src.params["segment"] == "_run_on_acc_0" and src.params["module"] == "layer1.conv2"
    assert src.params["node"] and src.params["name"] == name.split(":", 1)[1]
    assert src.keys == ("layer1.conv2.weight",)
    bn = [n for n in engine.weight_names if "[SCALE]" in n and "/bn/" not in n and "-[bn/" in n]
    assert bn and set(engine.weight_map[bn[0]].keys) >= {"bn.weight", "bn.running_var"}, bn


@needs_ttrt
def test_multi_engine_graph_with_torch_executed_ops():
    a, b = randomized(PoolSplit(), 1), randomized(PoolSplit(), 2)
    engine = compiled(a, torch_executed_ops=MAXPOOL)
    segments = {n.split(":", 1)[0] for n in engine.weight_names}
    assert segments == {"_run_on_acc_0", "_run_on_acc_2"}, segments
    cov = engine.summary()
    assert [k for k, _ in cov.segments] == ["tensorrt", "torch", "tensorrt"]
    assert any("max_pool2d" in op for _, op, _, _ in cov.fallback)
    torch.testing.assert_close(engine(X), eager(a), rtol=1e-4, atol=1e-4)
    result = refitcore.refit(engine, b, path="fallback", verify_inputs=[X])
    assert result, str(result)
    torch.testing.assert_close(result.engine(X), eager(b), rtol=1e-4, atol=1e-4)


@needs_ttrt
def test_a_pytorch_segments_parameters_are_engine_weights():
    class Head(torch.nn.Module):   # the linear head runs in PyTorch: its parameters are refitted as TTRT does
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    a, b = randomized(Head(), 1), randomized(Head(), 2)
    engine = compiled(a, torch_executed_ops=["aten.linear.default", "aten.addmm.default"])
    torch_weights = [n for n in engine.weight_names if n.startswith("_run_on_gpu")]
    assert torch_weights and all(engine.weight_map[n].recipe == "copy" for n in torch_weights), engine.weight_names
    result = refitcore.refit(engine, b, path="fallback", verify_inputs=[X])
    assert result, str(result)


@needs_ttrt
@pytest.mark.xfail(raises=KeyError, strict=True, reason=IN_ORDER)
@pytest.mark.parametrize("form", ["Input", "Dim"])
def test_dynamic_batch(form):
    a, b = randomized(bn_eps_pooled(), 1), randomized(bn_eps_pooled(), 2)
    if form == "Input":
        spec = torch_tensorrt_api.load().package.Input(min_shape=(1, 3, 8, 8), opt_shape=(2, 3, 8, 8),
                                                       max_shape=(4, 3, 8, 8), dtype=torch.float32)
        engine = refitcore.compile(a, (spec,), compiler="torch_tensorrt", backend="reference", min_block_size=1)
    else:
        engine = compiled(a, dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4)}})
    xs = [torch.randn(n, 3, 8, 8) for n in (1, 3, 4)]
    for x in xs:
        torch.testing.assert_close(engine(x), eager(a, x), rtol=1e-4, atol=1e-4)
    result = refitcore.refit(engine, b, path="fallback", verify_inputs=xs)
    assert result, str(result)


def bn_eps_pooled():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()


class Unsqueezed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).unsqueeze(1) * 2


class Upsampled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x).view(2, 4, 2, 4).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


NEEDS_LAYER = [
    pytest.param(Unsqueezed, (2, 8), marks=pytest.mark.xfail(
        raises=NotImplementedError, strict=True, reason="needs UNSQUEEZE in the reference interpreter")),
    pytest.param(Upsampled, (1, 3, 4, 4), marks=pytest.mark.xfail(
        raises=NotImplementedError, strict=True, reason="needs RESIZE given by scales in the reference interpreter")),
    pytest.param(Attention, (2, 4, 8), marks=pytest.mark.xfail(
        raises=NotImplementedError, strict=True,
        reason="needs IAttention (ATTENTION_INPUT/OUTPUT) in the reference interpreter")),
]


@needs_ttrt
@pytest.mark.parametrize(("make", "shape"), NEEDS_LAYER, ids=["unsqueeze", "resize_by_scales", "attention"])
def test_models_that_need_more_reference_layers(make, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    a, b = randomized(make(), 1), randomized(make(), 2)
    engine = compiled(a, x)
    torch.testing.assert_close(engine(x), eager(a, x), rtol=1e-4, atol=1e-4)
    result = refitcore.refit(engine, b, path="fallback", verify_inputs=[x])
    assert result, str(result)


# ---- planted bugs in Torch-TensorRT's refit map -------------------------------------------------------------
def _plant(monkeypatch, edit):
    """Make Torch-TensorRT's construct_refit_mapping (what its per-engine refit reads) return ``edit(map)``."""
    torch_tensorrt_api.load()
    refit_module = importlib.import_module("torch_tensorrt.dynamo._refit")
    original = refit_module.construct_refit_mapping

    def planted(*args, **kwargs):
        return edit(dict(original(*args, **kwargs)))

    monkeypatch.setattr(refit_module, "construct_refit_mapping", planted)


def _held(engine):
    return {k: np.array(v, copy=True) for k, v in engine.current_weights().items()}


@needs_ttrt
def test_a_dropped_refit_map_entry_fails_and_names_the_weight(resnet, monkeypatch):
    model, engine = resnet
    engine = engine.clone()
    dropped = next(n for n in engine.weight_names if "layer1.conv1" in n).split(":", 1)[1]
    _plant(monkeypatch, lambda m: {k: v for k, v in m.items() if k != dropped})
    before, new = _held(engine), randomized(ResNetLike(), 5)
    with pytest.raises(WeightMappingError) as err:
        refitcore.refit(engine, new, path="fallback", verify_inputs=[X], in_place=True)
    text = str(err.value)
    assert dropped in text and "segment _run_on_acc_0" in text and "module layer1.conv1" in text, text
    assert "layer1.conv1.weight" in text and "FX node" in text, text
    after = _held(engine)
    assert all(np.array_equal(before[k], after[k]) for k in before)   # nothing was applied
    # The pipeline recording errors (the plugin's checks): a failing report naming the weight.
    report = run_refit(engine, prepare_weights(engine, new), paths=("fallback",), reference=new, samples=[(X,)],
                       record_errors=True)
    assert not report and dropped in (report.records["fallback"].error or ""), report.records["fallback"]


@needs_ttrt
def test_two_swapped_refit_map_entries_fail_the_verdict_and_are_named(resnet, monkeypatch):
    model, engine = resnet
    engine = engine.clone()
    a, b = (n.split(":", 1)[1] for n in engine.weight_names if "layer1.bn1" in n and "[SCALE]" in n)   # SCALE, SHIFT
    def swap(m):
        m[a], m[b] = m[b], m[a]
        return m

    _plant(monkeypatch, swap)
    before, new = _held(engine), randomized(ResNetLike(), 6)
    result = refitcore.refit(engine, new, path="fallback", verify_inputs=[X], in_place=True)
    assert not result and result.restored, str(result)
    failing = {d.name for d in result.audit.failures}
    assert failing == {f"_run_on_acc_0:{a}", f"_run_on_acc_0:{b}"}, str(result.audit)
    after = _held(engine)
    assert all(np.array_equal(before[k], after[k]) for k in before)   # rolled back, all of it
    # The output mismatch carries the culprit: the weight, its segment, FX node and module path.
    report = run_refit(engine, prepare_weights(engine, new), paths=("fallback",), reference=new, samples=[(X,)],
                       record_errors=True)
    assert not report and report.culprit is not None
    assert report.culprit.name in failing, report.culprit
    culprit = str(report.culprit)
    assert "segment='_run_on_acc_0'" in culprit and "module='layer1.bn1'" in culprit, culprit
    assert "fallback map vs witness map" in culprit, culprit
    assert not report.records["fallback"].verdict.ok and report.records[WITNESS].ok


@needs_ttrt
def test_a_weight_left_stale_is_named(resnet, monkeypatch):
    """Torch-TensorRT's map hands the engine's current (old) value for one weight: the refit leaves it stale."""
    _, engine = resnet
    full = next(n for n in engine.weight_names if n.endswith("fc/linear_weight CONSTANT"))
    old = torch.from_numpy(np.array(engine.current_weights()[full], copy=True))

    def stale(m):
        key = full.split(":", 1)[1]
        m[key] = old.reshape(m[key].shape)
        return m

    _plant(monkeypatch, stale)
    result = refitcore.refit(engine, randomized(ResNetLike(), 8), path="fallback")
    assert not result and [d.name for d in result.audit.failures] == [full], str(result.audit)


@needs_ttrt
def test_a_wrong_witness_is_caught_too(resnet, monkeypatch):
    """The audit is a checker: fed a wrong witness (the fresh conversion's kernel scaled) it fails and names it."""
    _, engine = resnet
    kind = engine.kind
    original = type(kind).fallback_mapping
    target = next(n for n in engine.weight_names if n.endswith("KERNEL"))

    def wrong(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out[target] = out[target] * 2
        return out

    monkeypatch.setattr(type(kind), "fallback_mapping", wrong)
    result = refitcore.refit(engine, randomized(ResNetLike(), 7), path="fallback")
    assert not result and [d.name for d in result.audit.failures] == [target], str(result.audit)


# ---- what the compiler option refuses -------------------------------------------------------------------------
@needs_ttrt
def test_backend_tensorrt_says_why_it_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: backend='tensorrt' is the GPU suite's")
    with pytest.raises(BackendUnavailableError, match=r"need a CUDA GPU and torch.cuda.is_available\(\) is False"):
        refitcore.compile(bn_eps(), X, compiler="torch_tensorrt", backend="tensorrt")


def test_settings_without_the_compiler_are_refused():
    with pytest.raises(TypeError, match="compiler='torch_tensorrt'"):
        refitcore.compile(bn_eps(), X, backend="reference", truncate_double=True)
    with pytest.raises(ValueError, match="compiler must be one of"):
        refitcore.compile(bn_eps(), X, backend="reference", compiler="tvm")


@needs_ttrt
def test_keyword_inputs_are_refused_with_the_reason():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    with pytest.raises(ValueError, match="positional tensors"):
        refitcore.compile(Scaled(), args=(torch.randn(1, 4),), kwargs={"scale": 2.0}, compiler="torch_tensorrt",
                          backend="reference")


@needs_ttrt
def test_an_unknown_torch_tensorrt_setting_is_named():
    with pytest.raises(TypeError, match="no compilation setting.*'not_a_setting'"):
        compiled(bn_eps(), not_a_setting=1)


def test_refitcore_imports_without_torch_tensorrt_and_says_why_it_is_missing():
    code = ("import sys, refitcore, refitcore.engine.registry as r; "
            "from refitcore.engine import torch_tensorrt_api as a; "
            "assert 'torch_tensorrt' in r.KINDS; assert 'torch_tensorrt' not in sys.modules; "
            "ok, why = a.available(); print(ok, why)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)   # the project without the directory Torch-TensorRT may come from
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("False"):
        assert "torch_tensorrt cannot be imported" in out.stdout and "torch_tensorrt extra" in out.stdout, out.stdout
