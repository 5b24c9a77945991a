"""The weight map as data: operands, recipes, JSON round trip, and the cached mapping built from it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import refitcore
from refitcore import recipes
from refitcore.weight_map import FORMAT_VERSION, WeightMap, WeightSource, operand_keys, rename_keys


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
