"""The pytest plugin, black-box through ``pytester``: options, skips, checks, reports, declarative use."""
from __future__ import annotations

import json
import re

import pytest

from tests.plugin.conftest import model_repo

pytest_plugins = ["pytester"]

# Tiny models so that an in-process run compiles in about a second.
MODELS_SRC = '''
import torch
from torch import nn


class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
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
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def linear_input():
    return torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
'''

PASSING_TEST = '''
from hypothesis import given
from pytest_trtrefit.strategies import refit_settings, state_dicts
from tinymodels import ConvBn, conv_input


def test_pretrained(trt_refit):
    trt_refit.check(ConvBn, ConvBn().state_dict(), conv_input())


@refit_settings(max_examples=2)
@given(weights=state_dicts(ConvBn()))
def test_random(trt_refit, weights):
    trt_refit.check(ConvBn, weights, conv_input())
'''

CORRUPTED_TEST = '''
from tinymodels import TwoLinear, linear_input


def test_swapped_map_entries(trt_refit):
    x = linear_input()
    engine = trt_refit.engine_for(TwoLinear, x)
    wm = engine.weight_map.sources
    a, b = "fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT"
    assert a in wm and b in wm, list(wm)
    wm[a], wm[b] = wm[b], wm[a]          # the deliberate fault: two same-shape entries swapped
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), x)
'''


@pytest.fixture(scope="session")
def _warm_imports():
    """Compile, refit and verify once in this process before any in-process run: pytester restores
    ``sys.modules`` after each run, and torch cannot import some of its modules twice."""
    import hypothesis.extra  # noqa: F401
    import torch

    import refitcore
    from pytest_trtrefit import checks, declarative, report, service, strategies  # noqa: F401

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 2), torch.nn.Tanh()).eval()
    x = torch.randn(1, 3, 8, 8)
    engine = refitcore.compile(model, x, backend="reference")
    refitcore.refit(engine, model.state_dict(), path="fallback", verify_inputs=[x], audit=True)


@pytest.fixture
def repo(_warm_imports, pytester):
    """A model repository: the tiny models, importable from its root."""
    return model_repo(pytester, "tinymodels", MODELS_SRC)




def test_help_lists_the_option_group(pytester):
    result = pytester.runpytest("--help")
    text = " ".join(result.stdout.str().split())      # help text is wrapped to the terminal width
    for expected in (
        "TensorRT refit checks (pytest-trtrefit):",
        "--trt-refit run the TensorRT refit checks",
        "--trt-refit-backend={auto,reference,tensorrt}",
        "(default: auto,",
        "--trt-refit-paths={cached,fallback,both} refit paths to check: cached, fallback or both (default: both)",
        "--trt-refit-examples=N Hypothesis examples per generated property test (default: 10)",
        "--trt-refit-rtol=RTOL relative tolerance of engine vs eager outputs (default: 0.0001)",
        "--trt-refit-atol=ATOL",
        "--trt-refit-report=PATH",
        "--trt-refit-seed=SEED",
        "trt_refit_backend (string): ini mirror of --trt-refit-backend",
        "trt_refit (bool): ini mirror of --trt-refit",
    ):
        assert expected in text, expected


def test_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.trt_refit: *skipped unless pytest runs with --trt-refit*"])


CONFIG_TEST = '''
def test_config(trt_refit):
    c = trt_refit.config
    print("RESOLVED", c.backend, c.paths, c.examples, c.rtol, c.atol, c.seed, c.report)
    assert c.sources["trt_refit_examples"] == "cli" and c.sources["trt_refit_backend"] == "ini"
'''


