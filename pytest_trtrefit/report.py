"""The terminal summary section and the JSON report (for CI gating) of ``pytest --trt-refit``."""
from __future__ import annotations

import json
import math
import os
import time

from .config import TORCH_TENSORRT, RefitConfig
from .records import BuildRecord, CheckRecord, FailureRecord, RunRecords

__all__ = ["summarize", "table", "terminal_lines", "coverage_lines", "compilers", "compiler_lines", "build_json",
           "write_json", "REPORT_FORMAT", "REPORT_VERSION"]

REPORT_FORMAT = "pytest-trtrefit.report"
REPORT_VERSION = 1


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarize(records: list[CheckRecord], builds: list[BuildRecord]) -> list[dict]:
    """One row per model: paths, examples (weight sets), checks (weight set x path), failed checks,
    worst errors, the worst margin (error over the error the rule allows, <= 1 passes), the smallest
    tolerances every check would pass with, TensorRT share, time."""
    models: dict[str, dict] = {}
    for r in records:
        m = models.setdefault(r.model, {"model": r.model, "paths": [], "examples": 0, "checks": 0,
                                           "failures": 0, "worst_max_abs": 0.0, "worst_max_rel": 0.0,
                                           "worst_norm_rel": 0.0, "worst_margin": 0.0, "min_rtol_to_pass": 0.0,
                                           "min_atol_to_pass": 0.0,
                                           "trt_share": None, "seconds": 0.0, "compile_s": 0.0, "builds": 0,
                                           "cache_hits": 0, "cache_misses": 0})
        if r.path not in m["paths"]:
            m["paths"].append(r.path)
        m["checks"] += 1
        m["failures"] += 0 if r.ok else 1
        m["seconds"] += r.seconds
        for key, field in (("worst_max_abs", "max_abs"), ("worst_max_rel", "max_rel"), ("worst_norm_rel", "norm_rel"),
                           ("min_rtol_to_pass", "min_rtol"), ("min_atol_to_pass", "min_atol")):
            v = _finite(getattr(r, field))
            if v is not None:
                m[key] = max(m[key], v)
        if r.margin is not None and not math.isnan(r.margin):   # inf: an error where the rule allows none
            m["worst_margin"] = max(m["worst_margin"], r.margin)
        share = _finite(r.trt_share)
        if share is not None:   # the smallest share seen: one partly converted build shows
            m["trt_share"] = share if m["trt_share"] is None else min(m["trt_share"], share)
    for m in models.values():
        m["examples"] = m["checks"] // max(1, len(m["paths"]))   # weight sets, each through every path
    # A build belongs to every model label whose checks ran on its engine (one engine may serve a
    # declared name and a fixture check of the same class), so no row depends on which ran first.
    archs: dict[str, set] = {}
    for r in records:
        if r.architecture:
            archs.setdefault(r.model, set()).add(r.architecture)
    for b in builds:
        for m in models.values():
            mine = archs.get(m["model"])
            if (b.architecture in mine) if mine else b.model == m["model"]:
                m["compile_s"] += b.compile_s
                m["builds"] += b.cache != "hit"      # an engine loaded from the engine cache is no build
                if b.cache == "hit":
                    m["cache_hits"] += 1
                elif b.cache == "miss":
                    m["cache_misses"] += 1
    return sorted(models.values(), key=lambda m: m["model"])


def _last_per_test(failures: list[FailureRecord]) -> list[dict]:
    """One failure per test, in its JSON form with ``count`` (how many checks of the test failed): the
    last (Hypothesis replays its minimal failing example last)."""
    last: dict = {}
    counts: dict = {}
    for f in failures:
        key = (f.test, f.model)
        counts[key] = counts.get(key, 0) + 1
        last[key] = f
    return [dict(f.as_dict(), count=counts[k]) for k, f in last.items()]


def _failed_what(failure: dict) -> str:
    """What failed in a check, for its FAILED line: its paths, or the exact audit alone."""
    if failure.get("audit_only"):
        between = failure.get("audit") or "the cached and the fallback mapping"
        return f"the exact audit ({between} differ on a weight; every path matched eager)"
    return f"paths {', '.join(failure['paths'])}"


def _share(x) -> str:
    if x is None:
        return "-"
    return "100%" if x >= 1.0 else f"{100 * x:.0f}%"


def table(rows: list[dict], builds: list[BuildRecord]) -> list[str]:
    """The per-model table: one unit per column."""
    caching = any(b.cache in ("hit", "miss") for b in builds)
    width = max(len("model"), *(len(r["model"]) for r in rows))
    cols = [("paths", 16, "<", lambda r: ",".join(r["paths"])),
            ("examples", 8, ">", lambda r: str(r["examples"])),
            ("checks", 6, ">", lambda r: str(r["checks"])),
            ("failed checks", 13, ">", lambda r: str(r["failures"])),
            ("worst abs err", 13, ">", lambda r: f"{r['worst_max_abs']:.3g}"),
            ("worst rel err", 13, ">", lambda r: f"{r['worst_max_rel']:.3g}"),
            ("worst err / allowed", 19, ">", lambda r: f"{r['worst_margin']:.3g}"),
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
                 "tolerance every check of the model passes with (the other one as configured; 0: exact); worst "
                 "err / allowed: the largest |engine - eager| / (atol*max(1, max|eager|) + rtol*|eager|) over every "
                 "element, the rule each element must meet (<= 1 passes)")
    return lines


