"""Weightless engines (what the engine cache stores) and a refit that hands its fresh arrays over.

A weightless engine keeps no refittable weight's value; it refuses to run or to be saved with
weights until a refit has set every weight. A refit that hands the cached mapping's arrays to the
engine must still copy whatever aliases the model, so a model changed afterwards never changes
the engine."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.cache.store import EngineCache, lookup
from refitcore.compiler.native import compile_cache_key
from refitcore.engine import bundle
from refitcore.engine.refittable import RefittableEngine
from refitcore.errors import BundleError, WeightlessEngineError, WeightMappingError
from refitcore.refitting.driver import apply_mapping
from tests.models import make


def _weightless(engine: RefittableEngine) -> RefittableEngine:
    header, arrays = engine.to_parts(weights=False)
    return RefittableEngine.from_parts(header, arrays, "<test>")


def _eager(model, *args):
    with torch.no_grad():
        return model.eval()(*args)


@pytest.fixture(scope="module")
def conv():
    model, x = make("conv_bn_relu", 0)
    return model, x, refitcore.compile(model, x, backend="reference")


def test_a_weightless_engine_holds_no_weight_values(conv):
    _, _, engine = conv
    header, arrays = engine.to_parts(weights=False)
    assert header["weights"] == "stripped"
    assert not [k for k in arrays if k.startswith("w/")]
    full = len(bundle.pack(*engine.to_parts()))
    stripped = len(bundle.pack(header, arrays))
    weight_bytes = sum(a.nbytes for a in engine.current_weights().values())
    assert full - stripped >= weight_bytes > 0


def test_it_refuses_to_run_or_save_until_a_refit_sets_every_weight(conv, tmp_path):
    model, x, engine = conv
    empty = _weightless(engine)
    assert empty.weightless
    with pytest.raises(WeightlessEngineError, match="loaded without its weights"):
        empty(x)
    with pytest.raises(WeightlessEngineError):
        empty.run([x])
    with pytest.raises(BundleError, match="weightless"):
        empty.save(tmp_path / "e.engine")
    other, _ = make("conv_bn_relu", 5)
    result = refitcore.refit(empty, other, path="cached", in_place=True, verify_inputs=[(x,)])
    assert result, str(result)
    assert not empty.weightless
    torch.testing.assert_close(empty(x), _eager(other, x), rtol=1e-4, atol=1e-4)
    empty.save(tmp_path / "e.engine")
    assert not refitcore.load(tmp_path / "e.engine").weightless


def test_a_refused_refit_leaves_it_weightless(conv):
    model, x, engine = conv
    empty = _weightless(engine)
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k, v in bad.items() if v.is_floating_point() and v.dim() > 1)
    bad[first][0] = float("nan")
    with pytest.raises(WeightMappingError, match="non-finite"):
        refitcore.refit(empty, bad, path="cached", in_place=True)
    assert empty.weightless
    mapping = refitcore.cached_mapping(engine.weight_map, model)
    del mapping[next(iter(mapping))]                 # one weight short: refused before anything is set
    with pytest.raises(WeightMappingError, match="no value given"):
        apply_mapping(empty, mapping, in_place=True)
    assert empty.weightless
    with pytest.raises(WeightlessEngineError):
        empty(x)


class _Split(nn.Module):
    """A partitioned engine: cumsum runs in PyTorch between two TensorRT segments, and ``scale`` is
    a parameter of the PyTorch segment."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.b(torch.cumsum(torch.relu(self.a(x)), dim=1) * self.scale)


def test_a_partitioned_engine_round_trips_weightless():
    torch.manual_seed(0)
    model, x = _Split().eval(), torch.randn(2, 4, 6)
    engine = refitcore.compile(model, x, backend="reference", min_block_size=1,
                               torch_executed_ops=["aten.cumsum", "aten.mul.Tensor"])
    assert {s.kind for s in engine.impl.segments} == {"tensorrt", "torch"}
    empty = _weightless(engine)
    assert empty.weightless
    torch.manual_seed(1)
    other = _Split().eval()
    assert refitcore.refit(empty, other, path="cached", in_place=True, verify_inputs=[(x,)])
    torch.testing.assert_close(empty(x), _eager(other, x), rtol=1e-5, atol=1e-5)


def test_the_cache_stores_weightless_entries(tmp_path, conv):
    model, x, _ = conv
    engine = refitcore.compile(model, x, backend="reference", cache=str(tmp_path))
    (entry,) = [p for p in os.listdir(tmp_path) if p.endswith(".engine")]
    weight_bytes = sum(a.nbytes for a in engine.current_weights().values())
    assert os.path.getsize(tmp_path / entry) < len(bundle.pack(*engine.to_parts())) - weight_bytes + 4096
    key = compile_cache_key(model, (x,), backend="reference")
    stored = lookup(EngineCache(tmp_path), key)
    assert stored is not None and stored.weightless
    with pytest.raises(WeightlessEngineError):
        stored(x)


