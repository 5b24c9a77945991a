"""Checkpoints at their real size: compile, cached and fallback refit, verification and peak RSS of
``trtrefit gate`` for Llama-style transformers models (random weights, nothing downloaded) of
55M to 7B parameters, in fp32 and bf16, plus a resnet-style CNN.

Every measurement runs in a fresh child process (peak RSS is per process: ``VmHWM`` of
/proc/self/status, also ``resource.getrusage``), so one size's memory never hides another's:

1. ``make``: build the model from a small config in the dtype asked for (the factory lives in a
   module written to a temporary folder), compile it on the reference backend at that precision (a
   bf16 model into a bf16 engine: ``precision="bf16"``) with ``strip_engine_weights=True`` (one copy of
   the weights; ``--keep-engine-weights``: the engine's own copy too, as before), save the bundle
   (weightless: the gate refits every weight anyway), and write *other* random
   weights as a safetensors checkpoint (sharded, with an index, above 2 GB) in that dtype. Weights
   are generated tensor by tensor from a model built on the ``meta`` device, so writing a 7B
   checkpoint never holds the model.
2. ``gate``: ``trtrefit gate BUNDLE CKPT --inputs SAMPLES.pt (2 samples) --paths cached --model scale_model:build``
   run through the CLI entry point in-process (after ``gc.freeze()`` of the imports' objects, so that
   a full collection of Python's cycle collector, 0.1-0.2 s, does not land in one step's timing), with
   each progress step recording the process's RSS and its peak so far; then, in the same process, one
   ``clone()`` of every checkpoint tensor (the memory-copy floor the cached refit is compared with).
3. ``fallback``: the same gate through ``--paths fallback`` (the bundle's program record converted
   again; no export).

Targets (issue 25): gate peak RSS <= 1.5x the checkpoint's bytes (670M fp32, 1.3B bf16); the
cached refit (mapping + apply) <= 1.5x one clone() of the weights; the fallback within 5x of the
cached path; growth linear in the parameter count.

    python benchmarks/bench_scale.py --sizes 55m,250m --dtype fp32,bf16 [--cnn] [--no-record]
    python benchmarks/bench_scale.py --sizes 55m,250m,670m,1.3b,7b --dtype bf16   # on a quiet machine

A step whose expected peak does not fit in the available memory with 4 GB to spare is skipped with a
message instead of swapping the machine to a halt (``--force`` runs it anyway): compile and the cached
gate need about 1.1x the checkpoint's bytes, compile without stripping 2.5x, the fallback gate 1.5x (4.5x
before it kept views of the checkpoint it maps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

# name -> (vocab, hidden, layers, intermediate, heads, kv heads): Llama-style, head size 64..128.
SIZES = {
    "tiny": (256, 64, 2, 128, 4, 4),
    "55m": (32000, 512, 8, 1376, 8, 8),
    "250m": (32000, 1024, 14, 2752, 16, 16),
    "670m": (32000, 1536, 20, 4096, 24, 24),
    "1.3b": (32000, 2048, 24, 5504, 32, 32),
    "7b": (32000, 4096, 32, 11008, 32, 32),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SHARD_BYTES = 2 << 30
TOKENS = 16
GB = 1 << 30

MODEL_MODULE = '''"""The model factory of one bench_scale case (written by benchmarks/bench_scale.py)."""
import json
import os

import torch


class LogitsOf(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def build():
    with open(os.path.join(os.path.dirname(__file__), "config.json")) as f:
        spec = json.load(f)
    if spec["kind"] == "cnn":
        import torchvision

        return torchvision.models.resnet50(num_classes=1000).eval()
    import transformers

    config = transformers.LlamaConfig(**spec["config"])
    dtype = getattr(torch, spec["dtype"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # parameters made in their dtype (a bf16 model never held in float32)
    try:
        lm = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return LogitsOf(lm).to(dtype).eval()
'''


# ----------------------------------------------------------------------------- process memory

def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_gib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GiB."""
    return status_kib("VmRSS") / (1 << 20), status_kib("VmHWM") / (1 << 20)


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("inf")


