"""The refit service and its mismatch report, fed deliberately wrong mappings (no pytester)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
import refitcore.refitting.pipeline as pipeline
from pytest_trtrefit.config import RefitConfig
from pytest_trtrefit.engines import architecture_key
from pytest_trtrefit.service import RefitSession


class ConvBnHead(nn.Module):
    def __init__(self, flag: bool = False):
        super().__init__()
        self.flag = flag
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(-y if self.flag else y)


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def weights(seed: int) -> dict:
    torch.manual_seed(seed)
    m = ConvBnHead()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.running_mean.normal_(0, 0.5)
        m.bn.weight.normal_(1, 0.2)
    return m.state_dict()


@pytest.fixture
def session():
    """A fresh session (its own compile cache), so faults injected into an engine stay in the test."""
    return RefitSession(RefitConfig(enabled=True, backend="reference"))


def test_a_correct_refit_passes_through_both_paths(session):
    outcome = session.check(ConvBnHead, weights(1), [X, torch.randn(1, 3, 8, 8)])
    assert outcome.ok and [p.path for p in outcome.paths] == ["cached", "fallback"]
    assert outcome.mapping_audit is not None and outcome.mapping_audit.ok
    assert len(session.builds) == 1 and {r["path"] for r in session.records} == {"cached", "fallback"}


def test_the_compile_cache_builds_each_architecture_once(session):
    first = session.engine_for(ConvBnHead, X)
    assert session.engine_for(ConvBnHead(), torch.zeros(1, 3, 8, 8)) is first        # same spec: cached
    assert session.engine_for(ConvBnHead, torch.zeros(2, 3, 8, 8)) is not first       # other input spec
    assert architecture_key(ConvBnHead(flag=True)) != architecture_key(ConvBnHead())  # config attributes count
    assert len(session.builds) == 2


def test_wrong_batchnorm_eps_in_the_map_names_the_folded_kernel(session):
    engine = session.engine_for(ConvBnHead, X)
    name = "conv/conv2d KERNEL"
    src = engine.weight_map.sources[name]
    engine.weight_map.sources[name] = dataclasses.replace(src, params={**src.params, "eps": 0.3})
    with pytest.raises(AssertionError) as err:
        session.check(ConvBnHead, weights(2), X)
    text = str(err.value)
    assert "path 'cached', sample 0, output 0" in text and "path 'fallback': ok" in text
    assert "culprit: engine weight 'conv/conv2d KERNEL' (#1 of 4 in engine order)" in text
    assert "eps=0.3" in text and "cached map vs fallback map: max abs diff" in text
    assert "TensorRT's kernels were NOT exercised" in text
    assert session.failures[0]["culprit"] == name


def test_a_weight_left_stale_by_the_driver_is_caught_by_the_engine_witness(session, monkeypatch):
    """A driver that forgets one weight: both mappings agree, the engine's held weight does not."""
    stale = "fc/linear.bias CONSTANT"
    real_apply = refitcore.apply_mapping

    def forgetful_apply(engine, mapping, in_place=False, **kw):
        previous = engine.current_weights()[stale]
        return real_apply(engine, {**mapping, stale: np.array(previous, copy=True)}, in_place=in_place, **kw)

    session.check(ConvBnHead, weights(3), X)               # a first refit, so the stale value is wrong
    monkeypatch.setattr(pipeline, "apply_mapping", forgetful_apply)
    with pytest.raises(AssertionError) as err:
        session.check(ConvBnHead, weights(4), X, paths="cached")
    text = str(err.value)
    assert f"culprit: engine weight {stale!r}" in text
    assert "engine after cached refit vs cached map: max abs diff" in text


def test_a_sequence_that_does_not_return_to_its_start_fails(session, monkeypatch):
    """A -> B -> A must give A's outputs bit for bit; a refit that leaves B's bias behind fails."""
    a, b = weights(5), weights(6)
    session.check_sequence(ConvBnHead, [a, b, a], X)       # correct: passes
    real_apply = refitcore.apply_mapping
    stale = "fc/linear.bias CONSTANT"
    calls = []

    def apply_skipping_on_return(engine, mapping, in_place=False, **kw):
        calls.append(1)
        if len(calls) == 3:                                  # the return to A keeps B's bias
            mapping = {**mapping, stale: np.array(engine.current_weights()[stale], copy=True)}
        return real_apply(engine, mapping, in_place=in_place, **kw)

    monkeypatch.setattr(pipeline, "apply_mapping", apply_skipping_on_return)
    with pytest.raises(AssertionError) as err:
        session.check_sequence(ConvBnHead, [a, b, a], X, paths="cached")
    text = str(err.value)
    assert "1 of 3 step(s) failed" in text and "step 2" in text
    assert f"culprit: engine weight {stale!r}" in text


def test_unusable_weights_are_reported_not_crashed_on(session):
    state = weights(7)
    del state["bn.running_var"]
    with pytest.raises(AssertionError) as err:
        session.check(ConvBnHead, state, X)
    text = str(err.value)
    assert "the refit did not go through" in text and "bn.running_var" in text


def test_weights_of_the_wrong_shape_name_the_key(session):
    state = weights(8)
    state["fc.weight"] = torch.zeros(3, 5)
    with pytest.raises(AssertionError) as err:
        session.check(ConvBnHead, state, X)
    text = str(err.value)
    assert "ArchitectureMismatchError" in text and "'fc.weight': shape [3, 5]" in text


@pytest.mark.parametrize("bad, message", [
    pytest.param(dict(paths=("cached", "gpu")), "each path must be 'cached' or 'fallback'", id="paths"),
    pytest.param(dict(paths=()), "each path must be 'cached' or 'fallback'", id="no-paths"),
    pytest.param(dict(rtol=float("nan")), "rtol=nan: a tolerance must be finite and >= 0", id="nan-rtol"),
    pytest.param(dict(atol=float("nan")), "atol=nan: a tolerance must be finite and >= 0", id="nan-atol"),
    pytest.param(dict(rtol=-1e-4), "rtol=-0.0001: a tolerance must be finite and >= 0", id="negative-rtol"),
    pytest.param(dict(atol=float("inf")), "atol=inf: a tolerance must be finite and >= 0", id="inf-atol"),
])
def test_invalid_check_arguments(session, bad, message):
    with pytest.raises(ValueError, match=message):
        session.check(ConvBnHead, weights(0), X, **bad)


def test_a_factory_that_returns_no_module_is_refused(session):
    with pytest.raises(TypeError, match="returned int, not a torch.nn.Module"):
        session.check(lambda: 3, {}, X)
