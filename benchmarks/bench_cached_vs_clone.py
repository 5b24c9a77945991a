"""Cached mapping vs the memory-copy floor (a plain clone of the state_dict).

The cached path has to read every weight and write every engine weight once; a clone of the
state_dict does the same amount of memory traffic and nothing else, so it is the floor.
Target: cached mapping within 3x of the clone.

    python benchmarks/bench_cached_vs_clone.py [--models resnet18,resnet50] [--reps 15] [--no-record]
"""
from __future__ import annotations

import argparse

import _common as C

TARGET = 3.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--px", type=int, default=64, help="compile resolution (the weights do not depend on it)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see README)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    info = C.machine_info()
    import refitcore

    rows, ok_all = [], True
    for name in args.models.split(","):
        model, engine, _ = C.compile_model(name, args.px)
        state = C.fresh_state(model, seed=1)
        wm = engine.weight_map
        t = C.interleaved({
            "clone": lambda: {k: v.clone() for k, v in state.items()},
            "cached": lambda: refitcore.cached_mapping(wm, state),
        }, reps=args.reps)
        clone, cached = C.median(t["clone"]), C.median(t["cached"])
        ratio = cached / clone
        ok = ratio <= TARGET
        ok_all &= ok
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        rows.append([name, f"{nbytes / 2**20:.1f} MiB", len(wm), C.ms(clone), C.ms(cached),
                     f"{ratio:.2f}x", f"<= {TARGET:g}x: {'met' if ok else 'MISSED'}"])
        print(f"{name}: clone {C.ms(clone)} cached {C.ms(cached)} ratio {ratio:.2f}", flush=True)
    body = C.table(["model", "state_dict", "engine weights", "state_dict clone (median)", "cached mapping (median)",
                    "cached / clone", "target"], rows)
    C.record("cached_vs_clone", "Cached mapping vs state_dict clone (memory-copy floor)", body, info, [
        f"median of {args.reps} interleaved repetitions after one warm-up; compile at 1x3x{args.px}x{args.px} "
        f"(weights do not depend on the resolution); reference backend (mapping is backend-independent)",
        "clone = `{k: v.clone() for k, v in state_dict.items()}`; cached = `refitcore.cached_mapping(weight_map, "
        "state_dict)` (validation, BatchNorm fold of every conv, float32 contiguous arrays)",
    ], save=not args.no_record)
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
