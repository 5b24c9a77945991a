"""The plugin on models with structured inputs and outputs and on partitioned engines, black-box
through ``pytester``: dict outputs named by path, keyword inputs (a ``None`` keyword included) in the
declarative style, a corrupted mapping naming the output and the segment's culprit weight, and the
summary's TensorRT share of a partitioned engine."""
from __future__ import annotations

import json

import pytest

from tests.plugin.conftest import model_repo

pytest_plugins = ["pytester"]

MODELS_SRC = '''
import torch
from torch import nn


class DictHead(nn.Module):
    """Keyword inputs (``scale`` may be None) and a dict output."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x, mask=None, scale=None):
        h = torch.tanh(self.fc1(x))
        if mask is not None:
            h = h * mask
        if scale is not None:
            h = h * scale
        return {"logits": self.fc2(h), "features": h}


def x_input():
    return torch.randn(2, 6, generator=torch.Generator().manual_seed(0))


def mask_input():
    return (torch.arange(12).reshape(2, 6) % 3 != 0).float()


# tanh runs in PyTorch: two TensorRT segments around one PyTorch segment.
PARTITIONED = {"torch_executed_ops": ["aten.tanh.default"], "min_block_size": 1}
'''

DICT_TESTS = '''
from refitcore import Inputs
from tinymodels import DictHead, PARTITIONED, mask_input, x_input


def test_dict_output(trt_refit):
    outcome = trt_refit.check(DictHead, DictHead().state_dict(), x_input())
    assert outcome.ok


def test_keyword_inputs(trt_refit):
    sample = Inputs(x_input(), mask=mask_input(), scale=None)
    trt_refit.check(DictHead, DictHead().state_dict(), [sample, Inputs(x_input() * 2, mask=mask_input(), scale=None)])


def test_partitioned(trt_refit):
    trt_refit.check(DictHead, DictHead().state_dict(), x_input(), name="partitioned", compile_options=PARTITIONED)
'''

CORRUPTED_TESTS = '''
from refitcore import Inputs
from tinymodels import DictHead, PARTITIONED, mask_input, x_input


def swap(engine, a, b):
    wm = engine.weight_map.sources
    assert a in wm and b in wm, list(wm)
    wm[a], wm[b] = wm[b], wm[a]          # the deliberate fault: two same-shape entries swapped


def test_whole_engine_swapped(trt_refit):
    sample = Inputs(x_input(), mask=mask_input())
    swap(trt_refit.engine_for(DictHead, sample), "fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT")
    trt_refit.check(DictHead, DictHead().state_dict(), sample, paths="cached")


def test_partitioned_engine_swapped(trt_refit):
    engine = trt_refit.engine_for(DictHead, x_input(), compile_options=PARTITIONED)
    swap(engine, "seg0:fc1/linear.weight CONSTANT", "seg2:fc2/linear.weight CONSTANT")
    trt_refit.check(DictHead, DictHead().state_dict(), x_input(), compile_options=PARTITIONED, name="partitioned")
'''

DECLARATIVE_CONFTEST = '''
from refitcore import Inputs
from tinymodels import DictHead, PARTITIONED, mask_input, x_input


def pytest_trt_refit_models():
    return {
        "dict_head": (DictHead, Inputs(x_input(), mask=mask_input(), scale=None),
                      {"examples": 2, "checks": ["weights", "sequences"]}),
        "split_head": (DictHead, x_input(), {"examples": 2, "checks": ["weights"], **PARTITIONED}),
    }
'''


@pytest.fixture(scope="session")
def _warm_imports():
    """Compile, refit and verify a structured, partitioned model once in this process before any
    in-process run (pytester restores ``sys.modules`` after each run, and torch cannot import some
    of its modules twice)."""
    import hypothesis.extra  # noqa: F401
    import torch

    import refitcore
    from pytest_trtrefit import checks, declarative, report, service, strategies  # noqa: F401

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, scale=None):
            return {"y": self.fc(torch.tanh(self.fc(x)))}

    model, x = Net().eval(), torch.randn(2, 4)
    engine = refitcore.compile(model, args=(x,), kwargs={"scale": None}, backend="reference",
                               torch_executed_ops=["aten.tanh.default"], min_block_size=1)
    refitcore.refit(engine, model.state_dict(), path="fallback", verify_inputs=[refitcore.Inputs(x, scale=None)])


