"""The weight map as data: operands, recipes, JSON round trip, and the cached mapping built from it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import refitcore
from refitcore.conversion import recipes
from refitcore.conversion.weight_map import FORMAT_VERSION, WeightMap, WeightSource, operand_keys, rename_keys


def _bn():
    g = torch.Generator().manual_seed(0)
    c = 6
    return dict(weight=torch.randn(c, 2, 3, 3, generator=g, dtype=torch.float64),
                bias=torch.randn(c, generator=g, dtype=torch.float64),
                gamma=torch.randn(c, generator=g, dtype=torch.float64),
                beta=torch.randn(c, generator=g, dtype=torch.float64),
                mean=torch.randn(c, generator=g, dtype=torch.float64),
                var=torch.rand(c, generator=g, dtype=torch.float64) + 0.1)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_fold_recipes_equal_conv_then_batchnorm(with_bias, affine):
    t = _bn()
    eps = 1e-3
    bias = t["bias"] if with_bias else None
    gamma, beta = (t["gamma"], t["beta"]) if affine else (None, None)
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, t["weight"], bias)
    y = torch.nn.functional.batch_norm(y, t["mean"], t["var"], gamma, beta, False, 0.0, eps)
    w = recipes.bn_fold_kernel(weight=t["weight"], gamma=gamma, var=t["var"], eps=eps)
    b = recipes.bn_fold_bias(bias=bias, gamma=gamma, beta=beta, mean=t["mean"], var=t["var"], eps=eps)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, w, b), y, rtol=1e-12, atol=1e-12)
    scale = recipes.bn_scale(gamma=gamma, var=t["var"], eps=eps)
    shift = recipes.bn_shift(gamma=gamma, beta=beta, mean=t["mean"], var=t["var"], eps=eps)
    z = torch.nn.functional.conv2d(x, t["weight"], bias)
    torch.testing.assert_close(z * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), y,
                               rtol=1e-12, atol=1e-12)


def test_bn_fold_uses_eps():
    t = _bn()
    a = recipes.bn_fold_kernel(weight=t["weight"], gamma=t["gamma"], var=t["var"] * 0, eps=1e-3)
    b = recipes.bn_fold_kernel(weight=t["weight"], gamma=t["gamma"], var=t["var"] * 0, eps=1e-5)
    assert not torch.allclose(a, b)


def test_unknown_recipe_and_non_aten_ops_are_refused():
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.apply_recipe("guess", {}, {})
    with pytest.raises(ValueError, match="ATen overload"):
        recipes.resolve_aten_op("os.system.default")
    with pytest.raises(ValueError, match="ATen overload"):
        recipes.resolve_aten_op("aten.t")


def test_operand_trees_evaluate_and_list_their_keys():
    state = {"w": torch.arange(6.0).reshape(2, 3), "v": torch.ones(3)}
    constants = {"c0": np.array([2.0], np.float32)}
    operand = {"op": "aten.mul.Tensor",
               "args": [{"op": "aten.t.default", "args": [{"key": "w"}], "kwargs": {}}, {"const": "c0"}],
               "kwargs": {}}
    assert list(operand_keys(operand)) == ["w"]
    out = recipes.evaluate_operand(operand, state, constants)
    torch.testing.assert_close(out, state["w"].t() * 2)
    indexed = {"op": "aten.split.Tensor", "args": [{"key": "v"}, 1], "kwargs": {}, "index": 2}
    assert recipes.evaluate_operand(indexed, state, constants).shape == (1,)
    assert recipes.evaluate_operand(None, state, constants) is None
    renamed = rename_keys(operand, {"w": "w2"})
    assert list(operand_keys(renamed)) == ["w2"] and list(operand_keys(operand)) == ["w"]


def _small_map() -> WeightMap:
    wm = WeightMap()
    wm.sources["a/conv KERNEL"] = WeightSource("bn_fold_kernel", {"weight": {"key": "conv.weight"},
                                                                  "gamma": {"key": "bn.weight"},
                                                                  "var": {"key": "bn.running_var"}},
                                               {"eps": 1e-3}, (2, 1, 1, 1))
    wm.sources["b/const CONSTANT"] = WeightSource("constant", {"x": {"const": "c0"}}, {}, (2,))
    wm.constants["c0"] = np.array([1.5, -2.0], np.float32)
    wm.tied = [["conv.weight", "alias.weight"]]
    wm.unused_keys = ["bn.num_batches_tracked"]
    wm.key_specs = {"conv.weight": [[2, 1, 1, 1], "float32"], "bn.weight": [[2], "float32"],
                    "bn.running_var": [[2], "float32"]}
    return wm


def test_json_round_trip_is_exact_and_versioned():
    wm = _small_map()
    text = wm.dumps()
    d = json.loads(text)
    assert d["format"] == "refitcore.weight_map" and d["version"] == FORMAT_VERSION
    again = WeightMap.loads(text)
    assert again == wm and again.dumps() == text
    again.constants["c0"] = np.array([1.5, -2.5], np.float32)
    assert again != wm
    assert "bn_fold_kernel(conv.weight, bn.weight, bn.running_var; eps=0.001)" in wm["a/conv KERNEL"].describe()


def test_cached_mapping_of_a_hand_written_map():
    wm = _small_map()
    state = {"conv.weight": torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1), "bn.weight": torch.tensor([1.0, -1.0]),
             "bn.running_var": torch.tensor([0.0, 3.0])}
    out = refitcore.cached_mapping(wm, state)
    expected = np.array([1.0 / np.sqrt(1e-3), -2.0 / np.sqrt(3.001)], np.float32).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(out["a/conv KERNEL"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["b/const CONSTANT"], wm.constants["c0"])
    assert all(v.dtype == np.float32 for v in out.values())


def test_cached_mapping_never_exposes_shared_memory_for_writing(compiled):
    """Editing a mapping (as fault-injection and users do) must not write into the model's tensors,
    the map's constants, or another engine weight that reads the same key: arrays that share memory
    with any of those are read-only (copy recipes pass the state_dict's memory through uncopied)."""
    c = compiled("tied_mlp")
    state = c.fresh(3).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    constants = {k: v.copy() for k, v in c.engine.weight_map.constants.items()}
    mapping = refitcore.cached_mapping(c.engine.weight_map, state)
    shared = 0
    for arr in mapping.values():
        if arr.flags.writeable:
            arr[...] = 123.0
        else:
            shared += 1
            with pytest.raises(ValueError):
                arr[...] = 123.0
    assert shared >= 2  # the tied weight feeds two engine weights straight from the state_dict
    assert all(torch.equal(before[k], v) for k, v in state.items())
    assert all(np.array_equal(constants[k], v) for k, v in c.engine.weight_map.constants.items())
    again = refitcore.cached_mapping(c.engine.weight_map, state)
    writable = [a for a in again.values() if a.flags.writeable]
    assert not any(np.shares_memory(a, b) for a in writable for b in again.values() if a is not b)


# --- tensor constants outside the state_dict ------------------------------------------------------

class ScaledHead(torch.nn.Module):
    """Tensors a state_dict does not hold: a plain tensor attribute, a non-persistent buffer, one
    folded from an attribute (k * 2), and a tensor the forward code creates (a code constant)."""

    def __init__(self, scale: float = 0.5, k: float = 3.0, nb: float = 2.0):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scale = torch.tensor(scale)
        self.k = torch.full((4,), k)
        self.register_buffer("nb", torch.full((4,), nb), persistent=False)

    def forward(self, x):
        return (self.lin(x) * self.scale + self.nb + torch.tensor([1.0, 2.0, 3.0, 4.0])) * (self.k * 2)


def _head(**kw):
    torch.manual_seed(0)
    return ScaledHead(**kw).eval()


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def head_engine():
    return refitcore.compile(_head(), X, backend="reference")


def test_the_map_records_which_model_tensor_each_constant_holds(head_engine):
    wm = head_engine.weight_map
    assert sorted(set(wm.constant_origins.values())) == ["k", "nb", "scale"]   # not the code constant
    assert WeightMap.loads(wm.dumps()).constant_origins == wm.constant_origins
    old = wm.to_json()
    del old["constant_origins"]                     # a map written before origins were recorded
    assert WeightMap.from_json(old).constant_origins is None


@pytest.mark.parametrize("path", ["cached", "auto"])
def test_refit_from_a_module_reads_its_tensor_constants(head_engine, path):
    new = _head(scale=0.7, k=-1.5, nb=0.25)
    result = refitcore.refit(head_engine, new, path=path, verify_inputs=[X], audit=True)
    assert result.ok and result.path == "cached" and not result.fell_back, str(result)
    assert result.audit.ok and result.audit.rtol == 0, str(result)
    assert not result.messages, result.messages
    with torch.no_grad():
        assert torch.allclose(result.engine(X), new(X), rtol=1e-5, atol=1e-5)


def test_a_bare_state_dict_keeps_compile_time_constants_and_says_so(head_engine):
    new = _head(scale=0.7)
    with pytest.warns(RuntimeWarning, match="compile-time"):
        result = refitcore.refit(head_engine, new.state_dict(), path="cached")
    assert any("compile-time" in m and "scale" in m for m in result.messages), result.messages
    assert "compile-time" in str(result)
    # Verified against the model that holds 0.7, the stale 0.5 is never a truthy result.
    for path in ("cached", "auto"):
        with pytest.warns(RuntimeWarning):
            checked = refitcore.refit(head_engine, new.state_dict(), path=path, verify_inputs=[X], reference_model=new)
        assert not checked.ok, str(checked)


def test_a_wrong_constant_origin_fails_audit_and_verification(head_engine):
    wm = WeightMap.loads(head_engine.weight_map.dumps())
    nb = next(c for c, name in wm.constant_origins.items() if name == "nb")
    k = next(c for c, name in wm.constant_origins.items() if name == "k")
    wm.constant_origins[nb], wm.constant_origins[k] = "k", "nb"     # swapped: same shapes, wrong values
    faulty = head_engine.clone()
    faulty.weight_map = wm
    new = _head(scale=0.7, k=-1.5, nb=0.25)
    cached = refitcore.cached_mapping(faulty.weight_map, new)
    report = refitcore.audit_paths(cached, refitcore.fallback_mapping(faulty, new))
    assert not report.ok, str(report)
    assert not refitcore.verify(refitcore.apply_mapping(faulty, cached), new, [X]).ok


def test_auto_falls_back_when_the_map_cannot_serve_the_model(head_engine):
    """A map written before constant origins were recorded cannot read a new model's tensor
    constants: the cached path refuses to guess, auto converts again."""
    engine = head_engine.clone()
    old = engine.weight_map.to_json()
    del old["constant_origins"]
    engine.weight_map = WeightMap.from_json(old)
    new = _head(scale=0.7, k=-1.5, nb=0.25)
    with pytest.raises(refitcore.MapCannotServeError, match="predates"):
        refitcore.cached_mapping(engine.weight_map, new)
    with pytest.raises(refitcore.MapCannotServeError):
        refitcore.refit(engine, new, path="cached")
    result = refitcore.refit(engine, new, path="auto", verify_inputs=[X])
    assert result.ok and result.path == "fallback" and result.fell_back, str(result)
    assert any("cannot serve" in m for m in result.messages), result.messages
    with torch.no_grad():
        assert torch.allclose(result.engine(X), new(X), rtol=1e-5, atol=1e-5)
    # A bare state_dict: compile-time constants, said so.
    with pytest.warns(RuntimeWarning, match="predates"):
        plain = refitcore.refit(engine, new.state_dict(), path="auto")
    assert plain.path == "cached" and any("compile-time" in m for m in plain.messages)


class MaskedByBuffer(torch.nn.Module):
    """Attention whose boolean mask is a non-persistent buffer of the model."""

    def __init__(self, causal: bool = True):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        mask = torch.ones(4, 4, dtype=torch.bool)
        self.register_buffer("mask", mask.tril() if causal else mask.triu(), persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def test_a_boolean_mask_buffer_is_refitted_from_the_module():
    x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    engine = refitcore.compile(MaskedByBuffer().eval(), x, backend="reference")
    torch.manual_seed(0)
    new = MaskedByBuffer(causal=False).eval()
    result = refitcore.refit(engine, new, path="cached", verify_inputs=[x], audit=True)
    assert result.ok and result.audit.ok, str(result)


def test_weights_a_converter_leaves_unnamed_are_an_internal_error():
    """Weights are recorded when their layer is named: a converter that makes weights and names no
    layer would hand them to the next layer under a wrong name, so conversion stops instead."""
    from refitcore import _trt
    from refitcore.conversion.context import ConversionContext

    trt = _trt.trt()
    network = trt.Builder(_trt.logger()).create_network(0)
    network.add_input("x", trt.float32, trt.Dims((1, 4)))
    node = type("Node", (), {"name": "relu", "target": "aten.relu.default"})()
    ctx = ConversionContext(network=network, weight_map=WeightMap(), layer_names={"relu": "model/relu"},
                            fusions_conv_to_bn={}, node=node)
    ctx.new_weights("CONSTANT", np.ones((1, 4), np.float32), "copy", {"x": None})
    with pytest.raises(RuntimeError, match="named no layer"):
        ctx.check_all_named()
    w = ctx.new_weights("CONSTANT", np.ones((1, 4), np.float32), "copy", {"x": None})
    layer = ctx.name(network.add_constant(trt.Dims((1, 4)), w), "c")
    ctx.check_all_named()
    assert layer.name == "model/relu.c" and list(ctx.weight_map.sources) == ["model/relu.c CONSTANT"]
