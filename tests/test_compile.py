"""Compile: reference-backend output vs eager, the weight map's coverage, JSON round trip and contents,
and deterministic, unique, explicit layer and weight names."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import refitcore
from refitcore.capture.lowering import export_model
from refitcore.conversion.context import ROLES
from refitcore.conversion.convert import convert
from refitcore.conversion.network_reader import read_network
from refitcore.conversion.weight_map import WeightMap
from tests.conftest import LARGE
from tests.models import MODELS, SMALL, make

ALL = SMALL + LARGE


def _tol(expected: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("name", ALL)
def test_reference_output_matches_eager(compiled, name):
    c = compiled(name)
    expected = c.expected()
    actual = c.engine(c.x)
    assert actual.shape == expected.shape
    err = float((actual - expected).abs().max())
    assert err <= _tol(expected), f"{name}: max abs err {err:.3g} > {_tol(expected):.3g}"
    assert c.engine.backend == "reference"


@pytest.mark.parametrize("name", ALL)
def test_weight_map_covers_exactly_the_refittable_weights(compiled, name):
    e = compiled(name).engine
    names = set(e.weight_names)
    assert names, "a model with parameters must have refittable weights"
    assert names == set(e.weight_map.sources), (
        f"gaps {sorted(names - set(e.weight_map.sources))}, extras {sorted(set(e.weight_map.sources) - names)}")
    current = e.current_weights()
    for wname, src in e.weight_map.sources.items():
        assert current[wname].size == src.count, wname   # TensorRT holds kernels flat
        assert str(current[wname].dtype) == src.dtype, wname
    # Every state_dict key that feeds the network is read by some engine weight; only keys
    # that no layer needs (e.g. num_batches_tracked) or tied aliases are left out.
    state = compiled(name).model.state_dict()
    for key in e.weight_map.unused_keys:
        assert key.endswith("num_batches_tracked") or not state[key].is_floating_point(), key


@pytest.mark.parametrize("name", ALL)
def test_weight_map_json_round_trip(compiled, name):
    wm = compiled(name).engine.weight_map
    text = wm.dumps()
    again = WeightMap.loads(text)
    assert again == wm
    assert again.dumps() == text


def test_weight_map_equality_sees_a_change(compiled):
    """The round-trip test above would be worthless if equality ignored the contents."""
    wm = compiled("conv_bias_bn").engine.weight_map
    text = wm.dumps()
    assert WeightMap.loads(text.replace('"eps": 0.001', '"eps": 0.002')) != wm
    first = next(iter(wm.sources))
    tampered = WeightMap.loads(text)
    src = tampered.sources[first]
    tampered.sources[first] = type(src)(src.recipe, src.inputs, src.params, src.shape, "float16")
    assert tampered != wm


def test_weight_map_rejects_other_versions(compiled):
    d = compiled("conv_bias_bn").engine.weight_map.to_json()
    with pytest.raises(ValueError, match="version"):
        WeightMap.from_json(dict(d, version=99))
    with pytest.raises(ValueError, match="not a refitcore weight map"):
        WeightMap.from_json(dict(d, format="something else"))


def _network_names(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[str]]:
    result = convert(export_model(model, (x,)))
    plan = read_network(result.network)
    return [layer["name"] for layer in plan["layers"]], list(result.weight_map.sources)


@pytest.mark.parametrize("name", ["conv_bn_relu", "depthwise_bn", "residual", "tied_mlp", "resnet18"])
def test_names_are_deterministic_across_exports(name):
    m1, x = make(name, seed=1)
    m2, _ = make(name, seed=2)
    layers1, weights1 = _network_names(m1, x)
    layers2, weights2 = _network_names(m2, x)
    assert layers1 == layers2
    assert weights1 == weights2
    assert len(set(layers1)) == len(layers1), "layer names must be unique"
    assert not any("Unnamed" in n for n in layers1), layers1


class ConvTwice(nn.Module):
    """One module called twice: its two convolutions must get distinct, stable names."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(self.stem(x))))


def test_module_called_twice_gets_unique_names():
    torch.manual_seed(0)
    model = ConvTwice().eval()
    x = torch.randn(1, 3, 16, 16)
    engine = refitcore.compile(model, x, backend="reference")
    names = engine.weight_names
    assert len(names) == len(set(names)) == 6, names
    conv_kernels = [n for n in names if n.startswith("conv/") and n.endswith(" KERNEL")]
    assert len(conv_kernels) == 2, names
    # Both calls read the same state_dict key.
    assert engine.weight_map.consumers("conv.weight") == conv_kernels
    with torch.no_grad():
        expected = model(x)
    assert float((engine(x) - expected).abs().max()) <= _tol(expected)
    # Refit reaches both calls: new weights for the shared conv change both engine weights.
    torch.manual_seed(1)
    other = ConvTwice().eval()
    result = refitcore.refit(engine, other, verify_inputs=[x], audit=True)
    assert result.ok and result.path == "cached", str(result)
    assert _network_names(ConvTwice().eval(), x)[0] == _network_names(other, x)[0]


