"""Try every torchvision classification model on the reference backend: compile, refit through the
cached map and through the fallback with random weights, compare with eager.

Each model runs in its own subprocess (a crash, an out-of-memory kill or a timeout costs that model
only) at the smallest square input it accepts among ``SIZES``. Writes a Markdown table to
``benchmarks/results/zoo.md`` (and the raw rows to ``zoo.json``) after every model, and prints it.

    python scripts/zoo.py --jobs 2             # every model, two at a time (then the largest one by one)
    python scripts/zoo.py resnet18 vit_b_32    # some
    python scripts/zoo.py --merge mnasnet1_0   # re-run some, keep the other rows of zoo.json
    python scripts/zoo.py --one resnet18       # one model in this process, its row as JSON
    python scripts/zoo.py --combine a.json b.json --elapsed-min 43   # one table from several runs

The reference backend interprets the TensorRT network on the CPU: it proves the network and the
weight mapping, not TensorRT's kernels.
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (32, 48, 64, 75, 96, 128, 160, 224)   # candidate square inputs, smallest first
SEED = 1                                      # the refit weights' seed
TIMEOUT_S = 1800                              # per model
# The largest models (hundreds of millions of parameters) run last, so that the table fills with the
# many small ones first.
HEAVY = ("regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf",
         "efficientnet_b7", "efficientnet_v2_l", "convnext_large", "vit_b_16", "swin_v2_b", "swin_b")


def all_models() -> list[str]:
    import torchvision

    names = list(torchvision.models.list_models(module=torchvision.models))
    return [n for n in names if n not in HEAVY] + [n for n in reversed(HEAVY) if n in names]


def _weights_for(model, seed: int) -> dict:
    """Random weights drawn the way the plugin's ``state_dicts`` strategy draws them (fan-in scaled,
    valid BatchNorm statistics, tied parameters identical), for one fixed seed and no specials."""
    from pytest_trtrefit.strategies import weight_set

    # Update the model's own state_dict: it carries the per-module version metadata that some
    # modules check when loading (MNASNet refuses a state_dict without it).
    state = model.state_dict()
    state.update(weight_set(model, seed=seed, scale="fan_in"))
    return state


def smallest_input(model) -> tuple[int, str]:
    """The smallest size in ``SIZES`` whose 1x3xSxS input the eager model accepts."""
    import torch

    reason = ""
    for s in SIZES:
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, s, s))
            return s, ""
        except Exception as err:  # noqa: BLE001 - the model rejects this size: try the next
            reason = f"{type(err).__name__}: {err}"
    raise ValueError(f"no input size in {SIZES} accepted: {reason}")


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def run_one(name: str) -> dict:
    """Compile and refit one model; every failure becomes the row's first reason why not."""
    import torch
    import torchvision

    import refitcore

    row: dict = {"model": name, "stage": "instantiate"}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        # Compile with non-trivial weights too (default init leaves BatchNorm an identity).
        model.load_state_dict(_weights_for(model, 0))
        row["stage"] = "input size"
        size, _ = smallest_input(model)
        row["input"] = size
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
        row["stage"] = "compile"
        t = time.perf_counter()
        engine = refitcore.compile(model, (x,), backend="reference")
        row["compile_s"] = time.perf_counter() - t
        row["weights"] = len(engine.weight_map.sources)
        with torch.no_grad():
            expected = model(x)
        got = engine(x)
        row["compile_err"] = _max_err(got, expected)
        row["eager_max"] = float(expected.abs().max())
        row["compile_bound"] = 1e-4 * max(1.0, float(expected.abs().max()))
        row["compile_ok"] = row["compile_err"] <= row["compile_bound"]
        new = copy.deepcopy(model)
        new.load_state_dict(_weights_for(model, SEED))
        for path in ("cached", "fallback"):
            row["stage"] = f"refit {path}"
            # The audit (cached vs fallback mapping, weight by weight) needs both mappings; it runs
            # with the cached refit, which then computes the fallback's too. Repeating it with the
            # fallback refit would compare the same two mappings again at the cost of one more export.
            result = refitcore.refit(engine, new, path=path, verify_inputs=[x], audit=path == "cached")
            tm = result.timings
            # This path's own work: its mapping plus applying it (audit computes both mappings).
            row[f"{path}_s"] = tm.get(f"{path}_mapping_s", 0.0) + tm.get("apply_s", 0.0)
            row[f"{path}_ok"] = bool(result.ok and not result.fell_back)
            row[f"{path}_err"] = result.verdict.max_abs if result.verdict is not None else None
            if path == "cached":
                row["audit_ok"] = bool(result.audit is not None and result.audit.ok)
            if not result.ok:
                row.setdefault("reason", f"refit {path}: " + str(result).splitlines()[0])
            del result
        row["stage"] = "done"
    except Exception as err:  # noqa: BLE001 - the sweep records any failure in its row (the stage says where)
        row["reason"] = f"{row['stage']}: {type(err).__name__}: {err}"
    row["total_s"] = time.perf_counter() - t0
    row["ok"] = bool(row.get("compile_ok") and row.get("cached_ok") and row.get("fallback_ok")
                     and row.get("audit_ok"))
    return row


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(rows: list[dict], *, elapsed_s: float | None = None, total: int | None = None, run_note: str = "") -> str:
    passed = sum(1 for r in rows if r.get("ok"))
    head = [
        "# torchvision classification zoo on the reference backend",
        "",
        "Generated by `python scripts/zoo.py`. Each model: random weights (the plugin's fan-in "
        "strategy, seed 0) compiled on the reference backend at the smallest square input it accepts "
        f"among {list(SIZES)}, compared with eager; then refitted with new random weights (seed {SEED}) "
        "through the cached map and through the fallback, each verified against the eager model; the "
        "cached refit also audits the cached mapping against the fallback's weight by weight. "
        "Pass: max abs error <= 1e-4 * max(1, max|eager|) after compile and after both refits, and the audit "
        "agrees. Refit times are each path's mapping plus applying it (the fallback exports and converts "
        "again). The reference backend "
        "interprets the TensorRT network on the CPU: it checks the network and the weight mapping, "
        "not TensorRT's kernels.",
        "",
        f"**{passed} of {total if total is not None else len(rows)} models pass**"
        + (f"; full run {elapsed_s / 60:.1f} min on this machine's CPU" if elapsed_s is not None else "")
        + (f"; {run_note}" if run_note else "") + ".",
        "",
        "| model | params (M) | input | compile s | refit cached s | refit fallback s | max abs eager | "
        "max err compile | max err cached | max err fallback | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines = []
    for r in rows:
        result = "pass" if r.get("ok") else "FAIL: " + _one_line(r.get("reason", "mismatch"))
        size = r.get("input")
        lines.append(
            f"| {r['model']} | {_fmt(r.get('params_m'), '.1f')} | {f'{size}x{size}' if size else ''} | "
            f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(r.get('cached_s'), '.3f')} | "
            f"{_fmt(r.get('fallback_s'), '.1f')} | {_fmt(r.get('eager_max'), '.2g')} | "
            f"{_fmt(r.get('compile_err'), '.1e')} | "
            f"{_fmt(r.get('cached_err'), '.1e')} | {_fmt(r.get('fallback_err'), '.1e')} | {result} |")
    return "\n".join(head + lines) + "\n"


