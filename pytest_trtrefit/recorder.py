"""The report recorder of a ``pytest --trt-refit`` session: it turns every check's outcome into
typed records (:mod:`.records`) and, at session end on the controller, writes what the run leaves
behind: baselines (save/compare), the JSON report, the HTML report and the terminal summary lines;
per test, the JUnit properties.

One :class:`ReportRecorder` per pytest process, built in ``pytest_configure``, kept in
``config.stash`` and registered as a plugin (it notes every test's outcome, also on the
pytest-xdist controller, where workers' reports arrive). Workers send :meth:`part` to the
controller, which merges them with its own (:meth:`RunRecords.merge`).
"""
from __future__ import annotations

import math
import os
import time

from . import baseline, report
from .checks import CheckOutcome, failing_outputs, output_label
from .config import RefitConfig
from .engines import EngineProvider
from .records import CheckRecord, FailureRecord, LayerRecord, RunRecords, WeightDiff

__all__ = ["ReportRecorder", "check_records", "failure_record", "worker_id", "EXIT_TESTS_FAILED"]

EXIT_TESTS_FAILED = 1   # pytest.ExitCode.TESTS_FAILED


def worker_id() -> str | None:
    """This process's pytest-xdist worker id (``gw0``...), None outside pytest-xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def check_records(outcome: CheckOutcome, seconds: float, *, test: str | None,
                  worker: str | None) -> list[CheckRecord]:
    """One record per refit path of ``outcome``; the check's time is shared between its paths. When
    the outputs pass but the two mappings disagree on a weight, every path of the check fails."""
    share = seconds / max(1, len(outcome.paths))
    audit_failed = outcome.mapping_audit is not None and not outcome.mapping_audit.ok
    only_audit = audit_failed and all(p.ok for p in outcome.paths)
    records = []
    for p in outcome.paths:
        worst = p.worst
        metrics = {} if worst is None else dict(max_abs=worst.max_abs, max_rel=worst.max_rel, norm_rel=worst.norm_rel,
                                                min_rtol=worst.min_rtol, min_atol=worst.min_atol,
                                                margin=p.verdict.margin)
        records.append(CheckRecord(
            outcome.model, p.path, p.ok and not only_audit, test=test, kind=outcome.kind, seconds=round(share, 6),
            backend=outcome.backend, worker=worker, **metrics,
            output=output_label(outcome, worst) if worst is not None and worst.name else None,
            failed_outputs=tuple(failing_outputs(outcome, p)),
            error=p.error.splitlines()[0] if p.error is not None else None,
            culprit=outcome.culprit.name if outcome.culprit is not None else None,
            trt_share=outcome.trt_share, architecture=outcome.architecture))
    return records


def failure_record(outcome: CheckOutcome, *, test: str | None) -> FailureRecord:
    """The failure of a check that did not pass: its failing paths (every path when only the
    mappings disagree), failing outputs, culprit and mismatch report."""
    audit = outcome.mapping_audit
    audit_failed = audit is not None and not audit.ok
    failed = [p.path for p in outcome.paths if not p.ok] or [p.path for p in outcome.paths]
    return FailureRecord(outcome.model, tuple(failed), outcome.report(), test=test, kind=outcome.kind,
                         mappings_disagree=audit_failed, audit_only=audit_failed and all(p.ok for p in outcome.paths),
                         outputs=tuple(dict.fromkeys(n for p in outcome.paths for n in failing_outputs(outcome, p))),
                         culprit=outcome.culprit.name if outcome.culprit else None,
                         audit=(f"{audit.a_label} and the {audit.b_label}" if audit_failed and outcome.compiler
                                else None))


class ReportRecorder:
    """The records of this process's checks (:meth:`record`) and, at session end, the reports."""

    def __init__(self, config: RefitConfig, *, worker: str | None = None):
        self.config = config
        self.worker = worker
        self.checks: list[CheckRecord] = []
        self.failures: list[FailureRecord] = []
        self.layers: list[LayerRecord] = []
        self.outcomes: dict[str, str] = {}      # test node id -> passed | failed | skipped
        self.collection: dict = {}              # declared models added / deselected (collection.py)
        self.current_test: str | None = None    # the node id the next records belong to
        self.worker_parts: list[RunRecords] = []   # what pytest-xdist workers sent (controller only)
        self.started = time.time()
        self.finished: float | None = None
        self.merged: RunRecords | None = None   # every process's records, once the session finished
        self.end_lines: list[str] = []          # baseline and HTML lines for the terminal summary
        self.report_path: str | None = None

    # -- during the run ----------------------------------------------------------------------
    def record(self, outcome: CheckOutcome, seconds: float) -> None:
        """Keep ``outcome`` (a check or one sequence step, which took ``seconds``) as typed records."""
        self.checks += check_records(outcome, seconds, test=self.current_test, worker=self.worker)
        if outcome.layers:
            self.layers.append(LayerRecord(outcome.model, tuple(WeightDiff(*w) for w in outcome.layers),
                                           self.current_test))
        if not outcome.ok:
            self.failures.append(failure_record(outcome, test=self.current_test))

    def pytest_runtest_logreport(self, report) -> None:
        """Test outcomes: a failing check inside a test that passed (``pytest.raises``) was expected by
        its test and does not fail the JSON report's gate."""
        if report.when == "call" or report.outcome != "passed":
            previous = self.outcomes.get(report.nodeid)
            if previous in (None, "passed"):
                self.outcomes[report.nodeid] = report.outcome

    def part(self, engines: EngineProvider) -> RunRecords:
        """This process's records with the engines it built (what a pytest-xdist worker sends)."""
        backend, reason = engines.resolved or (None, None)
        return RunRecords(list(self.checks), list(self.failures), list(engines.builds), list(self.layers),
                          dict(self.outcomes), {k: v for k, v in self.collection.items() if k != "files"},
                          backend, reason, engines.cache_note)

    def junit_properties(self, nodeid: str) -> list[tuple[str, object]]:
        """``(name, value)`` pairs for JUnit XML (``item.user_properties``): checks, failed checks,
        worst abs/rel error of this test's refit checks, and the backend."""
        mine = [r for r in self.checks if r.test == nodeid]
        if not mine:
            return []

        def worst(key):
            vals = [getattr(r, key) for r in mine if isinstance(getattr(r, key), (int, float))]
            bad = [v for v in vals if not math.isfinite(v)]
            return (bad[0] if bad else max(vals)) if vals else None

        props = [("trt_refit_checks", len(mine)), ("trt_refit_failed_checks", sum(1 for r in mine if not r.ok)),
                 ("trt_refit_worst_abs_err", worst("max_abs")), ("trt_refit_worst_rel_err", worst("max_rel")),
                 ("trt_refit_backend", mine[-1].backend)]
        return [(k, v) for k, v in props if v is not None]

    # -- at session end (controller) ---------------------------------------------------------
    def finish(self, session, engines: EngineProvider) -> None:
        """Merge every worker's records, then save or compare baselines, write the JSON and HTML
        reports. A baseline regression sets ``session.exitstatus`` to 1 (tests failed)."""
        cfg = self.config
        self.finished = time.time()
        data = self.merged = RunRecords.merge([self.part(engines), *self.worker_parts])
        comparison = self._baselines(session, data)
        seconds = self.finished - self.started
        if cfg.report:
            self.report_path = report.write_json(cfg.report, report.build_json(
                cfg, data, seconds, int(session.exitstatus),
                collection=data.collection,
                baseline=comparison.to_json() if comparison is not None else None))
        if cfg.html:
            from . import html_report

            try:
                path = html_report.write(cfg.html, data, report.summarize(data.checks, data.builds),
                                         report.terminal_lines(cfg, data, seconds))
                self.end_lines.append(f"HTML report: {path}")
            except (OSError, html_report.PlotUnavailableError) as err:
                self.end_lines.append(f"HTML report NOT written: {err}")

    def _baselines(self, session, data: RunRecords) -> baseline.Comparison | None:
        """``--trt-refit-baseline``: save this run's values, or compare them (the comparison)."""
        cfg = self.config
        if not cfg.baseline:
            return None
        directory = os.path.join(str(session.config.rootpath), cfg.baseline_dir)
        values = baseline.collect(data)
        comparison = None
        try:
            if cfg.baseline == "save" and data.failures:
                # A failing run's errors would make a lenient baseline: the next compare would pass them.
                self.end_lines.append(f"baseline NOT saved: {len(data.failures)} refit check(s) failed; save a "
                                      f"baseline from a passing run")
            elif cfg.baseline == "save":
                written = baseline.save(values, directory, seed=cfg.seed, backend=data.backend)
                self.end_lines.append(f"baseline saved: {len(written)} model(s) in {directory}" if written else
                                      "baseline NOT saved: no refit check ran")
            else:
                comparison = baseline.compare(values, directory, factor=cfg.baseline_factor, seed=cfg.seed)
                self.end_lines += comparison.lines()
                if not comparison and session.exitstatus == 0:
                    session.exitstatus = EXIT_TESTS_FAILED
        except (baseline.BaselineError, OSError) as err:
            self.end_lines.append(f"baseline {cfg.baseline} FAILED: {err}")
            if session.exitstatus == 0:
                session.exitstatus = EXIT_TESTS_FAILED
        return comparison

    def summary_lines(self, engines: EngineProvider) -> list[str]:
        """The terminal summary section (after :meth:`finish`)."""
        data = self.merged or RunRecords.merge([self.part(engines), *self.worker_parts])
        seconds = (self.finished or time.time()) - self.started
        lines = report.terminal_lines(self.config, data, seconds)
        lines += report.coverage_lines(data.collection)
        lines += self.end_lines
        if self.report_path:
            lines.append(f"JSON report: {self.report_path}")
        return lines