@pytest.mark.parametrize("name", ALL)
def test_weight_names_are_layer_name_and_role(compiled, name):
    engine = compiled(name).engine
    layer_names = {layer["name"] for layer in engine.impl.plan["layers"]}
    for wname in engine.weight_names:
        layer, _, role = wname.rpartition(" ")
        assert role in ROLES, wname
        assert layer in layer_names, f"{wname!r}: no layer named {layer!r}"
        assert engine.impl.layer_of(wname) == layer


def test_batchnorm_eps_is_recorded(compiled):
    wm = compiled("conv_bias_bn").engine.weight_map
    folded = {n: s for n, s in wm.sources.items() if s.recipe.startswith("bn_fold")}
    assert sorted(s.recipe for s in folded.values()) == ["bn_fold_bias", "bn_fold_kernel"]
    for n, s in folded.items():
        assert s.params["eps"] == pytest.approx(1e-3, rel=1e-12), n
        assert "bn.running_var" in s.keys, n
    bias = next(s for s in folded.values() if s.recipe == "bn_fold_bias")
    assert set(bias.keys) == {"conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    # Default eps elsewhere, and BatchNorm without affine parameters (gamma/beta absent).
    wm2 = compiled("depthwise_bn").engine.weight_map
    eps = {s.params["eps"] for s in wm2.sources.values() if "eps" in s.params}
    assert len(eps) == 1 and eps.pop() == pytest.approx(1e-5, rel=1e-12)
    no_affine = [s for s in wm2.sources.values() if "bn2.running_var" in s.keys]
    assert no_affine and all(s.inputs.get("gamma") is None for s in no_affine)


def test_unfoldable_batchnorm_is_a_scale_layer(compiled):
    wm = compiled("residual").engine.weight_map
    scale = [n for n, s in wm.sources.items() if s.recipe in ("bn_scale", "bn_shift")]
    assert scale and all(n.startswith("shortcut_bn/") for n in scale), scale
    assert sorted(n.rpartition(" ")[2] for n in scale) == ["SCALE", "SHIFT"]


def test_tied_weights_are_recorded(compiled):
    wm = compiled("tied_mlp").engine.weight_map
    assert wm.tied == [["fc1.weight", "fc2.weight"]]
    consumers = wm.consumers("fc1.weight")
    assert len(consumers) == 2, consumers
    assert {c.split("/")[0] for c in consumers} == {"fc1", "fc2"}
    assert "fc2.weight" not in wm.keys_used and "fc2.weight" not in wm.unused_keys


def test_auto_backend_says_what_it_chose():
    model, x = make("conv_bias_bn")
    engine = refitcore.compile(model, x, backend="auto")
    assert engine.backend in ("reference", "tensorrt")
    assert engine.backend_reason
    if engine.backend == "reference":
        assert "unusable" in engine.backend_reason


def test_all_models_listed():
    assert set(ALL) == set(MODELS)


def test_every_engine_kind_implements_the_protocol():
    """A kind is one module with the protocol's members, registered by its name."""
    from refitcore.engine.kinds import EngineKind
    from refitcore.engine.registry import KINDS, kind_named

    members = sorted(n for n in vars(EngineKind) if not n.startswith("_")) + ["name"]
    assert sorted(KINDS) == ["hybrid", "segments", "torch_tensorrt", "whole"]
    for name, kind in KINDS.items():
        assert kind.name == name and kind_named(name) is kind
        assert all(callable(getattr(kind, m)) for m in members if m != "name"), name
    with pytest.raises(KeyError, match="known kinds"):
        kind_named("nope")


# ----------------------------------------------------------------------------- mutations in forward

class _Counter(nn.Module):
    """Counts its calls in a buffer (a buffer mutation)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


class _AddsToInput(nn.Module):
    """Writes into its input (an input mutation)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x.add_(1)
        return self.fc(x)


@pytest.mark.parametrize("model, named", [
    pytest.param(_Counter, "buffer 'calls'", id="buffer"),
    pytest.param(_AddsToInput, "input 'x'", id="input"),
])
def test_a_mutation_in_forward_is_refused_naming_it(model, named):
    x = torch.randn(2, 4)
    for options in ({"strict": True}, {"dynamic_shapes": {"x": {0: (1, 4)}}}):
        with pytest.raises(refitcore.MutationError) as info:
            refitcore.compile(model().eval(), (x.clone(),), backend="reference", **options)
        assert f"forward mutates {named} in place" in str(info.value), options
        assert "clone an input" in str(info.value)


@pytest.mark.parametrize("model", [_Counter, _AddsToInput], ids=["buffer", "input"])
def test_a_mutation_in_forward_runs_eagerly_without_strict(model):
    """Without strict=True the module that mutates runs in PyTorch (its submodules compiled), so a
    call does what eager does: the engine's counter counts, the caller's input is written."""
    torch.manual_seed(0)
    given, x = model().eval(), torch.randn(2, 4)
    engine = refitcore.compile(given, (x.clone(),), backend="reference")
    assert "MutationError" in str(engine.summary())
    compiled = copy.deepcopy(given)   # after compile's own call of forward, as the engine's state is
    for _ in range(2):
        a, b = x.clone(), x.clone()
        with torch.no_grad():
            torch.testing.assert_close(engine(a), compiled(b))
        torch.testing.assert_close(a, b)
