"""On a GPU: refit of a TensorRT engine vs a full rebuild (export, conversion, REFIT build).

Needs a CUDA GPU with a TensorRT that builds *and runs* engines (``refitcore.backends.tensorrt.usable()``);
otherwise it records that it was skipped and the precise reason, and measures nothing.

    python benchmarks/bench_gpu_refit_vs_rebuild.py [--models resnet18,resnet50] [--reps 3] [--no-record]
"""
from __future__ import annotations

import argparse
import time

import _common as C


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    info = C.machine_info()
    from refitcore.backends import tensorrt

    ok, reason = tensorrt.usable()
    if not ok:
        body = f"SKIPPED: no usable TensorRT GPU backend here: {reason}"
        C.record("gpu_refit_vs_rebuild", "GPU refit vs full rebuild", body, info, [
            "nothing was measured; the plan build cost alone (the rebuild a refit avoids) was recorded on an "
            "H200 in benchmarks/results/build_times.md",
        ], save=not args.no_record)
        return 0
    import refitcore

    rows = []
    for name in args.models.split(","):
        builds, refits = [], []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            model, engine, x = C.compile_model(name, args.px, backend="tensorrt")
            builds.append(time.perf_counter() - t0)
            state = C.fresh_state(model, seed=rep + 1)
            t0 = time.perf_counter()
            result = refitcore.refit(engine, state, path="cached", in_place=True)
            refits.append(time.perf_counter() - t0)
            assert result.engine is engine
        b, r = C.median(builds), C.median(refits)
        rows.append([name, f"1x3x{args.px}x{args.px}", f"{b:.2f} s", C.ms(r), f"{b / r:.0f}x"])
        print(rows[-1], flush=True)
    body = C.table(["model", "input", "rebuild: compile(backend='tensorrt') (median)",
                    "refit(path='cached', in_place=True) (median)", "rebuild / refit"], rows)
    C.record("gpu_refit_vs_rebuild", "GPU refit vs full rebuild", body, info,
             [f"median of {args.reps}; rebuild = export + conversion + REFIT plan build + deserialization"],
             save=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
