"""Fallback vs cached mapping, and the refit apply time, measured side by side.

- cached mapping: ``refitcore.cached_mapping(weight_map, state_dict)``;
- fallback mapping: ``refitcore.fallback_mapping(engine, state_dict)``: conversion run again with
  the new weights on the engine's own exported program (no new export), weights read back off
  the new network (the converters fold BatchNorm in float64: an independent witness);
- apply: ``refitcore.apply_mapping`` (validate every weight, set all, refit, keep the previous
  weights for rollback), in place and on a copy (the default of ``refitcore.refit``);
- end to end: ``refitcore.refit(engine, state_dict, path=...)``;
- for information, the fallback of an engine loaded from a file, which has no exported program:
  it converts the graph the file records (``refitcore.engine.program_record``); and of a file without
  that record (dynamic shapes, an older file), which re-exports from its recorded model factory (what
  ``trtrefit gate --trust-factory`` does for it; the benchmark saved that bundle itself, so it trusts it).

Target: cached mapping >= 10x faster than the fallback mapping.

    python benchmarks/bench_cached_vs_fallback.py [--models resnet18,resnet50] [--reps 7] [--no-record]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common as C

TARGET = 10.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--loaded-reps", type=int, default=3, help="repetitions of the re-exporting fallback (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see README)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    info = C.machine_info()
    import refitcore

    map_rows, apply_rows, ok_all = [], [], True
    for name in args.models.split(","):
        model, engine, _ = C.compile_model(name, args.px)
        state = C.fresh_state(model, seed=1)
        wm = engine.weight_map
        cached_map = refitcore.cached_mapping(wm, state)
        fallback_map = refitcore.fallback_mapping(engine, state)
        agree = refitcore.audit_paths(cached_map, fallback_map)
        target = engine.clone()
        t = C.interleaved({
            "cached": lambda: refitcore.cached_mapping(wm, state),
            "fallback": lambda: refitcore.fallback_mapping(engine, state),
            "apply_inplace": lambda: refitcore.apply_mapping(target, cached_map, in_place=True),
            "apply_copy": lambda: refitcore.apply_mapping(engine, cached_map),
            "refit_cached": lambda: refitcore.refit(engine, state, path="cached"),
            "refit_fallback": lambda: refitcore.refit(engine, state, path="fallback"),
        }, reps=args.reps)
        med = {k: C.median(v) for k, v in t.items()}
        loaded = reexported = None
        if args.loaded_reps:
            from refitcore.engine import bundle

            with tempfile.TemporaryDirectory() as d:
                engine.save(Path(d) / "m.trtrefit")
                header, arrays = engine.to_parts()
                del header["program"]
                bundle.write(Path(d) / "bare.trtrefit", header, arrays)
                loaded_engine = refitcore.load(Path(d) / "m.trtrefit")
                bare = refitcore.load(Path(d) / "bare.trtrefit")
                t_loaded = C.interleaved({
                    "l": lambda: refitcore.fallback_mapping(loaded_engine, state),
                    "r": lambda: refitcore.fallback_mapping(bare, state, trust_factory=True)}, reps=args.loaded_reps)
                loaded, reexported = C.median(t_loaded["l"]), C.median(t_loaded["r"])
        ratio = med["fallback"] / med["cached"]
        ok = ratio >= TARGET
        ok_all &= ok
        map_rows.append([name, C.ms(med["cached"]), C.ms(med["fallback"]), f"{ratio:.1f}x",
                         f">= {TARGET:g}x: {'met' if ok else 'MISSED'}",
                         C.ms(loaded) if loaded is not None else "-",
                         C.ms(reexported) if reexported is not None else "-", "yes" if agree.ok else "NO"])
        apply_rows.append([name, C.ms(med["apply_inplace"]), C.ms(med["apply_copy"]), C.ms(med["refit_cached"]),
                           C.ms(med["refit_fallback"]), f"{med['refit_fallback'] / med['refit_cached']:.1f}x"])
        print(f"{name}: " + ", ".join(f"{k} {C.ms(v)}" for k, v in med.items()), flush=True)
    body = ("Mapping (new state_dict -> {engine weight name: array}):\n\n"
            + C.table(["model", "cached (median)", "fallback, exported program reused (median)",
                       "fallback / cached", "target", "fallback, loaded bundle: its recorded graph (median)",
                       "fallback, loaded bundle without the record: re-export (median)",
                       "cached == fallback (audit)"], map_rows)
            + "\n\nApply and end to end:\n\n"
            + C.table(["model", "apply_mapping in place", "apply_mapping on a copy", "refit(path='cached')",
                       "refit(path='fallback')", "fallback / cached, end to end"], apply_rows))
    C.record("cached_vs_fallback", "Fallback vs cached mapping, refit apply time", body, info, [
        f"median of {args.reps} interleaved repetitions after one warm-up ({args.loaded_reps} for the loaded "
        f"bundle); compile at 1x3x{args.px}x{args.px}; reference backend (CPU weight store with TensorRT's "
        f"Refitter contract: the apply time is the driver's validation and copies, not a GPU refit)",
    ], save=not args.no_record)
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
