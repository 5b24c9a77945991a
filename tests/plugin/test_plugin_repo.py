"""The plugin in a model repository, black-box through ``pytester``: collection whatever the paths,
markers, --collect-only, an unusable backend, the summary table, quiet failures with a reproduce
line, JUnit properties, baselines, the HTML report and the shared report schema."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from tests.plugin.test_plugin import CORRUPTED_TEST, PASSING_TEST, _warm_imports, repo  # noqa: F401

pytest_plugins = ["pytester"]

ROOT_CONFTEST = '''
from tinymodels import TwoLinear, linear_input

def pytest_trt_refit_models():
    return {"two_linear": (TwoLinear, linear_input(), {"examples": 2, "checks": ["weights"],
                                                       "input_families": ()})}
'''

FIXTURE_TEST = '''
from tinymodels import ConvBn, conv_input

def test_pretrained(trt_refit):
    trt_refit.check(ConvBn, ConvBn().state_dict(), conv_input())

def test_plain():
    assert True
'''


def _models_repo(repo):
    repo.makeconftest(ROOT_CONFTEST)
    repo.makeini("[pytest]\ntestpaths = tests\n")
    tests = repo.mkdir("tests")      # a plain directory: the outer suite owns the package name "tests"
    (tests / "test_fixture.py").write_text(FIXTURE_TEST)
    return repo


def test_help_lists_the_new_options_and_their_ini_mirrors(pytester):
    text = " ".join(pytester.runpytest("--help").stdout.str().split())
    for expected in ("--trt-refit-baseline={save,compare}", "--trt-refit-baseline-dir=DIR",
                     "(default: .trtrefit-baselines)", "--trt-refit-baseline-factor=FACTOR", "(default: 2)",
                     "--trt-refit-html=PATH", "pytest-trtrefit[plot]",
                     "trt_refit_baseline (string): ini mirror of --trt-refit-baseline",
                     "trt_refit_baseline_factor (string): ini mirror", "trt_refit_html (string): ini mirror"):
        assert expected in text, expected


def test_baseline_options_from_the_ini_file(repo):
    repo.makeconftest(PLANTED_CONFTEST)
    repo.makeini("[pytest]\ntrt_refit = true\ntrt_refit_seed = 2\ntrt_refit_baseline = save\n"
                 "trt_refit_baseline_dir = base\n")
    result = repo.runpytest_inprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["baseline saved: 1 model(s) in *base"])
    assert (repo.path / "base" / "two_linear.json").exists()


# -- 1. nothing declared goes silently unchecked ---------------------------------------------
@pytest.mark.parametrize("args", [[], ["tests"], ["tests/test_fixture.py"]], ids=["testpaths", "dir-arg", "file-arg"])
def test_root_conftest_models_are_checked_whatever_the_paths(repo, args):
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=3", "-v", *args)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["conftest.py::trt-refit::weights[[]two_linear[]] PASSED*",
                                 "*= trt-refit =*",
                                 "two_linear *cached,fallback *2 *4 *0 *",
                                 "declared models collected from conftest.py (outside the collected paths)"])


def test_deselecting_a_declared_model_is_said_in_the_summary(repo):
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "-k", "not two_linear")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["1 generated model check(s) deselected by the user (-k/-m/--deselect): "
                                 "conftest.py::trt-refit::weights[[]two_linear[]]"])


def test_picking_tests_by_node_id_says_the_declared_models_were_not_checked(repo):
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "tests/test_fixture.py::test_pretrained")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["declared models in conftest.py NOT checked: tests were picked by node id"])


def test_fixture_tests_carry_the_marker(repo):
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "-m", "trt_refit", "-v")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*test_fixture.py::test_pretrained PASSED*"])
    assert "test_plain" not in result.stdout.str()


def test_collect_only_writes_no_report_and_no_summary(repo):
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "--collect-only", "--trt-refit-report=r.json")
    result.stdout.fnmatch_lines(["*<*test_pretrained>*", "*3 tests collected*"])
    assert "= trt-refit =" not in result.stdout.str() and not (repo.path / "r.json").exists()


def test_an_unusable_tensorrt_backend_is_one_usage_error(repo):
    from refitcore.backends import tensorrt

    if tensorrt.usable()[0]:
        pytest.skip("TensorRT builds and runs engines here")
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-backend", "tensorrt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --trt-refit-backend=tensorrt: TensorRT cannot build and run engines on this "
                                 "machine (*); use --trt-refit-backend=auto or reference here"])
    assert result.stderr.str().count("ERROR:") == 1 and "Traceback" not in result.stdout.str()


# -- 2. the summary ------------------------------------------------------------------------------
def test_summary_has_one_unit_per_column_stable_labels_and_the_tensorrt_share(repo):
    _models_repo(repo)
    # Engines that report a TensorRT share (as refitcore.engine.coverage's engine.summary() does): TwoLinear's.
    repo.makeconftest(ROOT_CONFTEST + '''
from refitcore.engine.refittable import RefittableEngine

_had = "summary" in vars(RefittableEngine)
_old = vars(RefittableEngine).get("summary")

def _summary(self):
    return {"tensorrt_share": 1.0} if "fc1/linear.weight CONSTANT" in self.weight_names else None

def pytest_configure(config):
    RefittableEngine.summary = _summary

def pytest_unconfigure(config):
    if _had:
        RefittableEngine.summary = _old
    else:
        del RefittableEngine.summary
''')
    (repo.path / "tests" / "test_share.py").write_text('''
from tinymodels import TwoLinear, linear_input

def test_unnamed(trt_refit):      # the same architecture as the declared two_linear, checked without a name
    trt_refit.check(TwoLinear, TwoLinear().state_dict(), linear_input())
''')
    # The declared model checked last, then first; the second run loads both engines from the engine
    # cache (pytest's cache directory), which the builds column and the totals say.
    for order, built, totals in (([], "0/1 *1", "2 build(s)"),
                                 (["conftest.py", "tests"], "1/0 *0",
                                  "0 build(s), 2 engine(s) loaded from the engine cache")):
        result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=4", *order)
        result.assert_outcomes(passed=4)
        result.stdout.fnmatch_lines([
            "model *paths *examples *checks *failed checks *worst abs err *worst rel err *atol to pass "
            "*rtol to pass *TRT share *builds *time",
            "ConvBn *cached,fallback *1 *2 *0 * - *",
            f"TwoLinear *cached,fallback *1 *2 *0 * 100% *{built} *",      # one engine serves both labels:
            f"two_linear *cached,fallback *2 *4 *0 * 100% *{built} *",     # its build counts for each
            "examples: weight sets drawn; checks: one per example and path; atol/rtol to pass: the smallest *",
            f"8 path check(s), 0 failed; *; {totals}; *",
        ])


def test_the_tensorrt_share_is_read_defensively():
    import types

    from pytest_trtrefit.checks import trt_share

    def engine(summary):
        return types.SimpleNamespace(summary=summary)

    coverage = types.SimpleNamespace(op_share=0.75, fully_converted=False)
    assert trt_share(engine(lambda: coverage)) == 0.75
    assert trt_share(engine(lambda: types.SimpleNamespace(op_share=0.5, fully_converted=True))) == 1.0
    assert trt_share(engine(lambda: {"tensorrt_share": 0.25})) == 0.25
    assert trt_share(types.SimpleNamespace()) is None                       # no summary()
    assert trt_share(engine(lambda: 1 / 0)) is None                         # a summary that raises
    assert trt_share(engine(lambda: {"op_share": True})) is None            # not a number


def test_cache_hits_and_misses_get_a_column_when_recorded():
    from pytest_trtrefit import report
    from pytest_trtrefit.records import BuildRecord, CheckRecord

    records = [CheckRecord.from_dict({"model": "m", "path": "cached", "ok": True, "max_abs": 1e-7})]
    rows = report.summarize(records, [BuildRecord.from_dict({"model": "m", "compile_s": 0.1, "cache": "hit"}),
                                      BuildRecord.from_dict({"model": "m", "compile_s": 0.2, "cache": "miss"})])
    lines = report.table(rows, [BuildRecord.from_dict({"model": "m", "cache": "hit"})])
    assert "cache hit/miss" in lines[0] and " 1/1 " in lines[1]
    assert "cache" not in report.table(report.summarize(records, []), [])[0]


# -- 6. quiet failures, JUnit properties, reproduce lines -----------------------------------------
def test_failures_are_quiet_and_end_with_a_reproduce_line(repo):
    repo.makepyfile(test_bad=CORRUPTED_TEST, test_hyp='''
from hypothesis import given
from pytest_trtrefit.strategies import refit_settings, state_dicts
from tinymodels import TwoLinear, linear_input

class Twin(TwoLinear):      # another class: an engine of its own in the session's compile cache
    pass

_swapped = set()

@refit_settings(max_examples=2, database=None)
@given(weights=state_dicts(Twin()))
def test_drawn(trt_refit, weights):
    engine = trt_refit.engine_for(Twin, linear_input())
    if id(engine) not in _swapped:     # the deliberate fault, once: two same-shape map entries swapped
        wm = engine.weight_map.sources
        a, b = "fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT"
        wm[a], wm[b] = wm[b], wm[a]
        _swapped.add(id(engine))
    trt_refit.check(Twin, weights, linear_input())
''')
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", "--trt-refit-backend=reference",
                                      "--junitxml=junit.xml", "--log-level=DEBUG")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*- trt-refit -*",
        "reproduce with: pytest --trt-refit --trt-refit-seed=5 --trt-refit-backend=reference "
        "test_bad.py::test_swapped_map_entries",
    ])
    assert "reproduce with: pytest --trt-refit --trt-refit-seed=5 --trt-refit-backend=reference " \
           "test_hyp.py::test_drawn" in out
    assert "torch.__trace" not in out and "Explanation:" not in out
    cases = {c.get("name"): c for c in ET.parse(repo.path / "junit.xml").getroot().iter("testcase")}
    props = {p.get("name"): p.get("value") for p in cases["test_swapped_map_entries"].iter("property")}
    assert props["trt_refit_checks"] == "2" and props["trt_refit_failed_checks"] == "1"
    assert float(props["trt_refit_worst_abs_err"]) > 1e-3 and props["trt_refit_backend"] == "reference"
    assert props["trt_refit_seed"] == "5"


# -- 3. baselines ---------------------------------------------------------------------------------
PLANTED_CONFTEST = '''
import os
import refitcore.refitting.pipeline as pipeline
from tinymodels import TwoLinear, linear_input

_cached, _apply = pipeline.cached_mapping, pipeline.apply_mapping
WEIGHT = "fc1/linear.weight CONSTANT"


def _cached_planted(weight_map, state, *args, **kwargs):
    # a corrupted map entry: off by PLANT_MAP x 5e-7 of the weight's largest magnitude
    m = dict(_cached(weight_map, state, *args, **kwargs))
    f = float(os.environ.get("PLANT_MAP", "0"))
    if f:
        m[WEIGHT] = m[WEIGHT] + 5e-7 * f * abs(m[WEIGHT]).max()
    return m


def _apply_planted(engine, mapping, **kw):
    # both paths hand the engine a weight off by PLANT_OUT x 1e-5: output error grows, mappings agree
    f = float(os.environ.get("PLANT_OUT", "0"))
    if f:
        mapping = dict(mapping)
        mapping[WEIGHT] = mapping[WEIGHT] + 1e-5 * f
    return _apply(engine, mapping, **kw)


def pytest_configure(config):
    pipeline.cached_mapping, pipeline.apply_mapping = _cached_planted, _apply_planted


def pytest_unconfigure(config):
    pipeline.cached_mapping, pipeline.apply_mapping = _cached, _apply


def pytest_trt_refit_models():
    return {"two_linear": (TwoLinear, linear_input(), {"examples": 3, "checks": ["weights"], "atol": 1e-2,
                                                       "input_families": ()})}
'''


def _baseline_run(repo, monkeypatch, mode, plant_map, plant_out, *extra):
    monkeypatch.setenv("PLANT_MAP", str(plant_map))
    monkeypatch.setenv("PLANT_OUT", str(plant_out))
    return repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=21", f"--trt-refit-baseline={mode}",
                                    "--trt-refit-report=r.json", *extra)


def test_baseline_save_then_compare_catches_a_tenfold_growth(repo, monkeypatch):
    repo.makeconftest(PLANTED_CONFTEST)
    saved = _baseline_run(repo, monkeypatch, "save", 0, 1)
    saved.assert_outcomes(passed=1)
    saved.stdout.fnmatch_lines(["baseline saved: 1 model(s) in *.trtrefit-baselines"])
    doc = json.loads((repo.path / ".trtrefit-baselines" / "two_linear.json").read_text())
    assert doc["schema"] == "trtrefit.baseline/1" and doc["seed"] == 21 and doc["output"]["max_abs"] > 1e-6
    assert [w for w, _ in doc["weights"]][0] == "fc1/linear.weight CONSTANT"
    assert all(d == 0 for _, d in doc["weights"])      # cached and fallback agree exactly

    same = _baseline_run(repo, monkeypatch, "compare", 0, 1)
    same.assert_outcomes(passed=1)
    assert same.ret == 0, same.stdout.str()
    same.stdout.fnmatch_lines(["baseline compare: OK: 1 model(s) against *, factor 2",
                               "two_linear *output max abs * 1x *ok"])

    grown = _baseline_run(repo, monkeypatch, "compare", 0, 10)       # the engine's error grows 10x
    grown.assert_outcomes(passed=1)                                   # every check still passes...
    assert grown.ret == 1                                             # ...but the session fails
    grown.stdout.fnmatch_lines([
        "baseline compare: REGRESSION: 1 model(s) against *; * value(s) grew beyond it: two_linear (output max abs)*",
        "model *value *old *new *ratio *verdict",
        "two_linear *output max abs *x *REGRESSION",
    ])
    report = json.loads((repo.path / "r.json").read_text())
    assert report["baseline"]["ok"] is False and report["pytest_exitstatus"] == 1
    grew = {c["what"]: c for c in report["baseline"]["changes"] if c["regression"]}
    assert 8 < grew["output max abs"]["ratio"] < 12 and not any(w.startswith("weight") for w in grew)

    drift = _baseline_run(repo, monkeypatch, "compare", 1, 1)        # a corrupted map entry
    assert drift.ret == 1
    drift.stdout.fnmatch_lines(["*REGRESSION*two_linear (weight fc1/linear.weight CONSTANT)*",
                                "two_linear *weight fc1/linear.weight CONSTANT *0 *inf *REGRESSION"])

    loose = _baseline_run(repo, monkeypatch, "compare", 0, 10, "--trt-refit-baseline-factor=20")
    assert loose.ret == 0, loose.stdout.str()


def test_baseline_compare_without_baselines_fails_and_bad_files_are_named(repo, monkeypatch):
    repo.makeconftest(PLANTED_CONFTEST)
    empty = _baseline_run(repo, monkeypatch, "compare", 0, 0, "--trt-refit-baseline-dir=nowhere")
    assert empty.ret == 1
    empty.stdout.fnmatch_lines(["baseline compare FAILED: no model of this run has a baseline in *nowhere *"])
    (repo.path / "bad").mkdir()
    (repo.path / "bad" / "two_linear.json").write_text('{"schema": "other"}')
    bad = _baseline_run(repo, monkeypatch, "compare", 0, 0, "--trt-refit-baseline-dir=bad")
    assert bad.ret == 1
    bad.stdout.fnmatch_lines(["baseline compare FAILED: baseline *two_linear.json: not a trtrefit.baseline/1 file*"])


def test_a_failing_run_saves_no_baseline(repo):
    repo.makepyfile(test_bad=CORRUPTED_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-baseline=save")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["baseline NOT saved: 1 refit check(s) failed; save a baseline from a passing run"])
    assert not (repo.path / ".trtrefit-baselines").exists()


def test_baseline_options_are_validated(repo):
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-baseline=keep")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'keep': choose save * or compare *"])
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-baseline-factor=0.5")
    result.stderr.fnmatch_lines(["*must be a finite number > 1*"])


# -- 4. the HTML report ------------------------------------------------------------------------------
def test_html_report_shows_every_engine_weight(repo):
    pytest.importorskip("matplotlib")
    _models_repo(repo)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=8", "--trt-refit-html=out/report.html")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["HTML report: *out*report.html"])
    page = (repo.path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in page
    for weight in ("fc1/linear.weight CONSTANT", "fc1/linear.bias CONSTANT", "fc2/linear.weight CONSTANT",
                   "fc2/linear.bias CONSTANT"):
        assert weight in page, weight
    assert "two_linear: cached vs fallback per engine weight" in page and "ConvBn" in page


def test_html_report_marks_the_weights_where_the_paths_disagree(repo):
    pytest.importorskip("matplotlib")
    repo.makepyfile(test_bad=CORRUPTED_TEST)
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=8", "--trt-refit-html=r.html")
    result.assert_outcomes(failed=1)
    page = (repo.path / "r.html").read_text()
    rows = {line.split("</td><td>")[1]: line for line in page.splitlines() if line.startswith("<tr><td>")
            and "CONSTANT" in line}
    for swapped in ("fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT"):
        assert "class='bad'>value<" in rows[swapped], rows[swapped]
    for intact in ("fc1/linear.bias CONSTANT", "fc2/linear.bias CONSTANT"):
        assert "<td>0</td><td>ok</td>" in rows[intact], rows[intact]


def test_html_report_without_matplotlib_is_a_clean_usage_error(repo, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    result = repo.runpytest_inprocess("--trt-refit", "--trt-refit-html=r.html")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --trt-refit-html needs matplotlib: install pytest-trtrefit[[]plot[]]*"])


# -- 5. one report schema ------------------------------------------------------------------------------
def test_the_plugin_report_follows_the_shared_schema(repo):
    from refitcore.refitting.report_schema import SCHEMA, validate

    repo.makepyfile(test_ok=PASSING_TEST, test_bad=CORRUPTED_TEST)
    repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", "--trt-refit-report=r.json")
    report = json.loads((repo.path / "r.json").read_text())
    validate(report)
    assert report["schema"] == SCHEMA and report["producer"] == "pytest-trtrefit"
    assert report["status"] == "fail" and report["ok"] is False
    assert report["paths"]["cached"]["failed"] == 1 and report["paths"]["fallback"]["failed"] == 0
    assert report["paths"]["cached"]["culprit"] == "fc1/linear.weight CONSTANT"
    assert report["problems"] == ["test_bad.py::test_swapped_map_entries: paths cached; culprit weight "
                                  "'fc1/linear.weight CONSTANT'"]
    with pytest.raises(ValueError, match="checks.0. lacks"):
        validate(dict(report, checks=[{"model": "m"}]))


def test_the_ci_summary_script_of_the_docs_reads_a_report(repo):
    import os
    import pathlib
    import subprocess
    import sys
    import textwrap

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "ci-github-actions.md").read_text()
    script = textwrap.dedent(
        doc.split("python - <<'EOF' >> \"$GITHUB_STEP_SUMMARY\"\n", 1)[1].split("\n          EOF")[0])
    repo.makepyfile(test_bad=CORRUPTED_TEST)
    repo.runpytest_inprocess("--trt-refit", "--trt-refit-seed=5", "--trt-refit-report=refit.json")
    out = subprocess.run([sys.executable, "-c", script], cwd=repo.path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr
    assert "### pytest --trt-refit: FAIL: 1 refit check(s) failed" in out.stdout
    assert "| TwoLinear | 2 | 1 |" in out.stdout and "culprit weight 'fc1/linear.weight CONSTANT'" in out.stdout


def test_under_xdist_declared_models_baselines_and_the_summary_come_from_the_workers(repo):
    pytest.importorskip("xdist")
    _models_repo(repo)
    result = repo.runpytest_inprocess("-n", "2", "--trt-refit", "--trt-refit-seed=9", "--trt-refit-baseline=save",
                                      "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["two_linear *cached,fallback *2 *4 *0 *",
                                 "declared models collected from conftest.py (outside the collected paths)",
                                 "baseline saved: 2 model(s) in *"])
    saved = sorted(p.name for p in (repo.path / ".trtrefit-baselines").iterdir())
    assert saved == ["ConvBn.json", "two_linear.json"]
