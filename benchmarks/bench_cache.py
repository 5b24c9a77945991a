"""The engine cache: cold compile vs cache hit, each side by side in the same run.

- ``refitcore.compile`` of a torchvision model (resnet50 by default, 1x3x224x224, reference
  backend) in a fresh process, as ``trtrefit compile`` runs it: cold (an empty cache: export,
  conversion, build, store) vs hit (load the engine, refit the model's weights through the cached
  map); also a hit verified against eager on one sample, for information. Only the ``compile``
  call is timed (not the interpreter start, imports or building the model), after a
  ``gc.collect()`` (as ``timeit`` switches the collector off: the first full collection of a
  fresh process, ~0.12 s over torch's objects, would otherwise land in whichever call allocates
  next), so the ratio is the cache's own. For information, the same pair in one process after a warm-up round (no
  first-call costs: torch.export's warm-up, fresh memory pages, lazy imports).
- ``pytest --trt-refit examples`` with an empty engine cache vs a warm one (whole process wall
  time, and the compile step: the sum of the session's compile times), with the examples' own
  paths (cached and fallback: on a hit the fallback still needs the exported program, so the
  model is exported) and with ``--trt-refit-paths=cached`` (a hit needs no export at all).

Repetitions are interleaved (cold, hit, cold, hit...) so other load hits both alike; medians.
Targets: compile hit >= 20x faster than cold; warm pytest session >= 5x faster than cold.

    python benchmarks/bench_cache.py [--model resnet50] [--px 224] [--reps 3] [--pytest-reps 3] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import _common as C

COMPILE_TARGET = 20.0
PYTEST_TARGET = 5.0

CHILD = r'''
import gc, json, sys, time
sys.path.insert(0, {root!r})
import torch, torchvision
import refitcore
from tests.models import randomize_batchnorm
torch.set_num_threads({threads})
model = randomize_batchnorm(getattr(torchvision.models, {model!r})(weights=None), seed={seed}).eval()
x = torch.randn(1, 3, {px}, {px}, generator=torch.Generator().manual_seed(0))
gc.collect()    # garbage owed by imports and model building is collected before, not inside, the timed call
t0 = time.perf_counter()
engine = refitcore.compile(model, x, backend="reference", cache={cache!r},
                           verify_inputs=[(x,)] if {verify} else None)
seconds = time.perf_counter() - t0
with torch.no_grad():
    err = (engine(x) - model(x)).abs().max().item()
print(json.dumps({{"seconds": seconds, "hit": engine.cache_hit, "max_abs_err": err}}))
'''


STEADY = r'''
import gc, json, os, sys, tempfile, time
sys.path.insert(0, {root!r})
import torch, torchvision
import refitcore
from tests.models import randomize_batchnorm
torch.set_num_threads({threads})
x = torch.randn(1, 3, {px}, {px}, generator=torch.Generator().manual_seed(0))
times = {{"cold": [], "hit": []}}
for rep in range({reps} + 1):                 # round 0 warms up torch.export and the allocator
    model = randomize_batchnorm(getattr(torchvision.models, {model!r})(weights=None), seed=rep).eval()
    with tempfile.TemporaryDirectory() as empty:
        gc.collect()
        t0 = time.perf_counter()
        refitcore.compile(model, x, backend="reference", cache=empty)
        cold = time.perf_counter() - t0
    gc.collect()
    t0 = time.perf_counter()
    engine = refitcore.compile(model, x, backend="reference", cache={cache!r})
    hit = time.perf_counter() - t0
    assert engine.cache_hit is True
    if rep:
        times["cold"].append(cold)
        times["hit"].append(hit)
print(json.dumps(times))
'''


def _steady(model: str, px: int, cache: str, *, reps: int, threads: int) -> dict:
    code = STEADY.format(root=str(C.ROOT), model=model, px=px, cache=cache, reps=reps, threads=threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3000)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(model: str, px: int, cache: str, *, seed: int, verify: bool, threads: int) -> dict:
    code = CHILD.format(root=str(C.ROOT), model=model, px=px, cache=cache, seed=seed, verify=verify, threads=threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pytest(cache: str, paths: str | None, threads: int, report: str) -> dict:
    args = [sys.executable, "-m", "pytest", "-q", "--trt-refit", "-p", "no:cacheprovider", "--trt-refit-seed=1",
            f"--trt-refit-cache-dir={cache}", f"--trt-refit-report={report}"]
    if paths:
        args.append(f"--trt-refit-paths={paths}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(C.ROOT))
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=C.ROOT / "examples", capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-2000:])
    with open(report, encoding="utf-8") as fh:
        data = json.load(fh)
    builds = data["builds"]
    return {"wall": wall, "compile": sum(b["compile_s"] for b in builds),
            "hits": sum(b.get("cache") == "hit" for b in builds), "builds": len(builds)}


def _others() -> str:
    """The busiest other processes when the run starts (command names only)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:8]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    shown = [" ".join(line.split()) for line in out if line.split() and float(line.split()[0]) >= 5.0]
    return ", ".join(shown) or "nothing above 5% CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each compile variant")
    p.add_argument("--pytest-reps", type=int, default=3, help="repetitions of each pytest variant (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the child processes (default 1)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    info = C.machine_info()
    others = _others()
    work = tempfile.mkdtemp(prefix="bench-cache-")
    ok_all = True
    try:
        warm = os.path.join(work, "warm")
        first = _child(args.model, args.px, warm, seed=0, verify=False, threads=args.threads)   # fills the cache
        assert first["hit"] is False, first
        times: dict[str, list[float]] = {"cold": [], "hit": [], "hit_verified": []}
        errors: list[float] = []
        for rep in range(args.reps):
            cold_dir = os.path.join(work, f"cold{rep}")
            r = _child(args.model, args.px, cold_dir, seed=rep + 1, verify=False, threads=args.threads)
            assert r["hit"] is False, r
            times["cold"].append(r["seconds"])
            shutil.rmtree(cold_dir, ignore_errors=True)
            for key, verify in (("hit", False), ("hit_verified", True)):
                r = _child(args.model, args.px, warm, seed=rep + 1, verify=verify, threads=args.threads)
                assert r["hit"] is True, r
                times[key].append(r["seconds"])
                errors.append(r["max_abs_err"])
        med = {k: C.median(v) for k, v in times.items()}
        ratio = med["cold"] / med["hit"]
        ok_compile = ratio >= COMPILE_TARGET
        ok_all &= ok_compile
        rows = [[f"`compile` {args.model} 1x3x{args.px}x{args.px}, reference, each in a fresh process",
                 f"{med['cold']:.2f} s",
                 f"{med['hit']:.3f} s", f"**{ratio:.1f}x**", f"{med['hit_verified']:.2f} s "
                 f"({med['cold'] / med['hit_verified']:.1f}x)", f">= {COMPILE_TARGET:g}x: "
                 f"{'met' if ok_compile else '**not met**'}"]]
        steady = _steady(args.model, args.px, warm, reps=args.reps, threads=args.threads)
        smed = {k: C.median(v) for k, v in steady.items()}
        rows.append(["same, in one process after a warm-up round (steady state)", f"{smed['cold']:.2f} s",
                     f"{smed['hit']:.3f} s", f"{smed['cold'] / smed['hit']:.1f}x", "", "(information)"])
        notes = ["compile in one process, all runs (s): " + "; ".join(
            f"{k} {', '.join(f'{t:.3f}' for t in v)}" for k, v in steady.items()),
                 "compile, fresh processes, all runs (s): " + "; ".join(f"{k} {', '.join(f'{t:.3f}' for t in v)}"
                                                       for k, v in times.items()),
                 f"largest |engine - eager| after a hit (each hit had other weights than the stored engine): "
                 f"{max(errors):.3g}"]
        if args.pytest_reps:
            for paths, label in ((None, "examples' paths (cached, fallback)"), ("cached", "--trt-refit-paths=cached")):
                pt: dict[str, list[dict]] = {"cold": [], "warm": []}
                warm_dir = os.path.join(work, f"pytest-warm-{paths}")
                _pytest(warm_dir, paths, args.threads, os.path.join(work, "r.json"))
                for rep in range(args.pytest_reps):
                    cold_dir = os.path.join(work, f"pytest-cold-{rep}")
                    pt["cold"].append(_pytest(cold_dir, paths, args.threads, os.path.join(work, "r.json")))
                    shutil.rmtree(cold_dir, ignore_errors=True)
                    pt["warm"].append(_pytest(warm_dir, paths, args.threads, os.path.join(work, "r.json")))
                assert all(r["hits"] == 0 for r in pt["cold"]) and all(r["hits"] == r["builds"] for r in pt["warm"])
                wall = {k: C.median([r["wall"] for r in v]) for k, v in pt.items()}
                comp = {k: C.median([r["compile"] for r in v]) for k, v in pt.items()}
                ok = wall["cold"] / wall["warm"] >= PYTEST_TARGET
                ok_all &= ok
                rows.append([f"`pytest --trt-refit examples`, {label}: process wall time", f"{wall['cold']:.2f} s",
                             f"{wall['warm']:.2f} s", f"**{wall['cold'] / wall['warm']:.1f}x**", "",
                             f">= {PYTEST_TARGET:g}x: {'met' if ok else '**not met**'}"])
                rows.append([f"same, compile step (sum over {pt['cold'][0]['builds']} models)", f"{comp['cold']:.2f} s",
                             f"{comp['warm']:.3f} s", f"{comp['cold'] / max(comp['warm'], 1e-9):.1f}x", "", ""])
                shown = {k: ", ".join(f"{r['wall']:.2f}" for r in v) for k, v in pt.items()}
                notes.append(f"pytest {label}, wall (s): cold {shown['cold']}; warm {shown['warm']}")
        body = C.table(["measurement", "cold", "hit / warm", "speedup", "hit verified on 1 sample", "target"], rows)
        notes.append(f"busiest processes at the start (CPU %, command): {others}")
        C.record("cache", "Engine cache: cold compile vs cache hit", body, info, notes, save=not args.no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