def test_changing_the_model_after_a_refit_never_changes_the_engine(conv):
    """The refit hands the fold results over (fresh arrays) but copies the weights that are views of
    the model's parameters (a Linear's weight goes through the 'copy' recipe)."""
    for name in ("conv_bn_relu", "tied_mlp"):
        model, x = make(name, 3)
        engine = refitcore.compile(model, x, backend="reference")
        other, _ = make(name, 4)
        result = refitcore.refit(engine, other, path="cached", in_place=True)
        assert result
        before = engine(x).clone()
        held = {k: v.copy() for k, v in engine.current_weights().items()}
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(-2.0).add_(1.0)
        torch.testing.assert_close(engine(x), before, rtol=0, atol=0)
        for k, v in engine.current_weights().items():
            np.testing.assert_array_equal(v, held[k], err_msg=k)


@pytest.mark.parametrize("hand_over", [False, True])
def test_an_aliased_array_is_copied_whatever_the_caller_hands_over(conv, hand_over):
    """``hand_over`` lets the engine keep the caller's writeable arrays; read-only ones (views of
    someone's memory) are copied in any case, and without it every array is copied."""
    model, x, engine = conv
    mapping = {k: np.array(v, copy=True) for k, v in refitcore.cached_mapping(engine.weight_map, model).items()}
    name = next(iter(mapping))
    shared = mapping[name].view()
    shared.flags.writeable = False
    mapping[name] = shared
    target = apply_mapping(engine, mapping, hand_over=hand_over)
    held = target.current_weights()
    assert not np.shares_memory(held[name], shared)
    other = next(k for k in mapping if k != name)
    assert np.shares_memory(held[other], mapping[other]) is hand_over
    before = target(x).clone()
    if not hand_over:       # the caller keeps its arrays and may write them: the engine must not see it
        for v in mapping.values():
            if v.flags.writeable:
                v[...] = 0
        torch.testing.assert_close(target(x), before, rtol=0, atol=0)


def test_a_weightless_file_loads_weightless_and_runs_after_a_refit(conv, tmp_path):
    model, x, engine = conv
    engine.save(tmp_path / "full.engine")
    engine.save(tmp_path / "small.engine", weights=False)
    assert os.path.getsize(tmp_path / "small.engine") < os.path.getsize(tmp_path / "full.engine")
    loaded = refitcore.load(tmp_path / "small.engine")
    assert loaded.weightless
    with pytest.raises(WeightlessEngineError):
        loaded(x)
    assert refitcore.refit(loaded, model, path="cached", in_place=True, verify_inputs=[(x,)])
    torch.testing.assert_close(loaded(x), engine(x), rtol=0, atol=0)


def test_a_weightless_engine_has_no_current_weights_and_clones_weightless(conv):
    model, x, engine = conv
    empty = _weightless(engine)
    with pytest.raises(WeightlessEngineError):
        empty.current_weights()
    result = refitcore.refit(empty, model, path="cached")          # on a clone: the original stays empty
    assert result and not result.engine.weightless and empty.weightless
    torch.testing.assert_close(result.engine(x), engine(x), rtol=0, atol=0)


def test_torch_tensors_handed_over_are_still_copied(conv):
    """A tensor may be a model's own memory: the driver never lets the engine keep it."""
    model, x, engine = conv
    tensors = {k: torch.from_numpy(np.array(v, copy=True))
               for k, v in refitcore.cached_mapping(engine.weight_map, model).items()}
    target = apply_mapping(engine, tensors, hand_over=True)
    before = target(x).clone()
    for t in tensors.values():
        t.zero_()
    torch.testing.assert_close(target(x), before, rtol=0, atol=0)


class _SliceOut(nn.Module):
    """A partitioned engine whose second output is a view of a PyTorch segment's parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.cumsum(self.a(x), dim=1) * self.scale, self.scale[:3]


def test_an_output_that_views_a_parameter_is_the_callers_copy():
    torch.manual_seed(0)
    model, x = _SliceOut().eval(), torch.randn(2, 4, 6)
    engine = refitcore.compile(model, x, backend="reference", min_block_size=1,
                               torch_executed_ops=["aten.cumsum", "aten.mul.Tensor", "aten.slice.Tensor"])
    held = {k: v.copy() for k, v in engine.current_weights().items()}
    first, view = engine(x)
    view.fill_(123.0)
    for k, v in engine.current_weights().items():
        np.testing.assert_array_equal(v, held[k], err_msg=k)
    torch.testing.assert_close(engine(x)[1], model.scale[:3].detach())