def terminal_lines(cfg: RefitConfig, data: RunRecords, seconds: float) -> list[str]:
    """The terminal summary: backend, seed, the per-model table, totals, the engine cache, failures."""
    rows = summarize(data.checks, data.builds)
    backend = data.backend or cfg.backend
    lines = [f"backend: {backend}" + (f" ({data.backend_reason})" if data.backend_reason else "")]
    if backend == "reference":
        lines.append("note: the reference backend interprets the TensorRT network on the CPU; it checks the network "
                     "and the weight mapping, not TensorRT's kernels")
    lines += compiler_lines(data.builds)
    lines.append(f"seed: {cfg.seed} (reproduce with --trt-refit-seed={cfg.seed}); paths: {', '.join(cfg.paths)}; "
                 f"rtol={cfg.rtol:g} atol={cfg.atol:g}; examples per property: {cfg.examples}")
    if not rows:
        lines.append("no refit checks ran")
        return lines
    lines += table(rows, data.builds)
    total = sum(r["checks"] for r in rows)
    failed = sum(r["failures"] for r in rows)
    worst = max(rows, key=lambda r: r["worst_max_abs"])
    expected = len(data.expected_failures)
    hits = sum(1 for b in data.builds if b.cache == "hit")
    lines.append(f"{total} path check(s), {failed} failed"
                 + (f" (and {expected} check(s) that failed as their tests expected, e.g. with pytest.raises)"
                    if expected else "")
                 + f"; worst abs error {worst['worst_max_abs']:.3g} "
                 f"({worst['model']}); {len(data.builds) - hits} build(s)"
                 + (f", {hits} engine(s) loaded from the engine cache" if hits else "") + f"; {seconds:.1f}s")
    misses = sum(1 for b in data.builds if b.cache == "miss")
    lines.append(f"engine cache: {hits} hit(s), {misses} miss(es); {data.engine_cache or 'off'}")
    for f in _last_per_test(data.failures)[:10]:
        lines.append(f"FAILED {f.get('test') or f['model']}: {_failed_what(f)}"
                     + (f"; culprit weight {f['culprit']!r}" if f.get("culprit") else "")
                     + (f" ({f['count']} failing checks, the last shown)" if f["count"] > 1 else ""))
    return lines


def compilers(builds: list[BuildRecord]) -> list[dict]:
    """The compilers that built this run's engines, with their versions, in the order they first built one."""
    seen = dict.fromkeys((b.compiler, b.compiler_version) for b in builds if b.compiler)
    return [{"compiler": c, "version": v} for c, v in seen]


def compiler_lines(builds: list[BuildRecord]) -> list[str]:
    """Summary lines: which compilers (and versions) built the engines, and what a Torch-TensorRT check checked."""
    used = compilers(builds)
    if not used:
        return []
    lines = ["compiler: " + ", ".join(f"{c['compiler']} {c['version']}" for c in used)]
    if any(c["compiler"] == TORCH_TENSORRT for c in used):
        lines.append("note: torch_tensorrt engines are Torch-TensorRT's own networks (its lowering, partition and "
                     "converters), refitted by its own refit (refit_module_weights); every weight it sets is audited "
                     "exactly against a fresh Torch-TensorRT conversion")
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


def build_json(cfg: RefitConfig, data: RunRecords, seconds: float, exitstatus: int | None = None, **extra) -> dict:
    """The JSON report in the shared schema (:mod:`refitcore.refitting.report_schema`), plus the plugin's own keys."""
    from refitcore.refitting.report_schema import check_entry, envelope

    rows = summarize(data.checks, data.builds)
    backend = data.backend or cfg.backend
    worst = max(data.checks, key=lambda r: _finite(r.max_abs) or 0.0, default=None)
    failed = sum(1 for r in data.checks if not r.ok)
    status = "fail"
    if data.failures or failed:
        summary = f"{len(data.failures) or failed} refit check(s) failed"
    elif not data.checks:
        summary = "no refit checks ran (was --trt-refit given, and are there tests that use it?)"
        status = "error"
    elif exitstatus not in (None, 0):
        summary = f"the refit checks passed but pytest exited with status {exitstatus}"
    else:
        summary, status = "all refit checks passed", "pass"
    failures = _last_per_test(data.failures)
    problems = [f"{f.get('test') or f['model']}: {_failed_what(f)}"
                + (f"; outputs {', '.join(f['outputs'])}" if f.get("outputs") else "")
                + (f"; culprit weight {f['culprit']!r}" if f.get("culprit") else "") for f in failures]
    if status != "pass" and not problems:
        problems = [summary]
    return envelope(
        producer="pytest-trtrefit", status=status, summary=summary, backend=backend,
        backend_note=data.backend_reason, rtol=cfg.rtol, atol=cfg.atol, problems=problems,
        checks=[check_entry(**r.as_dict()) for r in data.checks],
        format=REPORT_FORMAT, version=REPORT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        backend_reason=data.backend_reason,
        kernels_exercised=backend == "tensorrt",
        seed=cfg.seed,
        requested_paths=list(cfg.paths),
        examples=cfg.examples,
        duration_s=round(seconds, 3),
        pytest_exitstatus=exitstatus,
        totals={"checks": len(data.checks), "failed": failed, "models": len(rows), "builds": len(data.builds)},
        worst=({k: getattr(worst, k) for k in ("model", "path", "test", "max_abs", "max_rel", "norm_rel", "min_rtol",
                                               "min_atol", "margin")} if worst else None),
        models=rows,
        failures=failures,
        expected_failures=[{k: v for k, v in f.as_dict().items() if k != "report"} for f in data.expected_failures],
        builds=[b.as_dict() for b in data.builds],
        compilers=compilers(data.builds),
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
