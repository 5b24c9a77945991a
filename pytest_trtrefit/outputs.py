"""What a ``pytest --trt-refit`` run leaves behind, at session end on the controller: baselines
(save/compare), the JSON report, the HTML report; per test, the JUnit properties and the one-line
reproduce command every failure ends with."""
from __future__ import annotations

import math
import os
import shlex
import time

from . import baseline, report
from .config import DEFAULT_ATOL, DEFAULT_EXAMPLES, DEFAULT_RTOL

__all__ = ["finish", "summary_lines", "check_usable", "junit_properties", "add_junit_properties", "add_reproduce_line",
           "reproduce_command", "EXIT_TESTS_FAILED"]

EXIT_TESTS_FAILED = 1   # pytest.ExitCode.TESTS_FAILED


def _baseline_dir(config, cfg) -> str:
    return os.path.join(str(config.rootpath), cfg.baseline_dir)


def finish(session, refit) -> None:
    """Merge every worker's records, then save or compare baselines, write the JSON and HTML
    reports. A baseline regression sets ``session.exitstatus`` to 1 (tests failed)."""
    cfg = refit.config
    refit.finished = time.time()
    data = report.merge([refit.export(), *refit.worker_parts])
    refit.merged = data
    lines: list[str] = []
    comparison = None
    if cfg.baseline:
        directory = _baseline_dir(session.config, cfg)
        values = baseline.collect(data)
        try:
            if cfg.baseline == "save" and data["failures"]:
                # A failing run's errors would make a lenient baseline: the next compare would pass them.
                lines.append(f"baseline NOT saved: {len(data['failures'])} refit check(s) failed; save a baseline "
                             f"from a passing run")
            elif cfg.baseline == "save":
                written = baseline.save(values, directory, seed=cfg.seed, backend=data.get("backend"))
                lines.append(f"baseline saved: {len(written)} model(s) in {directory}" if written else
                             "baseline NOT saved: no refit check ran")
            else:
                comparison = baseline.compare(values, directory, factor=cfg.baseline_factor, seed=cfg.seed)
                lines += comparison.lines()
                if not comparison and session.exitstatus == 0:
                    session.exitstatus = EXIT_TESTS_FAILED
        except (baseline.BaselineError, OSError) as err:
            lines.append(f"baseline {cfg.baseline} FAILED: {err}")
            if session.exitstatus == 0:
                session.exitstatus = EXIT_TESTS_FAILED
    seconds = refit.finished - refit.started
    if cfg.report:
        refit.report_path = report.write_json(cfg.report, report.build_json(
            cfg, data, seconds, int(session.exitstatus),
            collection=data["collection"],
            baseline=comparison.to_json() if comparison is not None else None))
    if cfg.html:
        from . import html_report

        try:
            path = html_report.write(cfg.html, data, report.summarize(data["records"], data["builds"]),
                                     report.terminal_lines(cfg, data, seconds))
            lines.append(f"HTML report: {path}")
        except (OSError, html_report.PlotUnavailableError) as err:
            lines.append(f"HTML report NOT written: {err}")
    refit.end_lines = lines


def summary_lines(config, refit) -> list[str]:
    """The terminal summary section (after :func:`finish`)."""
    data = getattr(refit, "merged", None) or report.merge([refit.export(), *refit.worker_parts])
    seconds = (refit.finished or time.time()) - refit.started
    lines = report.terminal_lines(refit.config, data, seconds)
    lines += report.coverage_lines(data["collection"])
    lines += getattr(refit, "end_lines", [])
    if refit.report_path:
        lines.append(f"JSON report: {refit.report_path}")
    return lines


def check_usable(refit) -> None:
    """At session start: raise ``pytest.UsageError`` for an asked-for backend that cannot run here
    or ``--trt-refit-html`` without matplotlib, instead of failing every test."""
    import pytest

    refit.require_backend()
    if refit.config.html:
        from .html_report import PlotUnavailableError, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailableError as err:
            raise pytest.UsageError(str(err)) from None


def add_junit_properties(refit, item) -> None:
    """Append :func:`junit_properties` (and the seed, once) to ``item.user_properties``."""
    props = junit_properties(refit, item.nodeid)
    if props and not any(name == "trt_refit_seed" for name, _ in item.user_properties):
        props.append(("trt_refit_seed", refit.config.seed))
    item.user_properties += props


def add_reproduce_line(refit, item, report) -> None:
    """End a failing refit test's report with the command that reproduces it."""
    if item.get_closest_marker("trt_refit") is not None and hasattr(report.longrepr, "addsection"):
        report.longrepr.addsection("trt-refit", "reproduce with: " + reproduce_command(refit.config, item.nodeid))


def junit_properties(refit, nodeid: str) -> list[tuple[str, object]]:
    """``(name, value)`` pairs for JUnit XML (``item.user_properties``): checks, failed checks,
    worst abs/rel error of this test's refit checks, and the seed that reproduces them."""
    mine = [r for r in refit.records if r.get("test") == nodeid]
    if not mine:
        return []

    def worst(key):
        vals = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
        bad = [v for v in vals if not math.isfinite(v)]
        return (bad[0] if bad else max(vals)) if vals else None

    props = [("trt_refit_checks", len(mine)), ("trt_refit_failed_checks", sum(1 for r in mine if not r["ok"])),
             ("trt_refit_worst_abs_err", worst("max_abs")), ("trt_refit_worst_rel_err", worst("max_rel")),
             ("trt_refit_backend", mine[-1].get("backend"))]
    return [(k, v) for k, v in props if v is not None]


def reproduce_command(cfg, nodeid: str) -> str:
    """``pytest --trt-refit --trt-refit-seed=N [non-default options] 'nodeid'``."""
    parts = ["pytest", "--trt-refit", f"--trt-refit-seed={cfg.seed}"]
    if cfg.backend != "auto":
        parts.append(f"--trt-refit-backend={cfg.backend}")
    if tuple(cfg.paths) != ("cached", "fallback"):
        parts.append(f"--trt-refit-paths={'both' if len(cfg.paths) == 2 else cfg.paths[0]}")
    for flag, value, default in (("--trt-refit-examples", cfg.examples, DEFAULT_EXAMPLES),
                                 ("--trt-refit-rtol", cfg.rtol, DEFAULT_RTOL),
                                 ("--trt-refit-atol", cfg.atol, DEFAULT_ATOL)):
        if value != default:
            parts.append(f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}")
    return " ".join(parts + [shlex.quote(nodeid)])