def test_ini_mirrors_parse_and_the_command_line_wins(pytester):  # reads options only: no torch
    pytester.makeini("""
        [pytest]
        trt_refit = true
        trt_refit_backend = reference
        trt_refit_paths = cached
        trt_refit_examples = 7
        trt_refit_rtol = 1e-3
        trt_refit_atol = 2e-5
        trt_refit_seed = 42
        trt_refit_report = from-ini.json
    """)
    pytester.makepyfile(test_cfg=CONFIG_TEST)
    # trt_refit = true in the ini enables the checks without the flag
    result = pytester.runpytest_inprocess("-s", "--trt-refit-examples", "3", "--trt-refit-seed=9")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["trt-refit: backend=reference, paths=cached, examples=3, *seed=9*",
                                 "*RESOLVED reference ('cached',) 3 0.001 2e-05 9 from-ini.json"])


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--trt-refit-backend=gpu"], "*'gpu' is not a backend; choose one of auto, reference, tensorrt*",
                 id="backend"),
    pytest.param(["--trt-refit-paths=all"], "*'all' is not a refit path; choose one of cached, fallback, both*",
                 id="paths"),
    pytest.param(["--trt-refit-examples=0"], "*0 examples: give a positive integer*", id="examples-zero"),
    pytest.param(["--trt-refit-examples=many"], "*'many' is not a whole number of examples*", id="examples-text"),
    pytest.param(["--trt-refit-rtol=-1"], "*a tolerance must be finite and >= 0*", id="rtol-negative"),
    pytest.param(["--trt-refit-atol=inf"], "*a tolerance must be finite and >= 0*", id="atol-inf"),
    pytest.param(["--trt-refit-seed=abc"], "*'abc' is not an integer seed*", id="seed"),
])
def test_invalid_option_values_name_the_valid_ones(pytester, args, expected):
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_invalid_ini_value_names_the_key(pytester):
    pytester.makeini("""
        [pytest]
        trt_refit_paths = sideways
    """)
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option trt_refit_paths = 'sideways'*choose one of cached, fallback, both*"])


def test_without_the_flag_refit_tests_skip_with_the_reason(repo):
    repo.makepyfile(test_skip='''
        import pytest

        @pytest.mark.trt_refit
        def test_marked():
            raise AssertionError("must not run")

        def test_uses_fixture(trt_refit):
            raise AssertionError("must not run")

        def test_plain():
            pass
    ''')
    result = repo.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_skip.py*: needs --trt-refit",
                                 "SKIPPED [[]1[]] test_skip.py*: needs --trt-refit"])


def test_plugin_import_stays_light():
    """Importing the plugin pulls in neither torch, TensorRT nor Hypothesis (pytest startup stays fast);
    of refitcore only the lazy package, its version and its standard-library ``options`` module load."""
    import subprocess
    import sys

    code = ("import sys, pytest_trtrefit.plugin; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'hypothesis') if m in sys.modules)); "
            "print(sorted(m for m in sys.modules if m.startswith('refitcore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, ours = out.strip().splitlines()
    assert heavy == "[]"
    assert ours == "['refitcore', 'refitcore._version', 'refitcore.options']"


def test_a_correct_model_passes_and_the_summary_says_so(repo):
    repo.makepyfile(test_ok=PASSING_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=123", "--trt-refit-backend=reference")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "trt-refit: backend=reference, paths=cached,fallback, examples=10, *seed=123*",
        "*= trt-refit =*",
        "backend: reference*",
        "note: the reference backend*not TensorRT's kernels",
        "seed: 123 (reproduce with --trt-refit-seed=123)*",
        "model *paths *examples *failed *worst abs err*",
        "ConvBn *cached,fallback *3 *0 *",
        "6 path check(s), 0 failed; worst abs error *; 1 build(s)*",
    ])