@pytest.fixture
def repo(_warm_imports, pytester):
    return model_repo(pytester, "tinymodels", MODELS_SRC)




def test_dict_outputs_and_keyword_inputs_pass_and_a_partitioned_engine_shows_its_share(repo):
    repo.makepyfile(test_dict=DICT_TESTS)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=3", "--trt-refit-report=out/r.json")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*= trt-refit =*",
        "model *TRT share*",
        "DictHead *cached,fallback *100% *",
        "partitioned *cached,fallback *67% *",
    ])
    report = json.loads((repo.path / "out" / "r.json").read_text())
    assert report["ok"] is True
    outputs = {c.get("output") for c in report["checks"]}
    assert outputs <= {"logits", "features"} and outputs, outputs
    shares = {m["model"]: m["trt_share"] for m in report["models"]}
    assert shares["DictHead"] == 1.0 and 0.5 < shares["partitioned"] < 1.0, shares
    builds = {json.dumps(b["inputs"]) for b in report["builds"]}
    assert len(report["builds"]) == 3, builds     # plain, keyword (another input spec), partitioned


def test_a_corrupted_mapping_names_the_output_path_and_the_segment_weight(repo):
    repo.makepyfile(test_bad=CORRUPTED_TESTS)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", "--trt-refit-report=out/r.json",
                                      "-p", "no:logging")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "E * trt-refit check FAILED for model 'DictHead'",
        "E * path 'cached', sample 0, output 0 (logits) shape [[]2, 6[]]: * of 12 elements mismatched",
        "E * path 'cached', sample 0, output 1 (features) shape [[]2, 6[]]: * of 12 elements mismatched",
        "E * culprit: engine weight 'fc1/linear.weight CONSTANT' (#1 of 4 in engine order)",
        "E * trt-refit check FAILED for model 'partitioned'",
        "E * path 'cached', sample 0, output 0 (logits) shape *",
        "E * path 'fallback': ok *",
        "E * culprit: engine weight 'seg0:fc1/linear.weight CONSTANT' (#1 of * in engine order)",
    ])
    result.stdout.fnmatch_lines([
        "FAILED test_bad.py::test_whole_engine_swapped: paths cached; culprit weight 'fc1/linear.weight CONSTANT'",
    ])
    report = json.loads((repo.path / "out" / "r.json").read_text())
    failures = {f["test"].split("::")[1]: f for f in report["failures"]}
    assert failures["test_whole_engine_swapped"]["outputs"] == ["logits", "features"]
    assert failures["test_partitioned_engine_swapped"]["culprit"] == "seg0:fc1/linear.weight CONSTANT"
    assert "logits" in failures["test_partitioned_engine_swapped"]["outputs"]
    bad = [c for c in report["checks"] if not c["ok"]]
    assert all("logits" in c["failed_outputs"] for c in bad), bad
    assert any("outputs logits, features" in p for p in report["problems"]), report["problems"]


def test_declared_models_with_keyword_inputs_and_compile_options(repo):
    repo.makeconftest(DECLARATIVE_CONFTEST)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=7", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*conftest.py::trt-refit::weights[[]dict_head[]] PASSED*",
        "*conftest.py::trt-refit::sequences[[]dict_head[]] PASSED*",
        "*conftest.py::trt-refit::weights[[]split_head[]] PASSED*",
        "dict_head *cached,fallback *100% *",
        "split_head *cached,fallback *67% *",
    ])


def test_a_declared_example_without_tensors_is_a_collection_error(repo):
    repo.makeconftest('''
        from refitcore import Inputs
        from tinymodels import DictHead

        def pytest_trt_refit_models():
            return {"empty": (DictHead, Inputs(None, scale=2.0))}
    ''')
    result = repo.runpytest_inprocess("--trt-refit")
    result.stdout.fnmatch_lines(["*model 'empty': example inputs must be a tensor, a tuple of positional inputs or "
                                 "refitcore.Inputs*"])
    assert result.ret != 0
