"""The plugin with Torch-TensorRT engines, black-box through ``pytester``: ``--trt-refit-compiler=torch_tensorrt``
(its ini mirror, a declaration's ``compiler`` key, a check's ``compiler=`` argument), the header, summary, JSON
and HTML reports, baselines, and the usage errors and skips of a compiler that cannot run as asked.

Runs that compile need ``torch_tensorrt`` (the ``torch_tensorrt`` extra): skipped with the reason otherwise."""
from __future__ import annotations

import json

import pytest

from refitcore.engine import torch_tensorrt_api
from tests.plugin.conftest import model_repo

pytest_plugins = ["pytester"]

AVAILABLE, WHY = torch_tensorrt_api.available()
needs_ttrt = pytest.mark.skipif(not AVAILABLE, reason=WHY)
VERSION = WHY if AVAILABLE else None
TTRT = ("--trt-refit", "--trt-refit-compiler=torch_tensorrt")

MODELS_SRC = '''
import torch
from torch import nn


class ConvBnLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def conv_input():
    return torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def linear_input():
    return torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
'''

FIXTURE_TEST = '''
from hypothesis import given
from pytest_trtrefit.strategies import refit_settings, state_dicts
from tinymodels import ConvBnLinear, conv_input


def test_pretrained(trt_refit):
    trt_refit.check(ConvBnLinear, ConvBnLinear().state_dict(), conv_input())


@refit_settings(max_examples=2)
@given(weights=state_dicts(ConvBnLinear()))
def test_random(trt_refit, weights):
    trt_refit.check(ConvBnLinear, weights, conv_input())
'''


@pytest.fixture(scope="session")
def _warm_imports():
    """Compile and refit once with Torch-TensorRT in this process before any in-process run: pytester
    restores ``sys.modules`` after each run, and Torch-TensorRT (like torch) cannot be imported twice."""
    import hypothesis.extra  # noqa: F401
    import torch

    import refitcore
    from pytest_trtrefit import checks, declarative, html_report, report, service, strategies  # noqa: F401

    if not AVAILABLE:
        return
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    engine = refitcore.compile(model, x, compiler="torch_tensorrt", backend="reference")
    assert refitcore.refit(engine, model.state_dict(), path="fallback", verify_inputs=[x])


@pytest.fixture
def repo(_warm_imports, pytester):
    return model_repo(pytester, "tinymodels", MODELS_SRC)


# ---- runs that compile with Torch-TensorRT ------------------------------------------------------------------
@needs_ttrt
def test_fixture_checks_header_summary_json_html_and_baseline(repo):
    repo.makepyfile(test_models=FIXTURE_TEST)
    result = repo.runpytest_inprocess(*TTRT, "--trt-refit-seed=3", "--trt-refit-report=r.json",
                                      "--trt-refit-html=r.html", "--trt-refit-baseline=save")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        f"trt-refit: compiler=torch_tensorrt {VERSION}, backend=auto, paths=fallback, examples=10, *seed=3*",
        "*trt-refit*",
        "backend: reference*",
        f"compiler: torch_tensorrt {VERSION}",
        "note: torch_tensorrt engines are Torch-TensorRT's own networks*audited exactly*",
        "seed: 3 *paths: fallback*",
        "ConvBnLinear*fallback*",
        "3 path check(s), 0 failed*",
    ])
    report = json.loads((repo.path / "r.json").read_text())
    assert report["status"] == "pass", report["summary"]
    assert report["compilers"] == [{"compiler": "torch_tensorrt", "version": VERSION}]
    assert [(b["compiler"], b["backend"], b["cache"]) for b in report["builds"]] == [("torch_tensorrt", "reference",
                                                                                      None)]
    assert {c["path"] for c in report["checks"]} == {"fallback"} and len(report["checks"]) == 3
    html = (repo.path / "r.html").read_text()
    assert "ConvBnLinear" in html and "KERNEL" in html, html[:2000]   # the per-weight picture: Torch-TensorRT's names
    saved = sorted(p.name for p in (repo.path / ".trtrefit-baselines").iterdir())
    assert saved == ["ConvBnLinear.json"], saved
    # A second run compares against the baseline it saved.
    again = repo.runpytest_inprocess(*TTRT, "--trt-refit-seed=3", "--trt-refit-baseline=compare")
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["baseline compare: OK: 1 model(s)*", "ConvBnLinear  output max abs*ok"])