def test_a_corrupted_weight_map_fails_naming_the_culprit(repo):
    repo.makepyfile(test_ok=PASSING_TEST, test_bad=CORRUPTED_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", "--trt-refit-report=out/report.json",
                                      "-p", "no:logging")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "E * trt-refit check FAILED for model 'TwoLinear'",
        "E * backend: reference (*TensorRT's kernels were NOT exercised)",
        "E * path 'cached', sample 0, output 0 (*) shape [[]2, 6[]]: * of 12 elements mismatched",
        "E * max abs err * at [[]*[]]: engine * vs eager *; max rel err *",
        "E * tolerances rtol=0.0001, atol=0.0001 *smallest that would pass: atol>=* or rtol>=*",
        "E * path 'fallback': ok *",
        "E * culprit: engine weight 'fc1/linear.weight CONSTANT' (#1 of 4 in engine order)",
        "E * weight map recipe: copy(fc2.weight) -> float32[[]6, 6[]]",
        "E * cached map vs fallback map: max abs diff *",
        "E * engine after cached refit and cached map agree",
        "FAILED test_bad.py::test_swapped_map_entries: paths cached; culprit weight 'fc1/linear.weight CONSTANT'",
        "JSON report: *report.json",
    ])
    report = json.loads((repo.path / "out" / "report.json").read_text())
    for key in ("format", "version", "ok", "backend", "backend_reason", "kernels_exercised", "seed", "paths",
                "examples", "rtol", "atol", "duration_s", "totals", "worst", "models", "failures", "builds",
                "checks"):
        assert key in report, key
    assert report["format"] == "pytest-trtrefit.report" and report["version"] == 1
    assert report["ok"] is False and report["pytest_exitstatus"] == 1
    assert report["summary"] == "1 refit check(s) failed"
    assert report["backend"] == "reference" and report["kernels_exercised"] is False
    assert report["seed"] == 5 and report["requested_paths"] == ["cached", "fallback"]
    assert list(report["paths"]) == ["cached", "fallback"]
    assert report["totals"]["builds"] == 2 and report["totals"]["failed"] == 1
    (failure,) = report["failures"]
    assert failure["test"] == "test_bad.py::test_swapped_map_entries"
    assert failure["paths"] == ["cached"] and failure["culprit"] == "fc1/linear.weight CONSTANT"
    assert "culprit: engine weight 'fc1/linear.weight CONSTANT'" in failure["report"]
    models = {m["model"]: m for m in report["models"]}
    assert models["ConvBn"]["failures"] == 0 and models["ConvBn"]["examples"] == 3
    assert models["TwoLinear"]["failures"] == 1 and models["TwoLinear"]["worst_max_abs"] > 1e-3
    for m in models.values():
        assert set(m) >= {"paths", "examples", "worst_max_abs", "min_rtol_to_pass", "seconds", "compile_s"}
    bad = [c for c in report["checks"] if not c["ok"]]
    assert [(c["model"], c["path"]) for c in bad] == [("TwoLinear", "cached")]
    assert bad[0]["min_rtol"] > 1e-4


def test_a_check_expected_to_fail_does_not_fail_the_gate(repo):
    repo.makepyfile(test_expected='''
        import pytest
        from tinymodels import TwoLinear, linear_input

        def test_refused(trt_refit):
            state = TwoLinear().state_dict()
            state["fc1.weight"] = state["fc1.weight"].t().contiguous() * 0 + float("nan")
            with pytest.raises(AssertionError, match="non-finite"):
                trt_refit.check(TwoLinear, state, linear_input())
    ''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-report=r.json")
    result.assert_outcomes(passed=1)
    report = json.loads((repo.path / "r.json").read_text())
    assert report["ok"] is True and report["failures"] == [] and report["summary"] == "all refit checks passed"
    assert [f["test"] for f in report["expected_failures"]] == ["test_expected.py::test_refused"]


DECLARATIVE_CONFTEST = '''
from tinymodels import ConvBn, TwoLinear, conv_input, linear_input


def pytest_trt_refit_models():
    return {
        "conv_bn": (ConvBn, conv_input(), {"examples": 2, "checks": ["weights", "sequences"]}),
        "two_linear": {"factory": TwoLinear, "inputs": linear_input(), "checks": ["perturbations"],
                       "examples": 2, "paths": "cached"},
    }
'''


def test_a_run_without_checks_does_not_pass_the_gate(repo):
    repo.makepyfile(test_nothing="def test_plain():\n    pass\n")
    repo.runpytest_inprocess("--trt-refit", "--trt-refit-report=r.json").assert_outcomes(passed=1)
    report = json.loads((repo.path / "r.json").read_text())
    assert report["ok"] is False and report["summary"].startswith("no refit checks ran")


def test_declared_models_get_generated_property_tests(repo):
    repo.makeconftest(DECLARATIVE_CONFTEST)
    collected = repo.runpytest_inprocess("--trt-refit", "--collect-only", "-q")
    collected.stdout.fnmatch_lines([
        "conftest.py::trt-refit::weights[[]conv_bn[]]",
        "conftest.py::trt-refit::sequences[[]conv_bn[]]",
        "conftest.py::trt-refit::perturbations[[]two_linear[]]",
    ])
    skipped = repo.runpytest_inprocess("-rs")
    skipped.assert_outcomes(skipped=3)
    skipped.stdout.fnmatch_lines(["SKIPPED [[]3[]] conftest.py: needs --trt-refit"])
    result = repo.runpytest_inprocess("--trt-refit", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["conv_bn *cached,fallback *", "two_linear *cached *"])


def test_a_failing_declared_check_shows_the_report_and_how_to_reproduce(repo):
    # Zero tolerance: BatchNorm folding rounds differently from eager, so examples fail (the
    # shrunk example is the simplest draw, seed 0 with 'fan_in'); the mappings agree, so no weight
    # is blamed and the report says where the difference must lie.
    repo.makeconftest('''
        from tinymodels import ConvBn, conv_input

        def pytest_trt_refit_models():
            return {"conv_bn": (ConvBn, conv_input(), {"examples": 2, "checks": ["weights"], "rtol": 0.0,
                                                        "atol": 0.0, "paths": "cached", "input_families": ()})}
    ''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=11", "-p", "no:logging")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*_ trt-refit weights[[]conv_bn[]] _*",
        "trt-refit check FAILED for model 'conv_bn'",
        "*tolerances rtol=0, atol=0 *smallest that would pass: atol>=* or rtol>=*",
        "*culprit: none among the weights*not in the weight mapping",
        "Failing test case: weights_conv_bn(",
        "    weights=state_dicts(seed=0, scale='fan_in', specials=[[][]]),",
        "reproduce with: pytest --trt-refit --trt-refit-seed=11 'conftest.py::trt-refit::weights[[]conv_bn[]]'",
        "*= trt-refit =*",
        "FAILED conftest.py::trt-refit::weights[[]conv_bn[]]: paths cached (* failing checks, the last shown)",
    ])
    assert "Explanation:" not in result.stdout.str()


