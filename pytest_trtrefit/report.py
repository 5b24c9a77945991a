"""The terminal summary section and the JSON report (for CI gating) of ``pytest --trt-refit``."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable

__all__ = ["merge", "summarize", "table", "terminal_lines", "coverage_lines", "build_json", "write_json",
           "REPORT_FORMAT", "REPORT_VERSION"]

REPORT_FORMAT = "pytest-trtrefit.report"
REPORT_VERSION = 1


def merge(parts: Iterable[dict]) -> dict:
    """Combine :meth:`RefitSession.export` dicts (the controller's own and each xdist worker's)."""
    out: dict[str, Any] = {"records": [], "failures": [], "builds": [], "backend": None, "backend_reason": None,
                           "outcomes": {}, "expected_failures": [], "layers": [],
                           "collection": {}}
    for part in parts:
        if not part:
            continue
        out["records"] += part.get("records", [])
        out["failures"] += part.get("failures", [])
        out["builds"] += part.get("builds", [])
        out["outcomes"].update(part.get("outcomes", {}))
        out["layers"] += part.get("layers", [])
        for key, values in (part.get("collection") or {}).items():   # each xdist worker collects
            seen = out["collection"].setdefault(key, [])
            seen += [v for v in values if v not in seen]
        if part.get("backend") and not out["backend"]:
            out["backend"], out["backend_reason"] = part["backend"], part.get("backend_reason")
        out.setdefault("engine_cache", part.get("engine_cache"))
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
    """One row per model: paths, examples (weight sets), checks (weight set x path), failed checks,
    worst errors, the smallest tolerances every check would pass with, TensorRT share, time."""
    models: dict[str, dict] = {}
    for r in records:
        m = models.setdefault(r["model"], {"model": r["model"], "paths": [], "examples": 0, "checks": 0,
                                           "failures": 0, "worst_max_abs": 0.0, "worst_max_rel": 0.0,
                                           "worst_norm_rel": 0.0, "min_rtol_to_pass": 0.0, "min_atol_to_pass": 0.0,
                                           "trt_share": None, "seconds": 0.0, "compile_s": 0.0, "builds": 0,
                                           "cache_hits": 0, "cache_misses": 0})
        if r["path"] not in m["paths"]:
            m["paths"].append(r["path"])
        m["checks"] += 1
        m["failures"] += 0 if r["ok"] else 1
        m["seconds"] += r.get("seconds", 0.0)
        for key, field in (("worst_max_abs", "max_abs"), ("worst_max_rel", "max_rel"), ("worst_norm_rel", "norm_rel"),
                           ("min_rtol_to_pass", "min_rtol"), ("min_atol_to_pass", "min_atol")):
            v = _finite(r.get(field))
            if v is not None:
                m[key] = max(m[key], v)
        share = _finite(r.get("trt_share"))
        if share is not None:   # the smallest share seen: one partly converted build shows
            m["trt_share"] = share if m["trt_share"] is None else min(m["trt_share"], share)
    for m in models.values():
        m["examples"] = m["checks"] // max(1, len(m["paths"]))   # weight sets, each through every path
    # A build belongs to every model label whose checks ran on its engine (one engine may serve a
    # declared name and a fixture check of the same class), so no row depends on which ran first.
    archs: dict[str, set] = {}
    for r in records:
        if r.get("architecture"):
            archs.setdefault(r["model"], set()).add(r["architecture"])
    for b in builds:
        for m in models.values():
            mine = archs.get(m["model"])
            if (b.get("architecture") in mine) if mine else b["model"] == m["model"]:
                m["compile_s"] += b.get("compile_s", 0.0)
                m["builds"] += 1
                if b.get("cache") == "hit":
                    m["cache_hits"] += 1
                elif b.get("cache") == "miss":
                    m["cache_misses"] += 1
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


def _share(x) -> str:
    if x is None:
        return "-"
    return "100%" if x >= 1.0 else f"{100 * x:.0f}%"


def table(rows: list[dict], builds: list[dict]) -> list[str]:
    """The per-model table: one unit per column."""
    caching = any(b.get("cache") in ("hit", "miss") for b in builds)
    width = max(len("model"), *(len(r["model"]) for r in rows))
    cols = [("paths", 16, "<", lambda r: ",".join(r["paths"])),
            ("examples", 8, ">", lambda r: str(r["examples"])),
            ("checks", 6, ">", lambda r: str(r["checks"])),
            ("failed checks", 13, ">", lambda r: str(r["failures"])),
            ("worst abs err", 13, ">", lambda r: f"{r['worst_max_abs']:.3g}"),
            ("worst rel err", 13, ">", lambda r: f"{r['worst_max_rel']:.3g}"),
            ("atol to pass", 12, ">", lambda r: f"{r['min_atol_to_pass']:.2g}"),
            ("rtol to pass", 12, ">", lambda r: f"{r['min_rtol_to_pass']:.2g}"),
            ("TRT share", 9, ">", lambda r: _share(r["trt_share"]))]
    if caching:
        cols.append(("cache hit/miss", 14, ">", lambda r: f"{r['cache_hits']}/{r['cache_misses']}"))
    cols += [("builds", 6, ">", lambda r: str(r["builds"])),
             ("time", 8, ">", lambda r: f"{r['seconds'] + r['compile_s']:.1f}s")]
    lines = [f"{'model':<{width}}  " + " ".join(f"{name:{align}{w}}" for name, w, align, _ in cols)]
    for r in rows:
        lines.append(f"{r['model']:<{width}}  " + " ".join(f"{get(r):{align}{w}}" for _, w, align, get in cols))
    lines.append("examples: weight sets drawn; checks: one per example and path; atol/rtol to pass: the smallest "
                 "tolerance every check of the model passes with (the other one as configured; 0: exact)")
    return lines


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
    lines += table(rows, data["builds"])
    total = sum(r["checks"] for r in rows)
    failed = sum(r["failures"] for r in rows)
    worst = max(rows, key=lambda r: r["worst_max_abs"])
    expected = len(data["expected_failures"])
    lines.append(f"{total} path check(s), {failed} failed"
                 + (f" ({expected} more failed inside tests that expected it)" if expected else "")
                 + f"; worst abs error {worst['worst_max_abs']:.3g} "
                 f"({worst['model']}); {len(data['builds'])} build(s); {seconds:.1f}s")
    hits = sum(1 for b in data["builds"] if b.get("cache") == "hit")
    misses = sum(1 for b in data["builds"] if b.get("cache") == "miss")
    lines.append(f"engine cache: {hits} hit(s), {misses} miss(es); {data.get('engine_cache') or 'off'}")
    for f in _last_per_test(data["failures"])[:10]:
        lines.append(f"FAILED {f.get('test') or f['model']}: paths {', '.join(f['paths'])}"
                     + (f"; culprit weight {f['culprit']!r}" if f.get("culprit") else "")
                     + (f" ({f['count']} failing checks, the last shown)" if f["count"] > 1 else ""))
    return lines


def coverage_lines(state: dict) -> list[str]:
    """Summary lines: which declared models were added, deselected or not selected."""
    lines = []
    if state.get("added"):
        lines.append(f"declared models collected from {', '.join(state['added'])} (outside the collected paths)")
    if state.get("deselected"):
        lines.append(f"{len(state['deselected'])} generated model check(s) deselected by the user (-k/-m/--deselect): "
                     + ", ".join(state["deselected"][:5]) + (" ..." if len(state["deselected"]) > 5 else ""))
    if state.get("not_selected"):
        lines.append(f"declared models in {', '.join(state['not_selected'])} NOT checked: tests were picked by node id")
    return lines


def build_json(cfg, data: dict, seconds: float, exitstatus: int | None = None, **extra) -> dict:
    """The JSON report in the shared schema (:mod:`refitcore.refitting.report_schema`), plus the plugin's own keys."""
    from refitcore.refitting.report_schema import check_entry, envelope

    rows = summarize(data["records"], data["builds"])
    backend = data.get("backend") or cfg.backend
    worst = max(data["records"], key=lambda r: _finite(r.get("max_abs")) or 0.0, default=None)
    failed = sum(1 for r in data["records"] if not r["ok"])
    status = "fail"
    if data["failures"] or failed:
        summary = f"{len(data['failures']) or failed} refit check(s) failed"
    elif not data["records"]:
        summary = "no refit checks ran (was --trt-refit given, and are there tests that use it?)"
        status = "error"
    elif exitstatus not in (None, 0):
        summary = f"the refit checks passed but pytest exited with status {exitstatus}"
    else:
        summary, status = "all refit checks passed", "pass"
    failures = _last_per_test(data["failures"])
    problems = [f"{f.get('test') or f['model']}: paths {', '.join(f['paths'])}"
                + (f"; outputs {', '.join(f['outputs'])}" if f.get("outputs") else "")
                + (f"; culprit weight {f['culprit']!r}" if f.get("culprit") else "") for f in failures]
    if status != "pass" and not problems:
        problems = [summary]
    return envelope(
        producer="pytest-trtrefit", status=status, summary=summary, backend=backend,
        backend_note=data.get("backend_reason"), rtol=cfg.rtol, atol=cfg.atol, problems=problems,
        checks=[check_entry(**r) for r in data["records"]],
        format=REPORT_FORMAT, version=REPORT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        backend_reason=data.get("backend_reason"),
        kernels_exercised=backend == "tensorrt",
        seed=cfg.seed,
        requested_paths=list(cfg.paths),
        examples=cfg.examples,
        duration_s=round(seconds, 3),
        pytest_exitstatus=exitstatus,
        totals={"checks": len(data["records"]), "failed": failed, "models": len(rows), "builds": len(data["builds"])},
        worst=({k: worst.get(k) for k in ("model", "path", "test", "max_abs", "max_rel", "norm_rel", "min_rtol",
                                          "min_atol")} if worst else None),
        models=rows,
        failures=failures,
        expected_failures=[{k: v for k, v in f.items() if k != "report"} for f in data["expected_failures"]],
        builds=data["builds"],
        **extra,
    )


def write_json(path: str, report: dict) -> str:
    """Write ``report`` as strict JSON to ``path`` atomically (readers never see half a file)."""
    from refitcore.engine.fileio import atomic_write

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = json.dumps(_clean(report), indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))
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
