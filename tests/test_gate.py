"""``refitcore.gate``: the gate as a function; its GateReport is truthy only when every check passed,
and fed a wrong mapping (two same-shape engine weights swapped in the map) it fails naming the weight."""
from __future__ import annotations

import json

import pytest
import torch

import refitcore
from refitcore.gating.gate import EXIT_MISMATCH, EXIT_OK, EXIT_UNUSABLE, GateReport
from refitcore.refitting.report_schema import validate
from tests.cli_models import other_net, randomized_state, small_net

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SWAP = ("conv/conv2d BIAS", "conv2/conv2d BIAS")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    engine = refitcore.compile(small_net(), X, backend="reference", model_factory="tests.cli_models:small_net")
    engine.save(d / "m.trtrefit")
    torch.save(randomized_state(1), d / "good.pt")
    return d


def test_a_good_checkpoint_passes(bundle):
    report = refitcore.gate(bundle / "m.trtrefit", bundle / "good.pt", "random:2", model=small_net)
    assert report and report.ok and report.exit_code == EXIT_OK and report.error is None, str(report)
    data = report.to_json()
    assert data["status"] == "pass" and set(data["paths"]) == {"cached", "fallback"} and data["audit"]["ok"]
    json.dumps(data, default=str)  # JSON-able
    validate(data)   # the shared report schema, as the plugin's report
    assert data["schema"] == "trtrefit.report/1" and data["producer"] == "trtrefit gate" and data["ok"] is True
    assert {c["path"] for c in data["checks"]} == {"cached", "fallback"} and all(c["ok"] for c in data["checks"])
    assert data["paths"]["cached"]["checks"] == 1 and data["paths"]["cached"]["failed"] == 0
    assert str(report).startswith("trtrefit gate: PASS") and "audit cached vs fallback: agree" in str(report)
    md = report.to_markdown()
    assert md.startswith("### trtrefit gate: PASS") and "| cached |" in md and "| fallback |" in md


def test_in_memory_engine_weights_and_samples(bundle):
    engine = refitcore.load(bundle / "m.trtrefit")
    report = refitcore.gate(engine, randomized_state(2), [(X,)], paths="cached", model=small_net())
    assert report.ok and list(report.to_json()["paths"]) == ["cached"], str(report)


@pytest.mark.parametrize("paths", ["cached", "both"])
def test_swapped_map_entries_fail_naming_the_weight(bundle, paths):
    engine = refitcore.load(bundle / "m.trtrefit")
    src = engine.weight_map.sources
    a, b = SWAP
    assert src[a].shape == src[b].shape
    src[a], src[b] = src[b], src[a]
    report = refitcore.gate(engine, bundle / "good.pt", "random:2", paths=paths, model=small_net)
    assert not report and report.exit_code == EXIT_MISMATCH and report.verdict == "fail"
    assert report.culprits["cached"] in SWAP
    assert report.culprits["cached"] in str(report) and "recipe" in report.to_json()["paths"]["cached"]["note"]
    assert "**FAIL**" in report.to_markdown() and report.culprits["cached"] in report.to_markdown()
    assert {f["name"] for f in report.to_json()["audit"]["failures"]} == set(SWAP)
    validate(report.to_json())
    failing = [c for c in report.to_json()["checks"] if not c["ok"]]
    assert [c["path"] for c in failing] == ["cached"] and failing[0]["culprit"] in SWAP and failing[0]["max_abs"] > 0
    assert report.to_json()["status"] == "fail" and report.to_json()["ok"] is False
    if paths == "both":
        assert report.to_json()["paths"]["fallback"]["ok"]


def test_unusable_inputs_are_reports_not_exceptions(bundle, tmp_path):
    torch.save(randomized_state(3, other_net), tmp_path / "other.pt")
    other = refitcore.gate(bundle / "m.trtrefit", tmp_path / "other.pt", "random:1", model=small_net)
    assert not other and other.exit_code == EXIT_UNUSABLE and "recompile needed" in other.error
    missing = refitcore.gate(tmp_path / "nope.trtrefit", bundle / "good.pt", "random:1", model=small_net)
    assert missing.exit_code == EXIT_UNUSABLE and "no such file" in str(missing)
    bad = refitcore.gate(bundle / "m.trtrefit", bundle / "good.pt", "random:0", model=small_net)
    assert bad.exit_code == EXIT_UNUSABLE and "random:N" in bad.error
    assert bad.to_markdown().startswith("### trtrefit gate: ERROR")


def test_nan_weights_are_refused_with_exit_1(bundle):
    state = randomized_state(4)
    state["fc.weight"][0, 0] = float("inf")
    report = refitcore.gate(bundle / "m.trtrefit", state, "random:1", model=small_net)
    assert report.exit_code == EXIT_MISMATCH and "'fc.weight'" in str(report) and "Inf" in str(report)


def test_report_object_alone():
    data = {"tool": "trtrefit", "status": "fail", "bundle": "b", "checkpoint": "c", "rtol": 1e-4, "atol": 1e-4,
            "paths": {}, "audit": None, "problems": ["x"], "exit_code": 1}
    report = GateReport(data)
    assert not report and report.to_json() is data and "problem: x" in str(report)
    assert GateReport(dict(data, status="pass", problems=[], exit_code=0))


def test_unknown_paths_are_a_report_with_exit_2_not_an_exception(bundle):
    report = refitcore.gate(bundle / "m.trtrefit", bundle / "good.pt", "random:1", paths="sideways", model=small_net)
    assert not report and report.exit_code == EXIT_UNUSABLE and report.verdict == "error"
    assert "sideways" in report.error and "cached" in report.error, report.error