@needs_ttrt
def test_ini_mirror_and_declared_models_with_the_compiler_key(repo):
    repo.makeini("""
        [pytest]
        trt_refit_compiler = torch_tensorrt
        trt_refit_examples = 2
    """)
    repo.makeconftest('''
from tinymodels import TwoLinear, linear_input


def pytest_trt_refit_models():
    return {"two_linear": {"factory": TwoLinear, "inputs": linear_input(), "checks": ["weights", "sequences"],
                           "input_families": []}}
''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", "--trt-refit-report=r.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"trt-refit: compiler=torch_tensorrt {VERSION}, *paths=fallback, examples=2*"])
    report = json.loads((repo.path / "r.json").read_text())
    assert report["status"] == "pass" and {c["model"] for c in report["checks"]} == {"two_linear"}
    assert {b["compiler"] for b in report["builds"]} == {"torch_tensorrt"}


@needs_ttrt
def test_a_declaration_or_a_check_picks_the_compiler_per_model(repo):
    """The session compiles with refitcore; one declaration and one check ask for Torch-TensorRT."""
    repo.makeconftest('''
from tinymodels import TwoLinear, linear_input


def pytest_trt_refit_models():
    return {"ttrt_linear": {"factory": TwoLinear, "inputs": linear_input(), "checks": ["weights"],
                            "compiler": "torch_tensorrt", "examples": 2, "input_families": []}}
''')
    repo.makepyfile(test_one='''
from tinymodels import TwoLinear, linear_input


def test_both_compilers(trt_refit):
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input())
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input(), compiler="torch-tensorrt")
''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=1", "--trt-refit-report=r.json")
    result.assert_outcomes(passed=2)
    report = json.loads((repo.path / "r.json").read_text())
    paths = sorted((c["model"], c["path"]) for c in report["checks"])
    assert paths == [("TwoLinear", "cached"), ("TwoLinear", "fallback"), ("TwoLinear", "fallback"),
                     ("ttrt_linear", "fallback"), ("ttrt_linear", "fallback")], paths
    assert sorted(c["compiler"] for c in report["compilers"]) == ["refitcore", "torch_tensorrt"], report["compilers"]
    # one engine per architecture and compiler: the declaration and the check share the Torch-TensorRT one
    assert sorted(b["compiler"] for b in report["builds"]) == ["refitcore", "torch_tensorrt"], report["builds"]


PLANTED_TEST = '''
import importlib

import torch
from refitcore.engine import torch_tensorrt_api
from tinymodels import ConvBnLinear, conv_input

CONV_KERNEL = "[CONVOLUTION]-[aten_ops.convolution.default]-[conv/convolution] KERNEL"
BN = "[SCALE]-[aten_ops._native_batch_norm_legit_no_training.default]-[bn/_native_batch_norm_legit_no_training]"


def plant(monkeypatch, edit):
    """Torch-TensorRT's refit map (construct_refit_mapping, what refit_module_weights reads) edited."""
    torch_tensorrt_api.load()
    module = importlib.import_module("torch_tensorrt.dynamo._refit")
    original = module.construct_refit_mapping
    monkeypatch.setattr(module, "construct_refit_mapping", lambda *a, **k: edit(dict(original(*a, **k))))


def weights(seed):
    torch.manual_seed(seed)
    model = ConvBnLinear()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def test_dropped_entry(trt_refit, monkeypatch):
    trt_refit.engine_for(ConvBnLinear, conv_input())
    plant(monkeypatch, lambda m: {k: v for k, v in m.items() if k != CONV_KERNEL})
    trt_refit.check(ConvBnLinear, weights(1), conv_input())


def test_swapped_entries(trt_refit, monkeypatch):
    def swap(m):
        m[BN + " SCALE"], m[BN + " SHIFT"] = m[BN + " SHIFT"], m[BN + " SCALE"]
        return m

    plant(monkeypatch, swap)
    trt_refit.check(ConvBnLinear, weights(2), conv_input())


def test_unplanted(trt_refit):
    trt_refit.check(ConvBnLinear, weights(3), conv_input())
'''


@needs_ttrt
def test_planted_bugs_in_torch_tensorrts_refit_map_fail_the_default_run_and_name_the_weight(repo):
    """The default plugin run (no option but the compiler): Torch-TensorRT's refit map with one entry dropped,
    and separately with two same-shaped entries swapped, fails the check naming the weight(s); the map left
    alone passes."""
    repo.makepyfile(test_planted=PLANTED_TEST)
    result = repo.runpytest_inprocess(*TTRT, "--trt-refit-seed=4", "--trt-refit-report=r.json")
    result.assert_outcomes(failed=2, passed=1)
    out = result.stdout.str()
    kernel = "[CONVOLUTION]-[aten_ops.convolution.default]-[conv/convolution] KERNEL"
    bn = "[SCALE]-[aten_ops._native_batch_norm_legit_no_training.default]-[bn/_native_batch_norm_legit_no_training]"
    result.stdout.fnmatch_lines([
        "*trt-refit check FAILED for model 'ConvBnLinear'",
        "*compiler: torch_tensorrt (its own network and its own refit*",
        "*path 'fallback': the refit did not go through: WeightMappingError*",
        "*reproduce with: pytest --trt-refit --trt-refit-seed=4 --trt-refit-compiler=torch_tensorrt "
        "test_planted.py::test_dropped_entry",
    ])
    assert (f"refit failed on engine weight {kernel!r} (segment _run_on_acc_0, FX node convolution, module conv, "
            f"state_dict keys ['conv.bias', 'conv.weight'])") in out, out
    assert "culprit: none among the weights" not in out, out
    # The swap: the exact audit of Torch-TensorRT's refit against the witness names both weights.
    assert "audit Torch-TensorRT's refit vs witness" in out or "Torch-TensorRT's refit" in out, out
    for name in (f"{bn} SCALE", f"{bn} SHIFT"):
        assert f"_run_on_acc_0:{name}" in out, out
    report = json.loads((repo.path / "r.json").read_text())
    failures = {f["test"].split("::")[1]: f for f in report["failures"]}
    assert set(failures) == {"test_dropped_entry", "test_swapped_entries"}, failures
    assert kernel in failures["test_dropped_entry"]["report"]
    assert failures["test_swapped_entries"]["culprit"] in (f"_run_on_acc_0:{bn} SCALE", f"_run_on_acc_0:{bn} SHIFT")
    assert failures["test_swapped_entries"]["mappings_disagree"]