class _Worker:
    """A subprocess that runs models one after another (importing torch and TensorRT once) and prints
    one JSON row per model; a crash, an out-of-memory kill or a timeout costs the model at hand
    only, and the next model gets a fresh worker."""

    def __init__(self, names: list[str]):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *names]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: collections.deque = collections.deque(maxlen=20)
        threading.Thread(target=self._read_rows, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_rows(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the worker exited

    def next_row(self, name: str, timeout_s: float) -> dict | None:
        """The worker's row for ``name``; None when the worker died or timed out (it is stopped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                return {"model": name, "ok": False, "reason": f"no result within the {timeout_s:.0f} s limit per model"}
            if line is None:
                code = self.proc.wait()
                tail = [ln.strip() for ln in self.stderr if ln.strip()][-1:] or [""]
                return {"model": name, "ok": False, "reason": f"process exited with {code}: {tail[0]}"
                        + (" (killed: out of memory?)" if code in (-9, 137) else "")}
            if line.startswith("{"):
                return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _run_batch(batch: list[str], timeout_s: float, on_row) -> None:
    pending = list(batch)
    while pending:
        worker = _Worker(pending)
        for name in list(pending):
            row = worker.next_row(name, timeout_s)
            on_row(row)
            pending.remove(name)
            if worker.proc.poll() is not None and not row.get("stage"):
                break  # the worker is gone: the rest of the batch gets a new one
        worker.stop()


def _run_all(names: list[str], timeout_s: float, on_row, jobs: int = 1) -> None:
    """Light models go round-robin to ``jobs`` workers running side by side; then each HEAVY model
    runs alone in a fresh worker (its memory goes back after)."""
    light = [n for n in names if n not in HEAVY]
    threads = [threading.Thread(target=_run_batch, args=(light[i::jobs], timeout_s, on_row))
               for i in range(max(1, jobs)) if light[i::jobs]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in names:
        if name in HEAVY:
            _run_batch([name], timeout_s, on_row)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: every classification model)")
    parser.add_argument("--one", metavar="MODEL", help="run one model in this process, print its row as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "zoo.md"), help="Markdown table (default: %(default)s)")
    parser.add_argument("--merge", action="store_true",
                        help="replace the named models' rows in the existing zoo.json instead of starting afresh")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models run side by side, each worker with one intra-op thread (default: %(default)s)")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="only render: the table from these row files (a model's row in a later file wins)")
    parser.add_argument("--elapsed-min", type=float, help="with --combine: the run's wall time to state")
    parser.add_argument("--note", default="", help="with --combine: how the run was made")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)), flush=True)
        return 0
    if args.worker:
        if os.environ.get("TRTREFIT_ZOO_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["TRTREFIT_ZOO_THREADS"]))
        for name in args.models:
            print(json.dumps(run_one(name)), flush=True)
            gc.collect()
        return 0
    out = Path(args.out)
    if args.combine:
        merged: dict[str, dict] = {}
        for path in args.combine:
            merged.update({r["model"]: r for r in json.loads(Path(path).read_text())})
        order = {n: i for i, n in enumerate(sorted(all_models()))}
        rows = sorted(merged.values(), key=lambda r: order.get(r["model"], len(order)))
        elapsed_s = None if args.elapsed_min is None else args.elapsed_min * 60
        text = table(rows, elapsed_s=elapsed_s, total=len(order), run_note=args.note)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        update_readme(text)
        print(text)
        return 0 if len(rows) == len(order) and all(r.get("ok") for r in rows) else 1
    names = args.models or all_models()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    old_text = out.read_text() if out.exists() else ""
    if args.merge and out.with_suffix(".json").exists():
        rows = [r for r in json.loads(out.with_suffix(".json").read_text()) if r["model"] not in names]
    total = len(rows) + len(names)
    start = time.perf_counter()

    lock = threading.Lock()
    if args.jobs > 1:
        os.environ["TRTREFIT_ZOO_THREADS"] = "1"  # inherited by the workers

    def on_row(row: dict) -> None:
        with lock:
            rows.append(row)
            status = "pass" if row.get("ok") else "FAIL " + _one_line(row.get("reason", ""), 300)
            print(f"{row['model']}: {status} ({row.get('total_s', 0):.0f} s)", file=sys.stderr, flush=True)
            out.write_text(table(rows, total=total))
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))

    _run_all(list(names), args.timeout, on_row, args.jobs)
    elapsed = time.perf_counter() - start
    order = {n: i for i, n in enumerate(sorted(all_models()))}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    note = f"{args.jobs} model(s) at a time" if args.jobs > 1 else ""
    if args.merge:
        previous = re.search(r"full run [^*\n]*?(?=\.\n)", old_text)
        note = (previous.group(0) + "; " if previous else "") + f"re-run of {', '.join(names)}: {elapsed / 60:.1f} min"
    text = table(rows, elapsed_s=None if args.merge else elapsed, total=total, run_note=note)
    out.write_text(text)
    if set(names) == set(all_models()) or args.merge:
        update_readme(text)
    print(text)
    return 0 if all(r.get("ok") for r in rows) else 1


README_BEGIN, README_END = "<!-- zoo table: begin (scripts/zoo.py) -->", "<!-- zoo table: end -->"


def update_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    """Replace the zoo table between the README's markers with ``text`` minus its title line."""
    if not readme.exists():
        return
    body = readme.read_text()
    if README_BEGIN not in body or README_END not in body:
        print("README.md has no zoo table markers; not updated", file=sys.stderr)
        return
    table_text = "\n".join(line for line in text.splitlines() if not line.startswith("# ")).strip()
    head, rest = body.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table_text}\n{README_END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
