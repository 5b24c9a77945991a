"""Shared helpers of the benchmark scripts: machine description, timing, recording results.

Every script measures the quantities it compares side by side in one process (interleaved
repetitions, so load from other processes hits both alike), reports the median, prints a
Markdown table and appends it, with the date and the machine, to ``benchmarks/results/<name>.md``.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_info() -> dict:
    import numpy
    import torch

    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "loadavg_start": loadavg(),
        "commit": _commit(),
    }


def _commit() -> str:
    import subprocess

    if os.environ.get("BENCH_COMMIT"):  # set when running from an exported tree (git archive)
        return os.environ["BENCH_COMMIT"]

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + (" (with uncommitted changes)" if dirty else "")


def set_threads(n: int = 2) -> None:
    import torch

    torch.set_num_threads(n)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each function ``warmup`` times, then ``reps`` rounds of all of them in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k].append(timed(fn))
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def record(name: str, title: str, body: str, info: dict, notes: Sequence[str] = (), save: bool = True) -> None:
    """Print the result and append it to ``benchmarks/results/<name>.md``."""
    info = dict(info, loadavg_end=loadavg())
    busy = (" (the cores were shared with other work: absolute times are inflated, ratios less so)"
            if _busy(info) else "")
    head = (f"## {info['date']}: {title}\n\n"
            f"Machine: {info['cpu']}, {info['cores']} usable core(s), torch threads {info['torch_threads']}, "
            f"GPU: {info['gpu']}; Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}; "
            f"commit {info['commit']}. "
            f"Load average (1/5/15 min) {info['loadavg_start']} at start, {info['loadavg_end']} at end"
            f"{busy}.\n")
    text = head + "\n" + body.rstrip() + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    if save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{name}.md"
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write(f"# {title}\n\nAppended by `benchmarks/{name_to_script(name)}`, newest last.\n\n")
            f.write(text + "\n")
        print(f"appended to {path}", file=sys.stderr)


def name_to_script(name: str) -> str:
    return f"bench_{name}.py"


def _busy(info: dict) -> bool:
    try:
        loads = [float(info["loadavg_start"].split()[0]), float(info["loadavg_end"].split()[0])]
    except (ValueError, IndexError):
        return False
    return max(loads) > 0.75 * max(1, info["cores"] or 1)


def compile_model(name: str, px: int = 64, backend: str = "reference"):
    """(model, engine, example input) for a torchvision model compiled at 1x3xPXxPX."""
    import torch
    import torchvision

    import refitcore
    from tests.models import randomize_batchnorm

    model = randomize_batchnorm(getattr(torchvision.models, name)(weights=None), seed=0).eval()
    x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))
    engine = refitcore.compile(model, x, backend=backend, model_factory=f"torchvision.models:{name}")
    return model, engine, x


def fresh_state(model, seed: int) -> dict:
    """A 'fine-tuned checkpoint': every float tensor moved by 1% of its mean magnitude (BatchNorm
    variances multiplicatively, so they stay positive), drawn by the plugin's ``perturb``."""
    from pytest_trtrefit.strategies import perturb

    return perturb(model.state_dict(), seed=seed, magnitude=1e-2)


def weight_bytes(engine) -> int:
    return int(sum(a.nbytes for a in engine.current_weights().values()))