# ---- what a compiler that cannot run as asked does ----------------------------------------------------------
@needs_ttrt
def test_the_cached_path_is_a_usage_error_naming_the_upstream_removal(repo):
    repo.makepyfile(test_models=FIXTURE_TEST)
    result = repo.runpytest_inprocess(*TTRT, "--trt-refit-paths=both")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --trt-refit-compiler=torch_tensorrt with --trt-refit-paths=both: "
                                 f"Torch-TensorRT {VERSION} has no cached refit path*PR #4342*"
                                 "--trt-refit-paths=fallback*"])


def test_backend_tensorrt_with_torch_tensorrt_is_a_usage_error(repo, monkeypatch):
    monkeypatch.setattr(torch_tensorrt_api, "available", lambda: (True, "2.14.0"))
    repo.makepyfile(test_models=FIXTURE_TEST)
    result = repo.runpytest_inprocess(*TTRT, "--trt-refit-backend=tensorrt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *--trt-refit-compiler=torch_tensorrt*"])


def test_an_unknown_compiler_names_the_valid_ones(pytester):
    result = pytester.runpytest_inprocess("--trt-refit", "--trt-refit-compiler=onnx")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'onnx' is not a compiler; choose one of refitcore, torch_tensorrt*"])


def test_an_unavailable_session_compiler_is_a_usage_error_with_the_reason(repo, monkeypatch):
    """Asked for on the command line or in the ini: a run that would check nothing must not pass."""
    monkeypatch.setattr(torch_tensorrt_api, "available", lambda: (False, "torch_tensorrt cannot be imported (X)"))
    repo.makepyfile(test_models=FIXTURE_TEST)
    result = repo.runpytest_inprocess(*TTRT)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --trt-refit-compiler=torch_tensorrt: torch_tensorrt cannot be imported (X)"])


def test_an_unavailable_compiler_asked_for_by_a_check_or_declaration_skips_with_the_reason(repo, monkeypatch):
    """Asked for by one test (a test file that needs it, on a machine that lacks it): that test is skipped."""
    monkeypatch.setattr(torch_tensorrt_api, "available", lambda: (False, "torch_tensorrt cannot be imported (X)"))
    repo.makeconftest('''
from tinymodels import TwoLinear, linear_input


def pytest_trt_refit_models():
    return {"ttrt": {"factory": TwoLinear, "inputs": linear_input(), "checks": ["weights"],
                     "compiler": "torch_tensorrt"}}
''')
    repo.makepyfile(test_one='''
from tinymodels import TwoLinear, linear_input


def test_ttrt(trt_refit):
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input(), compiler="torch_tensorrt")
''')
    result = repo.runpytest_inprocess("--trt-refit", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED [[]2[]] *compiler='torch_tensorrt': torch_tensorrt cannot be imported (X)"])


def test_a_declaration_with_torch_tensorrt_and_the_cached_path_is_refused(repo):
    repo.makeconftest('''
from tinymodels import TwoLinear, linear_input


def pytest_trt_refit_models():
    return {"ttrt": {"factory": TwoLinear, "inputs": linear_input(), "compiler": "torch_tensorrt",
                     "paths": "both"}}
''')
    result = repo.runpytest_inprocess("--trt-refit")
    result.stdout.fnmatch_lines(["*model 'ttrt': compiler 'torch_tensorrt' has no cached refit path*"])
    assert result.ret != 0


def test_a_declared_model_whose_name_is_no_identifier_runs(repo):
    """Model names such as 'conv_bn_eps1e-3' or 'bert.v2': Hypothesis needs the property's name to be an identifier."""
    repo.makeconftest('''
from tinymodels import TwoLinear, linear_input


def pytest_trt_refit_models():
    return {"two-linear.v2": {"factory": TwoLinear, "inputs": linear_input(), "checks": ["weights"], "examples": 1,
                              "input_families": [], "paths": "fallback"}}
''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=2", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*weights[[]two-linear.v2[]] PASSED*"])
