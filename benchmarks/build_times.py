"""The rebuild cost that refit avoids: per model of tests/models.py, convert it and build a TensorRT
plan with REFIT (and, for comparison, without), and record build time and plan size.

Then try to deserialize and run each plan, and record exactly what the runtime says (TensorRT-RTX
refuses compute capability 9.0 GPUs: the message is what ``usable()`` recognises).

Usage (on a machine with a CUDA GPU and a TensorRT Python API)::

    python benchmarks/build_times.py [--models a,b] [--repeat 1] [--out benchmarks/results]

Writes ``build_times.json`` and ``build_times.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    import torch

    from refitcore import _trt

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "tensorrt": f"{_trt.flavour()} {_trt.version()}" if _trt.available() else "none"}
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        env.update(device=torch.cuda.get_device_name(), cc=f"{cap[0]}.{cap[1]}",
                   driver_cuda=str(torch.version.cuda))
    else:
        env["device"] = "none"
    return env


def measure(name: str, repeat: int = 1) -> dict:
    import torch

    from refitcore import _trt
    from refitcore.backends.tensorrt_build import build_plan
    from refitcore.backends.tensorrt_refit import make_error_recorder
    from refitcore.capture.lowering import export_model, plan_fusions
    from refitcore.conversion.convert import convert
    from tests.models import MODELS, make

    row: dict = {"model": name, "input": list(MODELS[name][1])}
    t = _trt.trt()
    try:
        model, x = make(name)
        t0 = time.perf_counter()
        ep = export_model(model, (x,))
        fusion = plan_fusions(ep.graph_module)
        result = convert(ep, fusion=fusion)
        row["convert_s"] = round(time.perf_counter() - t0, 3)
        row["layers"] = int(result.network.num_layers)
        row["weights"] = len(result.weights)
        row["params"] = int(sum(p.numel() for p in model.parameters()))
    except Exception as err:  # noqa: BLE001 - the table records any failure in its row
        row["error"] = f"convert: {type(err).__name__}: {err}"
        row["trace"] = traceback.format_exc()[-1500:]
        return row
    for refit in (True, False):
        key = "refit" if refit else "norefit"
        times = []
        try:
            for _ in range(repeat):
                pb = build_plan(result.builder, result.network, refit=refit, recorder=make_error_recorder(t))
                times.append(pb.seconds)
            row[f"{key}_build_s"] = round(min(times), 3)
            row[f"{key}_plan_bytes"] = pb.nbytes
            if refit:
                row["network_supported"] = pb.network_supported
                row["builder_messages"] = pb.messages[-8:]
                plan = pb.plan
        except Exception as err:  # noqa: BLE001 - the table records any failure in its row
            row[f"{key}_error"] = f"{type(err).__name__}: {err}"
    if "refit_build_s" not in row:
        return row
    # Deserialize and run (the runtime's verdict on this GPU).
    from refitcore.backends.tensorrt import TensorRTEngine

    meta = {"device_index": torch.cuda.current_device(), "input_names": list(result.input_names),
            "output_names": list(result.output_names),
            "weight_shapes": {k: list(v.shape) for k, v in result.weights.items()}}
    try:
        engine = TensorRTEngine(plan, dict(result.weights), meta)
        out = engine.run([x.cuda()])
        with torch.no_grad():
            ref = model(x)
        row["run"] = f"ok, max abs error vs eager {float((out[0].cpu() - ref).abs().max()):.3g}"
    except Exception as err:  # noqa: BLE001 - the table records any failure in its row
        row["run"] = f"{type(err).__name__}: {err}"
    return row


def to_markdown(env: dict, rows: list[dict]) -> str:
    lines = ["# TensorRT plan build times (the rebuild cost that refit avoids)", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| model | input | layers | refittable weights | params | convert s | build s (REFIT) "
             "| plan bytes (REFIT) | build s (no REFIT) | plan bytes (no REFIT) | builder accepts network |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['input']} | {r['error']} |" + " |" * 8)
            continue
        lines.append("| " + " | ".join(str(v) for v in (
            r["model"], "x".join(map(str, r["input"])), r.get("layers"), r.get("weights"), r.get("params"),
            r.get("convert_s"), r.get("refit_build_s", r.get("refit_error")), r.get("refit_plan_bytes"),
            r.get("norefit_build_s", r.get("norefit_error")), r.get("norefit_plan_bytes"),
            r.get("network_supported"))) + " |")
    runs = {r.get("run") for r in rows if r.get("run")}
    lines += ["", "Deserialize and run on this device:", ""]
    for msg in sorted(runs):
        models = [r["model"] for r in rows if r.get("run") == msg]
        lines.append(f"- {', '.join(models)}: `{msg}`")
    msgs = sorted({m for r in rows for m in r.get("builder_messages", [])})
    if msgs:
        lines += ["", "What the builder logged (warnings and errors, REFIT builds):", ""]
        lines += [f"- `{m}`" for m in msgs[:20]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tests.models import MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated names (default: all of tests/models.py)")
    p.add_argument("--repeat", type=int, default=1, help="builds per configuration; the minimum is kept (default 1)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for build_times.json and build_times.md (default: benchmarks/results)")
    args = p.parse_args(argv)
    env = _env()
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.repeat)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "build_times.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "build_times.md"), "w") as f:
        f.write(to_markdown(env, rows))
    print(to_markdown(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