def test_declared_models_with_a_bad_spec_are_a_usage_error(repo):
    repo.makeconftest('''
        from tinymodels import ConvBn, conv_input

        def pytest_trt_refit_models():
            return {"conv_bn": (ConvBn, conv_input(), {"exampels": 2})}
    ''')
    result = repo.runpytest_inprocess("--trt-refit")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting conftest.py*",
                                 "pytest_trt_refit_models(): *conftest.py: model 'conv_bn': unknown option(s) "
                                 "[[]'exampels'[]]; valid: [[]'atol', 'checks', 'compiler', 'dynamic_shapes', "
                                 "'examples', *"])


@pytest.mark.parametrize("options, message", [
    pytest.param('"checks": []', "'checks' is empty, so no test would run; list at least one of "
                                 "('weights', 'perturbations', 'sequences'), or leave the option out*", id="no-checks"),
    pytest.param('"paths": []', "'paths' is empty, so no refit path would be checked; give 'cached', 'fallback' or "
                                "'both'*", id="no-paths"),
    pytest.param('"rtol": float("nan")', "rtol=nan: a tolerance must be finite and >= 0, such as 1e-4", id="nan-rtol"),
    pytest.param('"atol": -1e-3', "atol=-0.001: a tolerance must be finite and >= 0, such as 1e-4", id="negative-atol"),
    pytest.param('"rtol": float("inf")', "rtol=inf: a tolerance must be finite and >= 0, such as 1e-4", id="inf-rtol"),
])
def test_a_declaration_that_could_not_fail_is_a_usage_error(repo, options, message):
    """An empty checks or paths list would drop the model silently; a NaN tolerance would pass every check."""
    repo.makeconftest(f'''
        from tinymodels import ConvBn, conv_input

        def pytest_trt_refit_models():
            return {{"conv_bn": (ConvBn, conv_input(), {{"examples": 2, {options}}})}}
    ''')
    result = repo.runpytest_inprocess("--trt-refit")
    result.assert_outcomes(errors=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*ERROR collecting conftest.py*",
                                 f"pytest_trt_refit_models(): *conftest.py: model 'conv_bn': {message}"])


DRAW_RECORDER = '''
import os
from hypothesis import given
from pytest_trtrefit.strategies import refit_settings, state_dicts
from tinymodels import ConvBn


@refit_settings(max_examples=4, database=None)
@given(weights=state_dicts(ConvBn()))
def test_draws(trt_refit, weights):
    with open(os.environ["DRAWS_FILE"], "a") as fh:
        fh.write(repr(weights) + "\\n")
'''


