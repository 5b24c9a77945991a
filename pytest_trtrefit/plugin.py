"""pytest plugin entry point: options, markers, the ``trt_refit`` fixture and reporting hooks.

The work lives beside this module: :mod:`.config` (options), :mod:`.service` (the session object and
compile cache), :mod:`.checks` (checks and the mismatch report), :mod:`.declarative` (tests generated
from a conftest's model list), :mod:`.report` (terminal summary and JSON report). torch, TensorRT
and refitcore are imported only when a check runs.
"""
from __future__ import annotations

import time

import pytest

from . import hooks
from .config import add_options, resolve
from .declarative import collect_conftest
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
        settings.register_profile("trt-refit", settings(settings.default, max_examples=cfg.examples, deadline=None))
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


def pytest_collection_modifyitems(config, items) -> None:
    if get_session(config).config.enabled:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("trt_refit") is not None or "trt_refit" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    get_session(item.config).current_test = item.nodeid


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
    if not refit.config.enabled:
        return
    if hasattr(config, "workeroutput"):
        config.workeroutput["trt_refit"] = refit.export()
        return
    from . import report

    refit.finished = time.time()
    if refit.config.report:
        data = report.merge([refit.export(), *refit.worker_parts])
        refit.report_path = report.write_json(
            refit.config.report, report.build_json(refit.config, data, refit.finished - refit.started,
                                                   int(exitstatus)))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    refit = get_session(config)
    if not refit.config.enabled or hasattr(config, "workeroutput"):
        return
    from . import report

    data = report.merge([refit.export(), *refit.worker_parts])
    seconds = (refit.finished or time.time()) - refit.started
    terminalreporter.section("trt-refit")
    for line in report.terminal_lines(refit.config, data, seconds):
        terminalreporter.write_line(line)
    if refit.report_path:
        terminalreporter.write_line(f"JSON report: {refit.report_path}")
