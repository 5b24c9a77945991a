"""pytest plugin entry point: options, markers, the ``trt_refit`` fixture and reporting hooks.

The work lives beside this module: :mod:`.config` (options), :mod:`.service` (the session object and
compile cache), :mod:`.checks` (checks and the mismatch report), :mod:`.declarative` (tests generated
from a conftest's model list), :mod:`.collection` (what gets collected and marked), :mod:`.report`
(terminal summary and JSON report), :mod:`.baseline` (save/compare), :mod:`.html_report` (the
per-layer plot), :mod:`.outputs` (session end, JUnit properties, reproduce lines). torch, TensorRT
and refitcore are imported only when a check runs.
"""
from __future__ import annotations

import pytest

from . import collection, hooks, outputs
from .checks import quiet_logs
from .config import add_options, resolve
from .declarative import RefitPropertyItem, collect_conftest
from .service import RefitSession, worker_id
from .stash import SESSION_KEY, get_session

SKIP_REASON = "needs --trt-refit"
_MARKER = ("trt_refit: a TensorRT refit check; skipped unless pytest runs with --trt-refit "
           "(pytest-trtrefit)")


def pytest_addhooks(pluginmanager) -> None:
    pluginmanager.add_hookspecs(hooks)


def pytest_addoption(parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    config.addinivalue_line("markers", _MARKER)
    handed_down = getattr(config, "workerinput", {}).get("trt_refit_seed")   # pytest-xdist worker
    cfg = resolve(config, seed=handed_down)
    session = RefitSession(cfg, worker=worker_id())
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(_OutcomeRecorder(session), "trt-refit-outcomes")
    if cfg.enabled:
        from hypothesis import settings

        # Refit property tests: bounded examples, no deadline (a refit takes as long as it takes).
        # No "explain" phase: its "Explanation" points into the plugin's own code, not the user's.
        phases = [p for p in settings.default.phases if p.name != "explain"]
        settings.register_profile("trt-refit", settings(settings.default, max_examples=cfg.examples, deadline=None,
                                                        phases=phases))
        # One seed for the whole run: Hypothesis tests that do not fix their own follow it.
        if hasattr(config.option, "hypothesis_seed") and config.option.hypothesis_seed is None:
            config.option.hypothesis_seed = str(cfg.seed)


class _OutcomeRecorder:
    """Test outcomes, also on the pytest-xdist controller: a failing check inside a test that passed
    (``pytest.raises``) was expected by its test and does not fail the JSON report's gate."""

    def __init__(self, session: RefitSession):
        self.session = session

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            previous = self.session.outcomes.get(report.nodeid)
            if previous in (None, "passed"):
                self.session.outcomes[report.nodeid] = report.outcome


def pytest_report_header(config):
    cfg = get_session(config).config
    if not cfg.enabled:
        return None
    return (f"trt-refit: backend={cfg.backend}, paths={','.join(cfg.paths)}, examples={cfg.examples}, "
            f"rtol={cfg.rtol:g}, atol={cfg.atol:g}, seed={cfg.seed} (reproduce with --trt-refit-seed={cfg.seed})")


def pytest_collect_file(file_path, parent):
    if file_path.name == "conftest.py":
        return collect_conftest(file_path, parent)
    return None


@pytest.hookimpl(tryfirst=True)   # before -k/-m/--deselect, so they apply to what is added here
def pytest_collection_modifyitems(session, config, items) -> None:
    refit = get_session(config)
    collection.mark_fixture_tests(items)
    if refit.config.enabled:
        collection.add_declared_models(session, config, items, refit.collection)
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("trt_refit") is not None:
            item.add_marker(skip)


def pytest_deselected(items) -> None:
    if items:
        collection.record_deselected(items, get_session(items[0].config).collection)


def pytest_sessionstart(session) -> None:
    refit = get_session(session.config)
    if refit.config.enabled:
        # After the cacheprovider's configure (config.cache) and before pytest-xdist starts workers.
        refit.open_engine_cache(session.config)
    if refit.config.enabled and not session.config.option.collectonly:
        outputs.check_usable(refit)   # an unusable backend or missing matplotlib: one usage error


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    get_session(item.config).current_test = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    refit = get_session(item.config)
    if not refit.config.enabled or item.get_closest_marker("trt_refit") is None:
        return (yield)
    try:
        with quiet_logs():    # torch.export's DEBUG traces would fill every failure's captured log
            return (yield)
    finally:   # JUnit XML properties (before the report is made): worst error per test
        outputs.add_junit_properties(refit, item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    refit = get_session(item.config)
    if report.failed and call.when == "call" and refit.config.enabled and not isinstance(item, RefitPropertyItem):
        outputs.add_reproduce_line(refit, item, report)   # generated tests print theirs in repr_failure
    return report


@pytest.fixture(scope="session")
def trt_refit(request) -> RefitSession:
    """The refit service: ``.config`` (resolved options), ``.backend``, ``.engine_for(model, inputs)``
    (compile cache: once per architecture, input spec and backend), ``.check(model_or_factory,
    weights, inputs)`` and ``.check_sequence(...)``, which raise ``AssertionError`` with a mismatch
    report when a refit path disagrees with eager PyTorch."""
    session = get_session(request.config)
    if not session.config.enabled:
        pytest.skip(SKIP_REASON)
    return session


# -- pytest-xdist: one seed for every worker; workers send their records to the controller ---------
@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    node.workerinput["trt_refit_seed"] = get_session(node.config).config.seed


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    part = getattr(node, "workeroutput", {}).get("trt_refit")
    if part:
        get_session(node.config).worker_parts.append(part)


def pytest_sessionfinish(session, exitstatus) -> None:
    config = session.config
    refit = get_session(config)
    if not refit.config.enabled or config.option.collectonly:
        return
    if hasattr(config, "workeroutput"):
        config.workeroutput["trt_refit"] = refit.export()
        return
    outputs.finish(session, refit)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    refit = get_session(config)
    if not refit.config.enabled or hasattr(config, "workeroutput") or config.option.collectonly:
        return
    terminalreporter.section("trt-refit")
    for line in outputs.summary_lines(config, refit):
        terminalreporter.write_line(line)