def test_the_printed_seed_reproduces_the_draws(repo, monkeypatch):
    repo.makepyfile(test_draws=DRAW_RECORDER)
    runs = []
    seed = None
    for i in range(3):
        draws = repo.path / f"draws{i}.txt"
        monkeypatch.setenv("DRAWS_FILE", str(draws))
        args = ["--trt-refit", "-p", "no:cacheprovider"] + ([f"--trt-refit-seed={seed}"] if seed is not None else [])
        result = repo.runpytest_inprocess(*args)
        result.assert_outcomes(passed=1)
        printed = re.search(r"seed=(\d+) \(reproduce with --trt-refit-seed=\1\)", result.stdout.str())
        assert printed, result.stdout.str()
        seed = int(printed.group(1)) if seed is None else seed
        assert int(printed.group(1)) == seed
        runs.append(draws.read_text().splitlines())
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 4
    assert all(line.startswith("state_dicts(seed=") for line in runs[0])


def test_works_under_xdist(repo):
    pytest.importorskip("xdist")
    repo.makeconftest('''
        from tinymodels import TwoLinear, linear_input

        def pytest_trt_refit_models():
            return {"two_linear": (TwoLinear, linear_input(), {"examples": 2, "checks": ["weights"]})}
    ''')
    repo.makepyfile(test_ok=PASSING_TEST)
    result = repo.runpytest_inprocess("-n", "2", "--trt-refit", "--trt-refit-seed=77",
                                       "--trt-refit-report=xdist.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*= trt-refit =*", "seed: 77 *", "*path check(s), 0 failed*"])
    report = json.loads((repo.path / "xdist.json").read_text())
    assert report["ok"] is True and report["seed"] == 77
    workers = {b["worker"] for b in report["builds"]}
    assert workers <= {"gw0", "gw1"} and workers
    # one build per worker at most for each architecture and input spec
    per_worker = [(b["worker"], b["architecture"], str(b["inputs"])) for b in report["builds"]]
    assert len(per_worker) == len(set(per_worker))
    assert {r["worker"] for r in report["checks"]} <= {"gw0", "gw1"} and len(report["checks"]) > 0


DATA_DEPENDENT_TEST = '''
import torch
from torch import nn


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.inner(x)
        if y.sum() > 0:          # data-dependent control flow: torch.export cannot export the whole model
            y = y * 2
        return self.head(y)


def test_data_dependent(trt_refit):
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    trt_refit.check(DataDependent, DataDependent().state_dict(), x)
    assert False, "show the captured output"
'''


def test_an_export_failure_is_one_line_that_says_where_the_rest_is(repo):
    """torch.export prints a failing program's FX graph: the user sees one line and where the rest is."""
    repo.makepyfile(test_dd=DATA_DEPENDENT_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "-p", "no:cacheprovider", "-rA")
    result.stdout.fnmatch_lines([
        "*torch.export cannot export the model (GuardOnDataDependentSymNode: *); compiling the submodules that "
        "export (the full text is logged at DEBUG level by the 'refitcore' logger, e.g. pytest --log-level=DEBUG)",
        "DataDependent *cached,fallback * 1 * 2 * 0 *",
    ])
    result.stdout.no_fnmatch_line("*def forward(*")
    result.stdout.no_fnmatch_line("*torch.ops.aten.*")
    result.stdout.no_fnmatch_line("*Unable to find user code*")
    full = repo.runpytest_inprocess("--trt-refit", "-p", "no:cacheprovider", "--log-level=DEBUG")
    full.stdout.fnmatch_lines(["*torch.export printed:*", "*def forward(*"])


SWAPPED_PROPERTY_TEST = '''
from hypothesis import given
from pytest_trtrefit.strategies import refit_settings, state_dicts
from tinymodels import TwoLinear, linear_input


@refit_settings(max_examples=3)
@given(weights=state_dicts(TwoLinear(), specials=()))
def test_swapped_map_entries(trt_refit, weights):
    x = linear_input()
    wm = trt_refit.engine_for(TwoLinear, x).weight_map.sources
    a, b = "fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT"
    wm[a], wm[b] = wm[b], wm[a]          # the fault: two same-shape entries swapped
    try:
        trt_refit.check(TwoLinear, weights, x, paths=["cached"])
    finally:
        wm[a], wm[b] = wm[b], wm[a]
'''


