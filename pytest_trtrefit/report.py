"""The terminal summary section and the JSON report (for CI gating) of ``pytest --trt-refit``."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable

__all__ = ["merge", "summarize", "terminal_lines", "build_json", "write_json", "REPORT_FORMAT", "REPORT_VERSION"]

REPORT_FORMAT = "pytest-trtrefit.report"
REPORT_VERSION = 1


def merge(parts: Iterable[dict]) -> dict:
    """Combine :meth:`RefitSession.export` dicts (the controller's own and each xdist worker's)."""
    out: dict[str, Any] = {"records": [], "failures": [], "builds": [], "backend": None, "backend_reason": None,
                           "outcomes": {}, "expected_failures": []}
    for part in parts:
        if not part:
            continue
        out["records"] += part.get("records", [])
        out["failures"] += part.get("failures", [])
        out["builds"] += part.get("builds", [])
        out["outcomes"].update(part.get("outcomes", {}))
        if part.get("backend") and not out["backend"]:
            out["backend"], out["backend_reason"] = part["backend"], part.get("backend_reason")
    # A failing check inside a test that passed was expected by that test (pytest.raises).
    expected = {t for t, o in out["outcomes"].items() if o == "passed"}
    for r in out["records"]:
        if not r["ok"] and r.get("test") in expected:
            r["ok"], r["expected_failure"] = True, True
    out["expected_failures"] = [f for f in out["failures"] if f.get("test") in expected]
    out["failures"] = [f for f in out["failures"] if f.get("test") not in expected]
    return out


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarize(records: list[dict], builds: list[dict]) -> list[dict]:
    """One row per model: paths, examples (weight sets checked), failures, worst errors, time."""
    models: dict[str, dict] = {}
    for r in records:
        m = models.setdefault(r["model"], {"model": r["model"], "paths": [], "examples": 0, "checks": 0,
                                           "failures": 0, "worst_max_abs": 0.0, "worst_norm_rel": 0.0,
                                           "min_rtol_to_pass": 0.0, "min_atol_to_pass": 0.0,
                                           "seconds": 0.0, "compile_s": 0.0, "builds": 0})
        if r["path"] not in m["paths"]:
            m["paths"].append(r["path"])
        m["checks"] += 1
        m["failures"] += 0 if r["ok"] else 1
        m["seconds"] += r.get("seconds", 0.0)
        for key, field in (("worst_max_abs", "max_abs"), ("worst_norm_rel", "norm_rel"),
                           ("min_rtol_to_pass", "min_rtol"), ("min_atol_to_pass", "min_atol")):
            v = _finite(r.get(field))
            if v is not None:
                m[key] = max(m[key], v)
    for m in models.values():
        m["examples"] = m["checks"] // max(1, len(m["paths"]))   # weight sets, each through every path
    for b in builds:
        m = models.get(b["model"])
        if m is not None:
            m["compile_s"] += b["compile_s"]
            m["builds"] += 1
    return sorted(models.values(), key=lambda m: m["model"])


def _last_per_test(failures: list[dict]) -> list[dict]:
    """One failure per test: the last (Hypothesis replays its minimal failing example last)."""
    last: dict = {}
    counts: dict = {}
    for f in failures:
        key = (f.get("test"), f["model"])
        counts[key] = counts.get(key, 0) + 1
        last[key] = f
    return [dict(f, count=counts[k]) for k, f in last.items()]


def terminal_lines(cfg, data: dict, seconds: float) -> list[str]:
    rows = summarize(data["records"], data["builds"])
    backend = data.get("backend") or cfg.backend
    lines = [f"backend: {backend}" + (f" ({data['backend_reason']})" if data.get("backend_reason") else "")]
    if backend == "reference":
        lines.append("note: the reference backend interprets the TensorRT network on the CPU; it checks the network "
                     "and the weight mapping, not TensorRT's kernels")
    lines.append(f"seed: {cfg.seed} (reproduce with --trt-refit-seed={cfg.seed}); paths: {', '.join(cfg.paths)}; "
                 f"rtol={cfg.rtol:g} atol={cfg.atol:g}; examples per property: {cfg.examples}")
    if not rows:
        lines.append("no refit checks ran")
        return lines
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines.append(f"{'model':<{width}}  {'paths':<16} {'examples':>8} {'failed':>6} {'worst abs err':>13} "
                 f"{'min rtol':>9} {'builds':>6} {'time':>8}")
    for r in rows:
        lines.append(f"{r['model']:<{width}}  {','.join(r['paths']):<16} {r['examples']:>8} {r['failures']:>6} "
                     f"{r['worst_max_abs']:>13.3g} {r['min_rtol_to_pass']:>9.2g} {r['builds']:>6} "
                     f"{r['seconds'] + r['compile_s']:>7.1f}s")
    total = sum(r["checks"] for r in rows)
    failed = sum(r["failures"] for r in rows)
    worst = max(rows, key=lambda r: r["worst_max_abs"])
    expected = len(data["expected_failures"])
    lines.append(f"{total} path check(s), {failed} failed"
                 + (f" ({expected} more failed inside tests that expected it)" if expected else "")
                 + f"; worst abs error {worst['worst_max_abs']:.3g} "
                 f"({worst['model']}); {len(data['builds'])} build(s); {seconds:.1f}s")
    for f in _last_per_test(data["failures"])[:10]:
        lines.append(f"FAILED {f.get('test') or f['model']}: paths {', '.join(f['paths'])}"
                     + (f"; culprit weight {f['culprit']!r}" if f.get("culprit") else "")
                     + (f" ({f['count']} failing checks, the last shown)" if f["count"] > 1 else ""))
    return lines


def build_json(cfg, data: dict, seconds: float, exitstatus: int | None = None) -> dict:
    rows = summarize(data["records"], data["builds"])
    backend = data.get("backend") or cfg.backend
    worst = max(data["records"], key=lambda r: _finite(r.get("max_abs")) or 0.0, default=None)
    failed = sum(1 for r in data["records"] if not r["ok"])
    if data["failures"] or failed:
        verdict = f"{len(data['failures']) or failed} refit check(s) failed"
    elif not data["records"]:
        verdict = "no refit checks ran (was --trt-refit given, and are there tests that use it?)"
    elif exitstatus not in (None, 0):
        verdict = f"the refit checks passed but pytest exited with status {exitstatus}"
    else:
        verdict = "all refit checks passed"
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        # The CI gate: at least one check ran, none failed, and pytest itself succeeded.
        "ok": verdict == "all refit checks passed",
        "verdict": verdict,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": backend,
        "backend_reason": data.get("backend_reason"),
        "kernels_exercised": backend == "tensorrt",
        "seed": cfg.seed,
        "paths": list(cfg.paths),
        "examples": cfg.examples,
        "rtol": cfg.rtol,
        "atol": cfg.atol,
        "duration_s": round(seconds, 3),
        "pytest_exitstatus": exitstatus,
        "totals": {"checks": len(data["records"]), "failed": sum(1 for r in data["records"] if not r["ok"]),
                   "models": len(rows), "builds": len(data["builds"])},
        "worst": ({k: worst.get(k) for k in ("model", "path", "test", "max_abs", "max_rel", "norm_rel", "min_rtol",
                                             "min_atol")} if worst else None),
        "models": rows,
        "failures": _last_per_test(data["failures"]),
        "expected_failures": [{k: v for k, v in f.items() if k != "report"} for f in data["expected_failures"]],
        "builds": data["builds"],
        "checks": data["records"],
    }


def write_json(path: str, report: dict) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_clean(report), fh, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _clean(obj):
    """Strict JSON: non-finite floats become strings ("inf", "nan") so any CI tool can read the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json_default(obj):
    if isinstance(obj, float):
        return None
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
