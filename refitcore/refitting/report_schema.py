"""One versioned JSON schema for every refit report: ``pytest --trt-refit-report`` and ``trtrefit gate --report``.

Both producers write an object with these keys (more keys may follow, per producer)::

    schema      "trtrefit.report/1"
    producer    "pytest-trtrefit" | "trtrefit gate"
    ok          true when every check ran and passed (the CI gate)
    status      "pass" | "fail" | "error" (error: the checks could not run)
    summary     one line saying what happened
    backend     "reference" | "tensorrt" | null; backend_note: why / what it exercises
    rtol, atol  the tolerances (atol scaled by max(1, max|eager output|))
    paths       {path: {ok, checks, failed, max_abs, max_rel, culprit}}
    checks      [{model, path, ok, max_abs, max_rel, norm_rel, min_rtol, min_atol, culprit, test}]
    problems    [str]: what failed, one line each

Standard library only: a CI script reads a report with :func:`validate` and nothing else.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SCHEMA", "STATUSES", "CHECK_FIELDS", "check_entry", "path_summaries", "envelope", "validate",
           "ReportSchemaError"]

SCHEMA = "trtrefit.report/1"
STATUSES = ("pass", "fail", "error")
CHECK_FIELDS = ("model", "path", "ok", "max_abs", "max_rel", "norm_rel", "min_rtol", "min_atol", "culprit", "test")
_TOP = ("schema", "producer", "ok", "status", "summary", "backend", "backend_note", "rtol", "atol", "paths",
        "checks", "problems")


class ReportSchemaError(ValueError):
    """A report does not follow :data:`SCHEMA`."""


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def check_entry(*, model: str | None, path: str, ok: bool, max_abs: float | None = None,
                max_rel: float | None = None, norm_rel: float | None = None, min_rtol: float | None = None,
                min_atol: float | None = None, culprit: str | None = None, test: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """One check (one weight set through one refit path) with every shared field present."""
    entry = {"model": model, "path": path, "ok": bool(ok), "max_abs": _num(max_abs), "max_rel": _num(max_rel),
             "norm_rel": _num(norm_rel), "min_rtol": _num(min_rtol), "min_atol": _num(min_atol),
             "culprit": culprit, "test": test}
    entry.update(extra)
    return entry


def _worst(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    if not finite:
        return None
    nonfinite = [v for v in finite if not math.isfinite(v)]
    return nonfinite[0] if nonfinite else max(finite)


def path_summaries(checks: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{path: {ok, checks, failed, max_abs, max_rel, culprit}}`` over ``checks``."""
    out: dict[str, dict[str, Any]] = {}
    for c in checks:
        p = out.setdefault(c["path"], {"ok": True, "checks": 0, "failed": 0, "max_abs": None, "max_rel": None,
                                       "culprit": None})
        p["checks"] += 1
        if not c["ok"]:
            p["ok"] = False
            p["failed"] += 1
            p["culprit"] = p["culprit"] or c.get("culprit")
        p["max_abs"] = _worst([p["max_abs"], _num(c.get("max_abs"))])
        p["max_rel"] = _worst([p["max_rel"], _num(c.get("max_rel"))])
    return out


def envelope(*, producer: str, status: str, summary: str, checks: list[dict], backend: str | None,
             backend_note: str | None, rtol: float, atol: float, problems: list[str] | None = None,
             paths: Mapping[str, dict] | None = None, **extra: Any) -> dict[str, Any]:
    """The shared top level of a report; ``paths`` defaults to :func:`path_summaries` of ``checks``
    (a producer may pass richer per-path entries: they keep the shared keys and add their own)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: expected one of {STATUSES}")
    summaries = path_summaries(checks)
    merged = {}
    for name, entry in (paths if paths is not None else summaries).items():
        merged[name] = {**summaries.get(name, {"ok": entry.get("ok", False), "checks": 0, "failed": 0,
                                                "max_abs": None, "max_rel": None, "culprit": None}), **entry}
    report = {"schema": SCHEMA, "producer": producer, "ok": status == "pass", "status": status, "summary": summary,
              "backend": backend, "backend_note": backend_note, "rtol": rtol, "atol": atol, "paths": merged,
              "checks": checks, "problems": list(problems or [])}
    report.update(extra)
    return report


def validate(report: Mapping[str, Any]) -> None:
    """Raise :class:`ReportSchemaError` listing every way ``report`` departs from :data:`SCHEMA`."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    problems += [f"missing key {k!r}" for k in _TOP if k not in report]
    if report.get("status") not in STATUSES:
        problems.append(f"status {report.get('status')!r} is not one of {STATUSES}")
    if "ok" in report and report.get("ok") != (report.get("status") == "pass"):
        problems.append(f"ok={report.get('ok')!r} contradicts status={report.get('status')!r}")
    for i, c in enumerate(report.get("checks") or []):
        missing = [k for k in CHECK_FIELDS if k not in c]
        if missing:
            problems.append(f"checks[{i}] lacks {missing}")
    for name, p in (report.get("paths") or {}).items():
        missing = [k for k in ("ok", "checks", "failed", "max_abs", "max_rel", "culprit") if k not in p]
        if missing:
            problems.append(f"paths[{name!r}] lacks {missing}")
    if problems:
        raise ReportSchemaError("not a " + SCHEMA + " report: " + "; ".join(problems))