def test_a_swap_of_same_shaped_weights_is_caught_with_drawn_weight_sets(repo):
    """Weight sets cut from one pool still give same-shaped weights different values."""
    repo.makepyfile(test_swap=SWAPPED_PROPERTY_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "-p", "no:cacheprovider", "--trt-refit-seed=3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["FAILED test_swap.py::test_swapped_map_entries: paths cached; culprit weight *"])


EXPECTED_FAILURE_TEST = '''
import pytest
from tinymodels import TwoLinear, linear_input


def test_a_swap_is_refused(trt_refit):
    x = linear_input()
    wm = trt_refit.engine_for(TwoLinear, x).weight_map.sources
    a, b = "fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT"
    wm[a], wm[b] = wm[b], wm[a]
    try:
        with pytest.raises(AssertionError):
            trt_refit.check(TwoLinear, TwoLinear().state_dict(), x, paths=["cached"])
    finally:
        wm[a], wm[b] = wm[b], wm[a]
'''


def test_the_summary_says_what_happened_to_expected_failures_and_cached_engines(repo, tmp_path):
    repo.makepyfile(test_expected=EXPECTED_FAILURE_TEST)
    args = ("--trt-refit", "-p", "no:cacheprovider", f"--trt-refit-cache-dir={tmp_path / 'engines'}")
    first = repo.runpytest_inprocess(*args)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["1 path check(s), 0 failed (and 1 check(s) that failed as their tests expected, "
                                "e.g. with pytest.raises); worst abs error * 1 build(s); *"])
    first.stdout.no_fnmatch_line("*more failed inside tests that expected it*")
    second = repo.runpytest_inprocess(*args)
    second.stdout.fnmatch_lines(["TwoLinear * 1/0 * 0 * *s",
                                 "*; 0 build(s), 1 engine(s) loaded from the engine cache; *"])


AUDIT_ONLY_TEST = '''
import numpy as np
import refitcore.refitting.pipeline as pipeline
from tinymodels import TwoLinear, linear_input


def test_one_ulp_in_the_cached_map(trt_refit, monkeypatch):
    real = pipeline.cached_mapping

    def one_ulp_off(weight_map, weights, **kw):   # one value of one weight moved by one float32 ulp
        mapping = dict(real(weight_map, weights, **kw))
        name = "fc1/linear.weight CONSTANT"
        value = mapping[name].copy()
        value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf))
        mapping[name] = value
        return mapping

    monkeypatch.setattr(pipeline, "cached_mapping", one_ulp_off)
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input())
'''


def test_a_failure_of_the_exact_audit_alone_is_said_as_such(repo):
    """Both paths match eager within the tolerances; only the exact cached-vs-fallback audit fails."""
    repo.makepyfile(test_audit=AUDIT_ONLY_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "-p", "no:cacheprovider", "-p", "no:logging",
                                      "--trt-refit-report=r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "FAILED test_audit.py::test_one_ulp_in_the_cached_map: the exact audit (the cached and the fallback mapping "
        "differ on a weight; every path matched eager); culprit weight 'fc1/linear.weight CONSTANT'"])
    result.stdout.no_fnmatch_line("FAILED test_audit.py::*: paths *")
    report = json.loads((repo.path / "r.json").read_text())
    assert report["problems"][0].startswith("test_audit.py::test_one_ulp_in_the_cached_map: the exact audit (")
    assert report["failures"][0]["audit_only"] is True


MARGIN_TEST = '''
import pytest
import refitcore.refitting.pipeline as pipeline
from tinymodels import TwoLinear, linear_input


def plant(monkeypatch, delta):
    """The cached mapping with the output layer's first bias moved by ``delta``: every row of output
    column 0 is off by ``delta``, whatever the weights."""
    real = pipeline.cached_mapping

    def moved(weight_map, weights, **kw):
        mapping = dict(real(weight_map, weights, **kw))
        value = mapping["fc2/linear.bias CONSTANT"].copy()
        value[0] += delta
        mapping["fc2/linear.bias CONSTANT"] = value
        return mapping

    monkeypatch.setattr(pipeline, "cached_mapping", moved)


# |eager| <= 3 here: delta 1e-5 is within atol=1e-4 * max(1, max|eager|) although above rtol=1e-6 relative;
# delta 1e-3 is outside it.
def test_within(trt_refit, monkeypatch):
    plant(monkeypatch, 1e-5)
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input(), paths="cached", rtol=1e-6,
                    name="within_tolerance")


def test_outside(trt_refit, monkeypatch):
    plant(monkeypatch, 1e-3)
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input(), paths="cached", rtol=1e-6,
                    name="outside_tolerance")
'''


