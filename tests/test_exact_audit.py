"""The cached-vs-fallback audit is exact everywhere: a map that is off by one float32 ulp in one engine
weight fails ``refitcore.gate`` and the plugin's check alike, naming that weight.

One ulp passes any verification tolerance, so only the audit can see it; before the gate and the
culprit finder audited exactly (``refitcore.options.AUDIT_RTOL``), the gate passed it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
import refitcore.refitting.pipeline as pipeline
from pytest_trtrefit.config import RefitConfig
from pytest_trtrefit.service import RefitSession
from refitcore.gating.gate import EXIT_MISMATCH

X = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def new_weights() -> dict:
    torch.manual_seed(1)
    return TwoLinear().state_dict()


def weight_name(engine) -> str:
    return next(n for n in engine.weight_names if n.startswith("fc1/") and "weight" in n)


@pytest.fixture
def plant_one_ulp(monkeypatch):
    """The pipeline's cached mapping, with the first value of one engine weight moved by one ulp."""
    real = pipeline.cached_mapping
    planted: list[str] = []

    def one_ulp_off(weight_map, weights, **kw):
        mapping = dict(real(weight_map, weights, **kw))
        name = next(n for n in mapping if n.startswith("fc1/") and "weight" in n)
        value = mapping[name].copy()
        value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf))
        mapping[name] = value
        planted.append(name)
        return mapping

    monkeypatch.setattr(pipeline, "cached_mapping", one_ulp_off)
    return planted


def test_the_gate_fails_a_one_ulp_map_difference_naming_the_weight(plant_one_ulp):
    engine = refitcore.compile(TwoLinear().eval(), X, backend="reference")
    name = weight_name(engine)
    report = refitcore.gate(engine, new_weights(), [(X,)], model=TwoLinear)
    assert plant_one_ulp == [name]
    assert not report and report.exit_code == EXIT_MISMATCH, str(report)
    assert report.to_json()["paths"]["cached"]["ok"] and report.to_json()["paths"]["fallback"]["ok"]  # verify passes
    assert [f["name"] for f in report.to_json()["audit"]["failures"]] == [name]
    assert f"first {name!r}" in str(report) and "DISAGREE on 1 weight(s)" in str(report)


def test_the_plugin_fails_the_same_one_ulp_map_difference_naming_the_weight(plant_one_ulp):
    session = RefitSession(RefitConfig(enabled=True, backend="reference"))
    with pytest.raises(AssertionError) as err:
        session.check(TwoLinear, new_weights(), X)
    name = plant_one_ulp[0]
    text = str(err.value)
    assert f"culprit: engine weight {name!r}" in text and "cached map vs fallback map: max abs diff" in text
    assert "audit cached vs fallback: FAILED (" in text and session.failures[0]["culprit"] == name


def test_the_culprit_finder_compares_exactly():
    engine = refitcore.compile(TwoLinear().eval(), X, backend="reference")
    name = weight_name(engine)
    state = new_weights()
    mapping = refitcore.cached_mapping(engine.weight_map, state)
    value = mapping[name].copy()
    value.flat[0] = np.nextafter(value.flat[0], np.float32(-np.inf))
    culprit = refitcore.find_culprit(engine, state, mappings={"cached": {**mapping, name: value}})
    assert culprit is not None and culprit.name == name