class RecordingProgress:
    """The CLI's progress, recording each step's time, RSS at its end and the peak RSS so far."""

    steps: list = []
    base: type = object   # the CLI's Progress class, set before it is replaced by this one

    def __init__(self, quiet: bool = False, stream=None):
        self.inner = RecordingProgress.base(quiet, stream)
        self.quiet = quiet

    def info(self, message: str) -> None:
        self.inner.info(message)

    def step(self, what: str):
        import contextlib

        @contextlib.contextmanager
        def run():
            t0 = time.perf_counter()
            with self.inner.step(what):
                yield
            rss, hwm = rss_gib()
            RecordingProgress.steps.append({"step": what, "s": time.perf_counter() - t0, "rss_gib": rss,
                                            "peak_gib": hwm})
        return run()


# ----------------------------------------------------------------------------- the child steps

def llama_config(size: str) -> dict:
    vocab, hidden, layers, inter, heads, kv = SIZES[size]
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 64,
            "use_cache": False, "tie_word_embeddings": False}


def write_checkpoint(model, folder: Path, dtype: str, seed: int) -> tuple[str, int]:
    """Random weights of ``model``'s shapes (a meta model is fine) as safetensors in ``dtype``,
    sharded above SHARD_BYTES; (path to give the gate, bytes)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)
    shards: list[dict] = [{}]
    sizes = [0]
    total = 0
    for key, t in model.state_dict().items():
        nbytes = t.numel() * tdt.itemsize
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tuple(t.shape)
        sizes[-1] += nbytes
        total += nbytes

    def tensor(key: str, shape: tuple) -> torch.Tensor:
        if key.endswith(("norm.weight", "running_var", "bn.weight")):
            return (1 + 0.1 * torch.rand(shape, generator=g)).to(tdt)
        if not shape:
            return torch.zeros((), dtype=tdt)
        return (torch.randn(shape, generator=g) * 0.02).to(tdt)

    if len(shards) == 1:
        path = folder / "checkpoint.safetensors"
        save_file({k: tensor(k, s) for k, s in shards[0].items()}, str(path))
        return str(path), total
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensor(k, s) for k, s in shard.items()}, str(folder / name))
        index["weight_map"].update(dict.fromkeys(shard, name))
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index, indent=1))
    return str(folder), total


def child_make(folder: Path, size: str, dtype: str, strip: str = "1") -> dict:
    import torch

    import refitcore

    torch.set_num_threads(2)
    spec = {"kind": "cnn"} if size == "cnn" else {"kind": "llama", "config": llama_config(size), "dtype": DTYPES[dtype]}
    (folder / "config.json").write_text(json.dumps(spec))
    (folder / "scale_model.py").write_text(MODEL_MODULE)
    sys.path.insert(0, str(folder))
    import scale_model

    with torch.device("meta"):
        shapes = scale_model.build()
    params = sum(p.numel() for p in shapes.parameters())
    ckpt, nbytes = write_checkpoint(shapes, folder, DTYPES[dtype], seed=1)
    del shapes
    out = {"params": params, "checkpoint": ckpt, "checkpoint_bytes": nbytes}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = scale_model.build()
    example = torch.randn(1, 3, 64, 64) if size == "cnn" else torch.randint(0, SIZES[size][0], (1, TOKENS))
    engine = refitcore.compile(model, example, backend="reference", model_factory="scale_model:build",
                               precision="fp32" if size == "cnn" else dtype, strip_engine_weights=strip == "1")
    engine.save(folder / "engine.trtrefit")   # weightless when stripped
    g = torch.Generator().manual_seed(2)
    samples = (torch.randn((2, *example.shape), generator=g) if size == "cnn"
               else torch.randint(0, SIZES[size][0], (2, *example.shape), generator=g))
    torch.save(samples, folder / "samples.pt")
    out.update(compile_s=time.perf_counter() - t0, compile_peak_gib=rss_gib()[1],
               bundle_bytes=(folder / "engine.trtrefit").stat().st_size)
    return out


def child_gate(folder: Path, path: str, checkpoint: str) -> dict:
    import gc

    import torch

    import refitcore.cli.main as cli

    torch.set_num_threads(2)
    if (folder / "config.json").exists() and json.loads((folder / "config.json").read_text())["kind"] != "cnn":
        import transformers  # noqa: F401 - imported before the freeze below, as the factory will import it
    # The objects of the imports (torch, transformers: hundreds of thousands) out of the cycle collector's
    # reach: a full collection walking them takes 0.1-0.2 s and lands in whichever step allocates at that
    # moment (measured: the 55M bf16 cached apply, the 7B fallback apply), which says nothing about that step.
    gc.collect()
    gc.freeze()
    sys.path.insert(0, str(folder))
    RecordingProgress.base = cli.Progress
    cli.Progress = RecordingProgress   # type: ignore[misc]  # record RSS at each step
    report = folder / f"gate-{path}.json"
    base = rss_gib()[0]
    t0 = time.perf_counter()
    code = cli.main(["gate", str(folder / "engine.trtrefit"), checkpoint, "--inputs", str(folder / "samples.pt"),
                     "--paths", path,
                     "--model", "scale_model:build", "--report", str(report)])
    wall = time.perf_counter() - t0
    peak = max(rss_gib()[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20))
    data = json.loads(report.read_text())
    rec = data["paths"].get(path, {})
    out = {"exit": code, "gate_s": wall, "peak_gib": peak, "base_gib": base, "steps": RecordingProgress.steps,
           "mapping_s": rec.get("timings", {}).get("mapping_s"), "apply_s": rec.get("timings", {}).get("apply_s"),
           "max_abs": rec.get("max_abs"), "problems": data.get("problems"), "calibration": rec.get("calibration"),
           "worst": rec.get("worst")}
    verify = [s for s in RecordingProgress.steps if s["step"].startswith("refitting")]
    out["refit_verify_s"] = verify[0]["s"] if verify else None
    eager = [s for s in RecordingProgress.steps if s["step"].startswith("building the eager")]
    out["eager_s"] = eager[0]["s"] if eager else None
    if path == "cached":
        out["clone_s"] = clone_floor(checkpoint)
    return out


def clone_floor(checkpoint: str) -> float:
    """Seconds of one clone() of every checkpoint tensor (pages already read: the memory-copy floor)."""
    from refitcore.refitting.checkpoints import read_file

    state = read_file(checkpoint)
    for t in state.values():   # read the pages in first: the floor is the copy, not the disk
        t.sum()
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        copies = {k: v.clone() for k, v in state.items()}
        best = min(best, time.perf_counter() - t0)
        del copies
    return best


# ----------------------------------------------------------------------------- the parent

def run_child(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_peak_gib(size: str, dtype: str, factor: float) -> float:
    """About ``factor`` x the checkpoint's bytes, plus the process (measured in benchmarks/results/scale.md:
    the fallback gate 1.1-1.4x above the process at 670M; compile holding the engine's copy 2.5x at 250M
    fp32, 2.9x bf16; stripped compile and the cached gate about 1.1x)."""
    if size == "cnn":
        return 2.0
    vocab, hidden, layers, inter, heads, kv = SIZES[size]
    per_layer = 2 * hidden * hidden + 2 * hidden * hidden * kv // heads + 3 * hidden * inter
    params = 2 * vocab * hidden + layers * per_layer
    return params * (4 if dtype == "fp32" else 2) * factor / GB + 1.0


def measure(size: str, dtype: str, timeout: float, force: bool, keep: str | None, strip: bool = True) -> dict:
    def fits(factor: float) -> str | None:
        need = expected_peak_gib(size, dtype, factor) + 4
        if force or available_gib() >= need:
            return None
        return f"needs about {need:.0f} GiB available, {available_gib():.0f} GiB are (run with --force)"

    why = fits(1.1 if strip else 2.9)
    if why:
        return {"size": size, "dtype": dtype, "skipped": why}
    folder = Path(keep or tempfile.mkdtemp(prefix=f"bench_scale_{size}_{dtype}_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        row = {"size": size, "dtype": dtype, "stripped": strip,
               **run_child(["make", str(folder), size, dtype, "1" if strip else "0"], timeout)}
        row["cached"] = run_child(["gate", str(folder), "cached", row["checkpoint"]], timeout)
        why = fits(1.5)
        try:
            row["fallback"] = ({"skipped": why} if why else
                               run_child(["gate", str(folder), "fallback", row["checkpoint"]], timeout))
        except RuntimeError as err:   # e.g. killed for memory: recorded, the sweep goes on
            row["fallback"] = {"skipped": f"failed: {str(err).splitlines()[0][-200:]}"}
        return row
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def fmt_row(r: dict) -> list:
    if "skipped" in r:
        return [r["size"], r["dtype"], "-", "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"]
    c, f = r["cached"], r["fallback"]
    ck = r["checkpoint_bytes"] / GB
    cached_s = (c["mapping_s"] or 0) + (c["apply_s"] or 0)
    fallback_s = (f.get("mapping_s") or 0) + (f.get("apply_s") or 0)
    how = "stripped" if r.get("stripped") else "with the engine's copy"
    return [r["size"], r["dtype"], f"{r['params'] / 1e6:.0f}M", f"{ck:.2f} GiB", f"{r['compile_s']:.1f} s",
            f"{r['compile_peak_gib']:.2f} GiB ({r['compile_peak_gib'] / ck:.2f}x ckpt, {how})",
            f"{cached_s:.2f} s ({cached_s / c['clone_s']:.2f}x clone {c['clone_s']:.2f} s)",
            f"skipped: {f['skipped']}" if "skipped" in f else
            f"{fallback_s:.1f} s ({fallback_s / max(cached_s, 1e-9):.1f}x cached)",
            f"{c['refit_verify_s']:.1f} s" if c["refit_verify_s"] is not None else "-",
            f"{c['gate_s']:.1f} s, exit {c['exit']}",
            f"{c['peak_gib']:.2f} GiB ({c['peak_gib'] / ck:.2f}x ckpt)",
            "-" if "skipped" in f else
            f"fallback gate peak {f['peak_gib']:.2f} GiB ({f['peak_gib'] / ck:.2f}x), exit {f['exit']}"]


def steps_table(r: dict) -> str:
    if "skipped" in r:
        return ""
    def said(path: str) -> str:
        how = r[path].get("calibration") or "the precision's default tolerances"
        return f"\n{path} path verified at {how} (worst: {r[path].get('worst')})\n"

    tolerance = "".join(said(path) for path in ("cached", "fallback") if "exit" in r.get(path, {}))
    rows = [[s["step"][:90], f"{s['s']:.2f} s", f"{s['rss_gib']:.2f} GiB", f"{s['peak_gib']:.2f} GiB"]
            for s in r["cached"]["steps"]]
    return (f"\n`trtrefit gate --paths cached`, {r['size']} {r['dtype']} (checkpoint "
            f"{r['checkpoint_bytes'] / GB:.2f} GiB, process at start {r['cached']['base_gib']:.2f} GiB):\n\n"
            + C.table(["step", "time", "RSS after", "peak so far"], rows) + "\n" + tolerance)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, folder, *rest = sys.argv[2:]
        out = child_make(Path(folder), *rest) if kind == "make" else child_gate(Path(folder), *rest)
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="55m,250m", help=f"comma-separated, of {','.join(SIZES)}")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated, of fp32,bf16")
    p.add_argument("--cnn", action="store_true", help="also a resnet50 (fp32) at 64x64")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per child step")
    p.add_argument("--force", action="store_true", help="run sizes that may not fit in the available memory")
    p.add_argument("--keep", help="write the case's files here and keep them (one size and dtype only)")
    p.add_argument("--keep-engine-weights", action="store_true",
                   help="compile without strip_engine_weights (the engine holds its own copy, as before)")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    info = C.machine_info()
    cases = [(s, d) for s in a.sizes.split(",") for d in a.dtype.split(",")] + ([("cnn", "fp32")] if a.cnn else [])
    results = []
    for size, dtype in cases:
        print(f"bench_scale: {size} {dtype} ...", file=sys.stderr, flush=True)
        results.append(measure(size, dtype, a.timeout, a.force, a.keep, strip=not a.keep_engine_weights))
        print(json.dumps(results[-1])[:2000], file=sys.stderr, flush=True)
    body = C.table(["size", "dtype", "params", "checkpoint", "compile", "compile + save peak RSS",
                    "cached refit (map+apply)", "fallback refit",
                    "cached refit + verify (2 samples)", "gate (cached) end to end", "gate peak RSS", "fallback"],
                   [fmt_row(r) for r in results])
    body += "\n" + "".join(steps_table(r) for r in results)
    notes = [f"reference backend, {TOKENS} tokens, random weights (a Llama-style transformers model from a small "
             f"config; the checkpoint holds other random weights than the compiled model); every step in a fresh "
             f"process; peak RSS is VmHWM (resident pages, the checkpoint's mapped pages included)",
             "targets: gate peak <= 1.5x checkpoint bytes at 670M fp32 and 1.3B bf16; cached refit <= 1.5x clone; "
             "fallback <= 5x cached"]
    C.record("scale", "Checkpoints at their real size: trtrefit gate from 55M to 7B parameters", body, info, notes,
             save=not a.no_record)


if __name__ == "__main__":
    main()