def test_the_summary_shows_the_margin_in_the_terms_of_the_rule(repo):
    """A relative error above rtol that passes (atol covers it) shows a margin <= 1; a failure > 1."""
    repo.makepyfile(test_margin=MARGIN_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "-p", "no:cacheprovider", "-p", "no:logging",
                                      "--trt-refit-report=r.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "model * worst abs err worst rel err worst err / allowed atol to pass rtol to pass *",
        "*; worst err / allowed: the largest |engine - eager| / (atol*max(1, max|eager|) + rtol*|eager|) over "
        "every element, the rule each element must meet (<= 1 passes)"])
    header = next(line for line in result.outlines if line.startswith("model "))
    rows = {line.split()[0]: line.split() for line in result.outlines
            if line.startswith(("within_tolerance ", "outside_tolerance "))}
    assert "worst err / allowed" in header
    # model, paths, examples, checks, failed checks, worst abs err, worst rel err, worst err / allowed, ...
    within, outside = rows["within_tolerance"], rows["outside_tolerance"]
    assert within[4] == "0" and float(within[6]) > 1e-6 and 0 < float(within[7]) <= 1
    assert outside[4] == "1" and float(outside[7]) > 1
    report = json.loads((repo.path / "r.json").read_text())
    models = {m["model"]: m for m in report["models"]}
    assert 0 < models["within_tolerance"]["worst_margin"] <= 1 < models["outside_tolerance"]["worst_margin"]
    checks = {c["model"]: c for c in report["checks"]}
    assert checks["within_tolerance"]["ok"] and checks["within_tolerance"]["margin"] <= 1
    assert not checks["outside_tolerance"]["ok"] and checks["outside_tolerance"]["margin"] > 1


BERT_CONSTANTS_TEST = '''
import pytest
import refitcore
import torch
from transformers import BertConfig, BertForSequenceClassification

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, num_labels=3)


def bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**CONFIG)).eval()


SAMPLE = refitcore.Inputs(torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0)),
                          attention_mask=torch.ones(1, 8, dtype=torch.long))


def test_a_finetuned_state_dict(trt_refit):
    finetuned = bert(1)     # position_ids and token_type_ids: the architecture's own, equal in every BERT
    result = refitcore.refit(trt_refit.engine_for(bert, SAMPLE), finetuned.state_dict(), verify_inputs=[SAMPLE],
                             reference_model=finetuned, in_place=False)
    assert result and not result.messages, str(result)


def test_a_model_with_other_constants(trt_refit):
    other = bert(1)
    other.bert.embeddings.position_ids.add_(1)     # a model whose non-persistent buffer differs
    with pytest.warns(RuntimeWarning) as caught:
        refitcore.refit(trt_refit.engine_for(bert, SAMPLE), other.state_dict(), verify_inputs=[SAMPLE],
                        reference_model=other, in_place=False)
    (message,) = [str(w.message) for w in caught]
    assert message == ("1 tensor constant(s) that a state_dict does not hold (bert.embeddings.position_ids) keep "
                       "their compile-time values, which the model compared with holds other values of; pass the "
                       "model (nn.Module) instead of its state_dict to refit them from it")
'''


def test_constants_that_every_model_of_the_architecture_holds_are_no_news(repo):
    """A transformers model refitted from a state_dict: its non-persistent buffers (position_ids) keep
    their compile-time values, which the model the weights are for holds too: no warning. A model
    holding other values is warned about, with what to do."""
    pytest.importorskip("transformers")
    repo.makepyfile(test_bert_constants=BERT_CONSTANTS_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "-p", "no:cacheprovider", "-W", "error::RuntimeWarning")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*RuntimeWarning*")
