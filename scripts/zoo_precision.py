"""fp16 and bf16 engines of zoo models (``scripts/zoo_repos.py``) next to fp32: per model the worst
output error after compile, a cached refit and a fallback refit, relative to eager PyTorch in the
same dtype (the model and its inputs cast: what the engine should equal up to kernel rounding) and
to eager fp32 (what a user compares with), and whether the exact audit (cached vs fallback) passes.

Errors are relative: max |engine - eager| / max |eager| over every floating output leaf. Random
weights as ``zoo_repos.py`` draws them (seed 0 to compile, seed 1 to refit). Reference backend:
the precision is emulated (docs/precision.md), TensorRT's kernels are not run.

    python scripts/zoo_precision.py                    # the default models
    python scripts/zoo_precision.py bert convnext_atto

Writes ``benchmarks/results/zoo_precision.md`` (raw rows in ``zoo_precision.json``).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import zoo_repos  # noqa: E402  (the zoo's models and weight drawing)

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = ("bert", "gpt2", "t5_encoder", "vit_cls", "swin_cls", "convnext_atto", "efficientnet_b0", "llama_padded",
           "lstm_text", "speech_conv1d", "r3d_18")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a pytree cast to ``dtype`` (integer ids and masks stay)."""
    return torch.utils._pytree.tree_map(
        lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, value)


def rel_err(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over the floating leaves of two outputs."""
    from refitcore.capture.structured import flatten_with_names

    la, _, _ = flatten_with_names(a)
    lb, _, _ = flatten_with_names(b)
    diff = scale = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.is_floating_point() and y.numel():
            diff = max(diff, float((x.double() - y.double()).abs().max()))
            scale = max(scale, float(y.double().abs().max()))
    return diff / scale if scale else diff


def eager(model, args, kwargs, dtype):
    m = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return m(*_cast(args, dtype), **_cast(kwargs, dtype))


def run_one(name: str, precision: str) -> dict:
    import refitcore
    from refitcore.refitting.audit import audit_paths
    from refitcore.refitting.mapping import cached_mapping, fallback_mapping

    label, build = zoo_repos.MODELS[name]
    dt = PRECISIONS[precision]
    model, args, kwargs = build(0)
    model = zoo_repos._randomized(model, 0)
    options = {"min_block_size": 1} if name in zoo_repos.CUSTOM else {}
    row: dict[str, Any] = {"model": name, "label": label, "precision": precision}
    engine = refitcore.compile(model, args=args, kwargs=kwargs, backend="reference", precision=precision, **options)
    with torch.no_grad():
        out = engine(*args, **kwargs)
    row["compile_same"] = rel_err(out, eager(model, args, kwargs, dt))
    row["compile_fp32"] = rel_err(out, eager(model, args, kwargs, torch.float32))
    new = zoo_repos._randomized(build(1)[0], 1)
    row["audit_exact"] = audit_paths(cached_mapping(engine.weight_map, new), fallback_mapping(engine, new)).ok
    for path in ("cached", "fallback"):
        refitted = refitcore.refit(engine, new, path=path).engine
        with torch.no_grad():
            out = refitted(*args, **kwargs)
        row[f"{path}_same"] = rel_err(out, eager(new, args, kwargs, dt))
        row[f"{path}_fp32"] = rel_err(out, eager(new, args, kwargs, torch.float32))
    return row


def table(rows: list[dict]) -> str:
    lines = ["Relative worst output error (max |engine - eager| / max |eager|), reference backend. "
             "'same': eager in the engine's dtype; 'fp32': eager fp32.", "",
             "| model | precision | compile same | cached same | fallback same | compile fp32 | cached fp32 | "
             "fallback fp32 | exact audit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['precision']} | error: {r['error'][:100]} | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['precision']} | " + " | ".join(
            f"{r[k]:.1e}" for k in ("compile_same", "cached_same", "fallback_same", "compile_fp32", "cached_fp32",
                                    "fallback_fp32")) + f" | {'yes' if r['audit_exact'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"models (default: {', '.join(DEFAULT)})")
    args = parser.parse_args(argv)
    names = args.models or list(DEFAULT)
    torch.set_num_threads(1)
    rows = []
    for name in names:
        for precision in PRECISIONS:
            t0 = time.perf_counter()
            try:
                row = run_one(name, precision)
            except Exception as err:  # noqa: BLE001 - one model's failure is that model's row
                traceback.print_exc()
                row = {"model": name, "label": zoo_repos.MODELS[name][0], "precision": precision,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            row["total_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "zoo_precision.json").write_text(json.dumps(rows, indent=1))
            (RESULTS / "zoo_precision.md").write_text("# fp16 and bf16 engines of zoo models\n\n" + table(rows))
    print(table(rows))
    return 0 if all("error" not in r and r["audit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
