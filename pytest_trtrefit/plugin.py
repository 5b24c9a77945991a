"""pytest plugin entry point: options, markers, the ``trt_refit`` fixture and reporting hooks.

The work lives beside this module: :mod:`.config` (options), :mod:`.engines` (the session's engine
provider: backend, compile cache, engine cache), :mod:`.recorder` (the session's report recorder:
typed :mod:`.records`, the reports at session end), :mod:`.service` (what the fixture gives a test),
:mod:`.checks` (checks and the mismatch report), :mod:`.declarative` (tests generated from a
conftest's model list), :mod:`.collection` (what gets collected and marked), :mod:`.report` (terminal
summary and JSON report), :mod:`.baseline` (save/compare), :mod:`.html_report` (the per-layer plot),
:mod:`.outputs` (usage errors, JUnit properties, reproduce lines). torch, TensorRT and refitcore are
imported only when a check runs.
"""
from __future__ import annotations

import pytest

from . import collection, hooks, outputs
from .checks import quiet_logs
from .config import DEFAULT_COMPILER, add_options, resolve
from .declarative import RefitPropertyItem, collect_conftest
from .engines import EngineProvider
from .recorder import ReportRecorder, worker_id
from .records import RunRecords
from .service import RefitSession
from .stash import ENGINES_KEY, RECORDER_KEY, get_config, get_engines, get_recorder, get_session

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
    recorder = ReportRecorder(cfg, worker=worker_id())
    config.stash[ENGINES_KEY] = EngineProvider(cfg, worker=worker_id())
    config.stash[RECORDER_KEY] = recorder
    config.pluginmanager.register(recorder, "trt-refit-recorder")   # test outcomes, also on the xdist controller
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


def pytest_report_header(config):
    cfg = get_config(config)
    if not cfg.enabled:
        return None
    precision = f"precision={cfg.precision}, " if cfg.precision != "fp32" else ""
    return (f"trt-refit: {compiler_label(get_engines(config))}backend={cfg.backend}, paths={','.join(cfg.paths)}, "
            f"examples={cfg.examples}, {precision}"
            f"rtol={cfg.rtol:g}, atol={cfg.atol:g}, seed={cfg.seed} (reproduce with --trt-refit-seed={cfg.seed})")


def compiler_label(engines: EngineProvider) -> str:
    """The header's ``compiler=NAME VERSION, `` for a session whose compiler is not refitcore's (empty
    otherwise: the header of refitcore's runs is unchanged); the version of an unusable compiler is its
    reason, which the session start turns into a usage error."""
    compiler = engines.config.compiler
    if compiler == DEFAULT_COMPILER:
        return ""
    why = engines.compiler_unavailable(compiler)
    return f"compiler={compiler} {'(unavailable)' if why else engines.compiler_version(compiler)}, "


def pytest_collect_file(file_path, parent):
    if file_path.name == "conftest.py":
        return collect_conftest(file_path, parent)
    return None


@pytest.hookimpl(tryfirst=True)   # before -k/-m/--deselect, so they apply to what is added here
def pytest_collection_modifyitems(session, config, items) -> None:
    collection.mark_fixture_tests(items)
    if get_config(config).enabled:
        collection.add_declared_models(session, config, items, get_recorder(config).collection)
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("trt_refit") is not None:
            item.add_marker(skip)


def pytest_deselected(items) -> None:
    if items:
        collection.record_deselected(items, get_recorder(items[0].config).collection)


def pytest_sessionstart(session) -> None:
    engines = get_engines(session.config)
    if engines.config.enabled:
        # After the cacheprovider's configure (config.cache) and before pytest-xdist starts workers.
        engines.open_engine_cache(session.config)
    if engines.config.enabled and not session.config.option.collectonly:
        outputs.check_usable(engines)   # an unusable backend or missing matplotlib: one usage error


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    get_recorder(item.config).current_test = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if not get_config(item.config).enabled or item.get_closest_marker("trt_refit") is None:
        return (yield)
    try:
        with quiet_logs():    # torch.export's DEBUG traces would fill every failure's captured log
            return (yield)
    finally:   # JUnit XML properties (before the report is made): worst error per test
        outputs.add_junit_properties(get_recorder(item.config), item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    cfg = get_config(item.config)
    if report.failed and call.when == "call" and cfg.enabled and not isinstance(item, RefitPropertyItem):
        outputs.add_reproduce_line(cfg, item, report)   # generated tests print theirs in repr_failure
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
    node.workerinput["trt_refit_seed"] = get_config(node.config).seed


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    part = getattr(node, "workeroutput", {}).get("trt_refit")
    if part:
        get_recorder(node.config).worker_parts.append(RunRecords.from_dict(part))


def pytest_sessionfinish(session, exitstatus) -> None:
    config = session.config
    recorder, engines = get_recorder(config), get_engines(config)
    if not recorder.config.enabled or config.option.collectonly:
        return
    if hasattr(config, "workeroutput"):   # a pytest-xdist worker: its records go to the controller
        config.workeroutput["trt_refit"] = recorder.part(engines).as_dict()
        return
    recorder.finish(session, engines)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not get_config(config).enabled or hasattr(config, "workeroutput") or config.option.collectonly:
        return
    terminalreporter.section("trt-refit")
    for line in get_recorder(config).summary_lines(get_engines(config)):
        terminalreporter.write_line(line)
