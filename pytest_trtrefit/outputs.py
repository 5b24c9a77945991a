"""What a ``pytest --trt-refit`` run adds per test and at its start: the usage errors of an unusable
setup, the JUnit properties of a refit test and the one-line reproduce command every failure ends
with. (The reports at session end: :meth:`ReportRecorder.finish <.recorder.ReportRecorder.finish>`.)"""
from __future__ import annotations

import shlex

from refitcore.options import tolerances_for

from .config import DEFAULT_COMPILER, DEFAULT_EXAMPLES, RefitConfig, default_paths
from .engines import EngineProvider
from .recorder import ReportRecorder

__all__ = ["check_usable", "add_junit_properties", "add_reproduce_line", "reproduce_command"]


def check_usable(engines: EngineProvider) -> None:
    """At session start: raise ``pytest.UsageError`` for an asked-for backend or compiler that cannot run
    here or ``--trt-refit-html`` without matplotlib, instead of failing every test."""
    import pytest

    engines.require_compiler()
    engines.require_backend()
    if engines.config.html:
        from .html_report import PlotUnavailableError, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailableError as err:
            raise pytest.UsageError(str(err)) from None


def add_junit_properties(recorder: ReportRecorder, item) -> None:
    """Append :meth:`ReportRecorder.junit_properties` (and the seed, once) to ``item.user_properties``."""
    props = recorder.junit_properties(item.nodeid)
    if props and not any(name == "trt_refit_seed" for name, _ in item.user_properties):
        props.append(("trt_refit_seed", recorder.config.seed))
    item.user_properties += props


def add_reproduce_line(cfg: RefitConfig, item, report) -> None:
    """End a failing refit test's report with the command that reproduces it."""
    if item.get_closest_marker("trt_refit") is not None and hasattr(report.longrepr, "addsection"):
        report.longrepr.addsection("trt-refit", "reproduce with: " + reproduce_command(cfg, item.nodeid))


def reproduce_command(cfg: RefitConfig, nodeid: str) -> str:
    """``pytest --trt-refit --trt-refit-seed=N [non-default options] 'nodeid'``."""
    parts = ["pytest", "--trt-refit", f"--trt-refit-seed={cfg.seed}"]
    if cfg.backend != "auto":
        parts.append(f"--trt-refit-backend={cfg.backend}")
    if cfg.compiler != DEFAULT_COMPILER:
        parts.append(f"--trt-refit-compiler={cfg.compiler}")
    if tuple(cfg.paths) != default_paths(cfg.compiler):
        parts.append(f"--trt-refit-paths={'both' if len(cfg.paths) == 2 else cfg.paths[0]}")
    if cfg.precision != "fp32":
        parts.append(f"--trt-refit-precision={cfg.precision}")
    default_rtol, default_atol = tolerances_for(cfg.precision)
    for flag, value, default in (("--trt-refit-examples", cfg.examples, DEFAULT_EXAMPLES),
                                 ("--trt-refit-rtol", cfg.rtol, default_rtol),
                                 ("--trt-refit-atol", cfg.atol, default_atol)):
        if value != default:
            parts.append(f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}")
    return " ".join(parts + [shlex.quote(nodeid)])
