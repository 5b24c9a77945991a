"""``trtrefit``: compile a model into a refittable engine, and gate checkpoints before deploying them.

Exit codes (every subcommand): 0 pass, 1 mismatch (the weights or the refit are wrong: the message
names the weight), 2 unusable input (missing or damaged file, other architecture: recompile needed).
Progress goes to stderr (quiet with ``-q``); results and reports go to stdout and the files asked for.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Iterator, Sequence

__all__ = ["main", "build_parser", "parse_shape", "load_samples", "EXIT_OK", "EXIT_MISMATCH", "EXIT_UNUSABLE"]

EXIT_OK, EXIT_MISMATCH, EXIT_UNUSABLE = 0, 1, 2
PROG = "trtrefit"

_MAIN_HELP = """\
Prove a TensorRT weight refit right before you ship it.

A refittable engine is compiled once from a model factory; each new checkpoint is then
refitted into a copy of it, through the cached weight map (fast) and/or the fallback
(convert again, read the weights back), and the refitted engine is compared with eager
PyTorch on sample inputs.
"""

_MAIN_EPILOG = """\
examples:
  # compile once (the factory is recorded in the bundle, so later steps can rebuild the model)
  trtrefit compile torchvision.models:resnet18 --input 1x3x224x224 -o resnet18.trtrefit

  # CI gate: refuse a checkpoint whose refit does not reproduce eager PyTorch
  trtrefit gate resnet18.trtrefit finetuned.pt --inputs random:4 --markdown summary.md

  # do two engines hold the same weights? does an engine hold this checkpoint?
  trtrefit audit before.trtrefit after.trtrefit
  trtrefit audit resnet18.trtrefit finetuned.pt

  # what can this machine do (GPU, TensorRT, backends)?
  trtrefit doctor

exit codes: 0 pass, 1 mismatch (names the weight), 2 unusable input (missing or damaged
file, other architecture: recompile needed).
"""

_COMPILE_EPILOG = """\
MODULE:FACTORY names a callable that returns the model (an nn.Module), e.g.
torchvision.models:resnet18 or mypkg.models:build_classifier. It is recorded in the bundle:
`trtrefit gate` uses it to rebuild the eager model and to re-export for the fallback path.

examples:
  trtrefit compile torchvision.models:resnet18 --input 1x3x224x224 -o resnet18.trtrefit
  trtrefit compile mypkg.models:build --input 1x3x64x64 --checkpoint base.pt --backend reference -o m.trtrefit
  trtrefit compile mypkg.models:two_inputs --input 1x3x32x32 --input 1x10 -o m.trtrefit

--backend auto uses TensorRT when a usable GPU engine can be built and run here, else the
reference backend (a CPU interpreter of the same TensorRT network: it checks the network and
the weight mapping, not TensorRT's kernels), and says which it picked.
"""

_GATE_EPILOG = """\
SAMPLES, the inputs the refitted engine and eager PyTorch are compared on:
  random:N[:SEED]   N random normal inputs of the engine's input shape(s) (seed 0 by default)
  FILE.pt           torch.save'd tensors, read with torch.load(weights_only=True): one tensor of
                    the input shape (one sample), a tensor with one more leading dimension (one
                    sample per entry), or a list of samples (each a tensor, or a list of tensors
                    for a model with several inputs)
  FILE.npy          a NumPy array, as for one tensor above (read without pickle)

checks, in order: the files are readable; the checkpoint fits the compiled architecture; no
NaN/Inf weight; each chosen path refits a copy of the engine and matches eager PyTorch on
every sample (max abs error <= atol * max(1, max|eager|) + rtol * |eager|); with both paths,
the cached and fallback mappings agree weight by weight. A failure names the culprit weight.

examples:
  trtrefit gate resnet18.trtrefit finetuned.pt --inputs random:4
  trtrefit gate m.trtrefit ckpt.pt --inputs samples.pt --paths cached --rtol 1e-3 --atol 1e-3
  trtrefit gate m.trtrefit ckpt.pt --inputs random:8:123 --report gate.json --markdown "$GITHUB_STEP_SUMMARY"
  trtrefit gate m.trtrefit ckpt.pt --inputs random:2 --model mypkg.models:build   # bundle without factory

exit codes: 0 every check passed; 1 a mismatch or a refused weight (NaN/Inf, overflow); 2 unusable
input (missing file, damaged bundle, checkpoint of another architecture: recompile needed).
"""

_AUDIT_EPILOG = """\
A and B are engine bundles (.trtrefit) or checkpoints; at least one must be a bundle.
  bundle vs bundle:      their current weights, weight by weight
  bundle vs checkpoint:  the checkpoint mapped through the bundle's weight map (the cached path)
                         vs the weights the bundle holds: "was this engine refitted with this?"

examples:
  trtrefit audit before.trtrefit after.trtrefit
  trtrefit audit deployed.trtrefit finetuned.pt --report audit.json

exit codes: 0 the weights agree; 1 they disagree (the report leads with the worst weight);
2 unusable input.
"""


class CliError(Exception):
    """A problem the user must fix; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_UNUSABLE):
        super().__init__(message)
        self.code = code


class Progress:
    """Step-by-step progress on stderr; silent when quiet."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.info(f"{what} ...")
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.info(f"{what}: failed after {time.perf_counter() - t0:.1f}s")
            raise
        self.info(f"{what}: done in {time.perf_counter() - t0:.2f}s")


# ----------------------------------------------------------------------------- helpers

def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' (or '1,3,224,224') -> (1, 3, 224, 224)."""
    parts = [p for p in re.split(r"[x,×]", text.strip().lower()) if p != ""]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape {text!r} must look like 1x3x224x224 (positive integers)")
    return shape


def _factory_spec(text: str) -> str:
    if ":" not in text or text.startswith(":") or text.endswith(":"):
        raise argparse.ArgumentTypeError(f"{text!r} must look like MODULE:FACTORY, e.g. torchvision.models:resnet18")
    return text


def _build_model(spec: str):
    import torch

    from .factory import load_factory

    try:
        model = load_factory(spec)()
    except ValueError as err:
        raise CliError(f"{err} (is the package importable from here? check PYTHONPATH)") from err
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _require_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise CliError(f"{what} {path!r}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{what} {path!r} is a directory, not a file")
    return path


def _is_bundle(path: str) -> bool:
    from .bundle import MAGIC

    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _load_bundle(path: str, progress: Progress):
    from .bundle import load
    from .errors import BundleError, RefitCoreError

    _require_file(path, "engine bundle")
    with progress.step(f"loading engine bundle {path}"):
        try:
            return load(path)
        except BundleError as err:
            raise CliError(f"unusable engine bundle: {err}\n(save the engine again, or recompile it with "
                           f"`{PROG} compile`)") from err
        except (RefitCoreError, OSError, ValueError) as err:
            raise CliError(f"cannot load engine bundle {path!r}: {err}") from err


def _load_checkpoint(path: str, progress: Progress) -> dict:
    from .errors import WeightMappingError
    from .mapping import load_checkpoint

    _require_file(path, "checkpoint")
    with progress.step(f"loading checkpoint {path}"):
        try:
            return load_checkpoint(path)
        except WeightMappingError as err:
            raise CliError(f"unusable checkpoint: {err}") from err


def _nonfinite_problems(state: dict, weight_map) -> list[str]:
    """Every floating-point tensor with NaN/Inf, naming the engine weights it feeds."""
    import torch

    problems = []
    for key, t in state.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        first = [int(i) for i in torch.nonzero(~finite)[0]]
        consumers = weight_map.consumers(key)
        fed = (f"feeds engine weight(s) {', '.join(consumers[:3])}" + (f" (+{len(consumers) - 3} more)"
               if len(consumers) > 3 else "")) if consumers else "not read by the engine"
        problems.append(f"{key!r}: {nan} NaN and {inf} Inf value(s) of {t.numel()}, first at {first}; {fed}")
    return problems


def load_samples(spec: str, io) -> list[tuple]:
    """Sample inputs from ``random:N[:SEED]``, a ``.pt`` file (weights-only) or a ``.npy`` file,
    checked against the engine's input shapes and dtypes (``io``: an :class:`refitcore.IOSpec`)."""
    import numpy as np
    import torch

    shapes = [tuple(s) for s in io.input_shapes]
    dtypes = [getattr(torch, d) for d in io.input_dtypes]
    if spec.startswith("random:"):
        fields = spec.split(":")[1:]
        try:
            n = int(fields[0])
            seed = int(fields[1]) if len(fields) > 1 else 0
            if n <= 0 or len(fields) > 2:
                raise ValueError
        except (ValueError, IndexError):
            raise CliError(f"--inputs {spec!r}: expected random:N or random:N:SEED with N >= 1") from None
        g = torch.Generator().manual_seed(seed)
        samples = []
        for _ in range(n):
            sample = []
            for shape, dtype in zip(shapes, dtypes):
                if not dtype.is_floating_point:
                    raise CliError(f"--inputs random: the engine has a {dtype} input; give a samples file instead")
                sample.append(torch.randn(shape, generator=g).to(dtype))
            samples.append(tuple(sample))
        return samples
    _require_file(spec, "samples file")
    try:
        if spec.endswith(".npy"):
            obj: Any = torch.from_numpy(np.load(spec, allow_pickle=False))
        else:
            obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CliError(f"samples file {spec!r} cannot be read (expected a torch.save'd tensor or list of "
                       f"tensors, or a .npy array): {type(err).__name__}: {err}") from err
    if isinstance(obj, torch.Tensor):
        if len(shapes) != 1:
            raise CliError(f"samples file {spec!r} holds one tensor but the engine has {len(shapes)} inputs; "
                           f"save a list of samples, each a list of {len(shapes)} tensors")
        if tuple(obj.shape) == shapes[0]:
            raw = [(obj,)]
        elif obj.dim() == len(shapes[0]) + 1 and tuple(obj.shape[1:]) == shapes[0]:
            raw = [(t,) for t in obj]
        else:
            raise CliError(f"samples file {spec!r}: tensor of shape {list(obj.shape)} where the engine takes "
                           f"{list(shapes[0])} (or N x {list(shapes[0])} for N samples); recompile for this "
                           f"shape or give samples of the compiled shape")
    elif isinstance(obj, (list, tuple)) and obj:
        raw = [(s,) if isinstance(s, torch.Tensor) else tuple(s) for s in obj]
    else:
        raise CliError(f"samples file {spec!r}: expected a tensor or a non-empty list of samples, "
                       f"got {type(obj).__name__}")
    samples = []
    for i, sample in enumerate(raw):
        if len(sample) != len(shapes) or not all(isinstance(t, torch.Tensor) for t in sample):
            raise CliError(f"samples file {spec!r}: sample {i} has {len(sample)} entries, the engine takes "
                           f"{len(shapes)} tensor input(s)")
        fixed = []
        for j, (t, shape, dtype) in enumerate(zip(sample, shapes, dtypes)):
            if tuple(t.shape) != shape:
                raise CliError(f"samples file {spec!r}: sample {i} input {j} has shape {list(t.shape)}, the engine "
                               f"was compiled for {list(shape)}")
            fixed.append(t.to(dtype))
        samples.append(tuple(fixed))
    return samples


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _write_text(path: str, text: str, progress: Progress, what: str) -> None:
    mode = "a" if path == os.environ.get("GITHUB_STEP_SUMMARY") else "w"
    with open(path, mode, encoding="utf-8") as f:
        f.write(text)
    progress.info(f"wrote {what} to {path}")


# ----------------------------------------------------------------------------- compile

def _cmd_compile(args, progress: Progress) -> int:
    import torch

    import refitcore

    model = _build_model(args.factory)
    if args.checkpoint:
        state = _load_checkpoint(_require_file(args.checkpoint, "checkpoint"), progress)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CliError(f"checkpoint {args.checkpoint!r} does not fit {args.factory}: {err}") from err
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=g).to(dtype) for s in args.input)
    shapes = ", ".join("x".join(map(str, s)) for s in args.input)
    with progress.step(f"compiling {args.factory} for input {shapes} (export, conversion, {args.backend} build)"):
        try:
            engine = refitcore.compile(model, inputs, backend=args.backend, model_factory=args.factory)
        except refitcore.UnsupportedOperatorError as err:
            raise CliError(str(err)) from err
        except refitcore.BackendUnavailableError as err:
            raise CliError(f"{err}\n(try --backend reference)") from err
    with progress.step(f"saving {args.output}"):
        engine.save(args.output)
    print(f"wrote {args.output}: backend {engine.backend} ({engine.backend_reason}), "
          f"{len(engine.weight_names)} refittable weights, inputs {[list(s) for s in engine.io.input_shapes]}, "
          f"factory {args.factory}")
    if engine.note:
        print(f"note: {engine.note}")
    return EXIT_OK


# ----------------------------------------------------------------------------- gate

def _gate_markdown(report: dict) -> str:
    verdict = {"pass": "PASS ✅", "fail": "FAIL ❌", "error": "ERROR ⚠️"}[report["verdict"]]
    lines = [f"### trtrefit gate: {verdict}", ""]
    lines.append(f"- bundle: `{report['bundle']}`")
    lines.append(f"- checkpoint: `{report['checkpoint']}`")
    if report.get("backend"):
        lines.append(f"- backend: {report['backend']}" + (f" ({report['backend_note']})"
                                                           if report.get("backend_note") else ""))
    if report.get("samples"):
        lines.append(f"- samples: {report['samples']}; rtol={report['rtol']:g}, atol={report['atol']:g} "
                     f"(scaled by max(1, max|eager|))")
    lines.append("")
    if report["problems"]:
        lines += ["**Problems**", ""] + [f"- {p}" for p in report["problems"]] + [""]
    if report["paths"]:
        lines += ["| path | max abs error | verdict | culprit weight | mapping time | apply time |",
                  "|---|---|---|---|---|---|"]
        for name, p in report["paths"].items():
            culprit = f"`{p['culprit']}`" if p.get("culprit") else "-"
            t = p.get("timings", {})
            lines.append(f"| {name} | {_fmt(p.get('max_abs'))} | {'pass' if p['ok'] else '**FAIL**'} | {culprit} | "
                         f"{t.get('mapping_s', 0) * 1e3:.1f} ms | {t.get('apply_s', 0) * 1e3:.1f} ms |")
        lines.append("")
        for name, p in report["paths"].items():
            checks = p.get("checks") or []
            if not checks:
                continue
            lines += [f"<details><summary>{name} path: per-sample errors</summary>", "",
                      "| sample | output | max abs error | max rel error | norm-rel error | verdict |",
                      "|---|---|---|---|---|---|"]
            for s, sample in enumerate(checks):
                for c in sample:
                    lines.append(f"| {s} | {c['index']} | {_fmt(c['max_abs'])} | {_fmt(c['max_rel'])} | "
                                 f"{_fmt(c['norm_rel'])} | {'pass' if c['ok'] else '**FAIL**'} |")
            lines += ["", "</details>", ""]
    audit = report.get("audit")
    if audit is not None:
        if audit["ok"]:
            lines.append("Audit cached vs fallback: **agree** on every weight.")
        else:
            worst = audit.get("worst") or {}
            lines.append(f"Audit cached vs fallback: **{len(audit['failures'])} weight(s) disagree**; worst "
                         f"`{worst.get('name')}` ({worst.get('status')}, max abs diff {_fmt(worst.get('max_abs'))}).")
        lines.append("")
    return "\n".join(lines) + "\n"


def _path_entry(verdict, culprit: str | None, timings: dict, note: str = "") -> dict:
    return {"ok": bool(verdict.ok), "max_abs": verdict.max_abs,
            "culprit": culprit, "timings": timings, "checks": verdict.to_json()["checks"], "note": note,
            "report": str(verdict)}


def _run_gate(args, progress: Progress, report: dict) -> int:
    import refitcore
    from .errors import ArchitectureMismatchError, RefitError, WeightMappingError

    engine = _load_bundle(args.bundle, progress)
    report["backend"], report["backend_note"] = engine.backend, engine.note
    state = _load_checkpoint(args.checkpoint, progress)
    factory = args.model or engine.model_factory
    if not factory:
        raise CliError(f"{args.bundle!r} records no model factory; pass --model MODULE:FACTORY (the callable that "
                       f"builds the model) so the eager model can be rebuilt")
    engine.model_factory = factory  # the fallback path re-exports from it (a loaded engine has no program)
    report["model_factory"] = factory
    samples = load_samples(args.inputs, engine.io)
    report["samples"] = f"{len(samples)} ({args.inputs})"

    # The checkpoint must fit the compiled architecture before anything else is judged.
    from .mapping import check_state_dict

    try:
        check_state_dict(engine.weight_map, state)
    except ArchitectureMismatchError as err:
        raise CliError(f"checkpoint {args.checkpoint!r} is for another architecture than {args.bundle!r}: {err}")
    except WeightMappingError:
        pass  # dtype problems and the like are judged below, per weight, with the NaN check
    extra = [k for k in state if engine.state_keys and k not in engine.state_keys]
    if extra:
        raise CliError(f"checkpoint {args.checkpoint!r} has {len(extra)} key(s) the compiled model lacks "
                       f"({extra[:5]}): it is for another architecture; recompile needed")
    bad = _nonfinite_problems(state, engine.weight_map)
    if bad:
        report["problems"] += [f"refused: non-finite weight {p}" for p in bad]
        raise CliError("refusing a checkpoint with NaN/Inf weights:\n" + "\n".join(f"  - {p}" for p in bad),
                       EXIT_MISMATCH)

    with progress.step(f"building the eager reference model from {factory}"):
        reference = _build_model(factory)
        own = reference.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise CliError(f"checkpoint {args.checkpoint!r} lacks {missing[:5]} that {factory} needs: another "
                           f"architecture; recompile needed")
        try:
            reference.load_state_dict({k: state[k] for k in own}, strict=True)
        except RuntimeError as err:
            raise CliError(f"checkpoint {args.checkpoint!r} does not fit {factory}: {err}; recompile needed") from err

    paths = ["cached", "fallback"] if args.paths == "both" else [p.strip() for p in args.paths.split(",")]
    mappings: dict[str, dict] = {}
    mapping_s: dict[str, float] = {}

    def mapping_for(path: str) -> dict:
        if path not in mappings:
            what = ("mapping the checkpoint through the cached weight map" if path == "cached" else
                    "fallback: re-exporting and converting with the new weights")
            t0 = time.perf_counter()
            with progress.step(what):
                if path == "cached":
                    mappings[path] = refitcore.cached_mapping(engine.weight_map, state)
                else:
                    mappings[path] = refitcore.fallback_mapping(engine, state)
            mapping_s[path] = time.perf_counter() - t0
        return mappings[path]

    try:
        for path in paths:
            mapping_for(path)
        audit = None
        if len(paths) == 2:
            audit = refitcore.audit(mappings["cached"], mappings["fallback"], a_label="cached", b_label="fallback")
            report["audit"] = audit.to_json()
        for path in paths:
            with progress.step(f"refitting a copy of the engine through the {path} path and comparing with eager "
                               f"on {len(samples)} sample(s)"):
                t0 = time.perf_counter()
                refitted = refitcore.apply_mapping(engine, mappings[path])
                apply_s = time.perf_counter() - t0
                verdict = refitcore.verify(refitted, reference, samples, rtol=args.rtol, atol=args.atol)
            culprit, note = None, ""
            if not verdict.ok:
                other = "fallback" if path == "cached" else "cached"
                if audit is None:
                    progress.info(f"the {path} path disagrees with eager; computing the {other} mapping to find "
                                  f"the culprit weight")
                    mapping_for(other)
                    a, b = mappings["cached"], mappings["fallback"]
                    audit = refitcore.audit(a, b, a_label="cached", b_label="fallback")
                    report["audit"] = audit.to_json()
                first = audit.first_failure(engine.weight_names)
                if first is not None:
                    culprit = first.name
                    note = f"first engine weight where cached and fallback disagree: {first}"
                else:
                    note = ("cached and fallback agree on every weight: the difference comes from the network or "
                            f"the tolerance (worst: {verdict.worst})")
            report["paths"][path] = _path_entry(verdict, culprit, {"mapping_s": mapping_s.get(path, 0.0),
                                                                   "apply_s": apply_s}, note)
            if not verdict.ok:
                report["problems"].append(f"{path} path: refitted engine disagrees with eager "
                                          f"(max abs error {_fmt(verdict.max_abs)})"
                                          + (f"; culprit weight {culprit!r}" if culprit else "")
                                          + (f"; {note}" if note and not culprit else ""))
    except ArchitectureMismatchError as err:
        raise CliError(f"{err}") from err
    except (WeightMappingError, RefitError) as err:
        report["problems"].append(f"refused: {err}")
        raise CliError(str(err), EXIT_MISMATCH) from err

    if report.get("audit") and not report["audit"]["ok"]:
        failures = report["audit"]["failures"]
        report["problems"].append(f"audit: cached and fallback mappings disagree on {len(failures)} weight(s), "
                                  f"first {failures[0]['name']!r}")
    ok = not report["problems"]
    report["verdict"] = "pass" if ok else "fail"
    return EXIT_OK if ok else EXIT_MISMATCH


def _print_gate(report: dict) -> None:
    head = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}[report["verdict"]]
    print(f"trtrefit gate: {head}: {report['checkpoint']} on {report['bundle']}"
          + (f" (backend {report['backend']})" if report.get("backend") else ""))
    for name, p in report["paths"].items():
        culprit = f", culprit weight {p['culprit']!r}" if p.get("culprit") else ""
        print(f"  {name:8s} {'pass' if p['ok'] else 'FAIL'}: max abs error {_fmt(p['max_abs'])}{culprit}; "
              f"mapping {p['timings']['mapping_s'] * 1e3:.1f} ms, apply {p['timings']['apply_s'] * 1e3:.1f} ms")
        if not p["ok"]:
            print("    " + p["report"].replace("\n", "\n    "))
            if p.get("note"):
                print(f"    {p['note']}")
    audit = report.get("audit")
    if audit is not None:
        state = "agree on every weight" if audit["ok"] else f"DISAGREE on {len(audit['failures'])} weight(s)"
        print(f"  audit cached vs fallback: {state}")
        for f in audit["failures"][:10]:
            print(f"    - {f['name']}: {f['status']} max abs diff {_fmt(f['max_abs'])} {f.get('detail') or ''}")
    for p in report["problems"]:
        print(f"  problem: {p}")


def _cmd_gate(args, progress: Progress) -> int:
    report: dict[str, Any] = {"tool": PROG, "verdict": "error", "bundle": args.bundle, "checkpoint": args.checkpoint,
                              "rtol": args.rtol, "atol": args.atol, "paths": {}, "audit": None, "problems": []}
    try:
        code = _run_gate(args, progress, report)
    except CliError as err:
        code = err.code
        report["verdict"] = "fail" if code == EXIT_MISMATCH else "error"
        if str(err) not in report["problems"] and not (code == EXIT_MISMATCH and report["problems"]):
            report["problems"].append(str(err))
        report["exit_code"] = code
        _emit_gate(args, report, progress)
        first = str(err).splitlines()[0]
        print(f"{PROG} gate: {'FAIL' if code == EXIT_MISMATCH else 'ERROR'} (exit {code}): {first}", file=sys.stderr)
        return code
    report["exit_code"] = code
    _emit_gate(args, report, progress)
    return code


def _emit_gate(args, report: dict, progress: Progress) -> None:
    _print_gate(report)
    if args.report:
        _write_text(args.report, json.dumps(report, indent=2, default=str) + "\n", progress, "JSON report")
    if args.markdown:
        _write_text(args.markdown, _gate_markdown(report), progress, "Markdown summary")


# ----------------------------------------------------------------------------- audit

def _cmd_audit(args, progress: Progress) -> int:
    import refitcore
    from .errors import ArchitectureMismatchError, WeightMappingError

    for p in (args.a, args.b):
        _require_file(p, "input")
    kinds = [_is_bundle(p) for p in (args.a, args.b)]
    if not any(kinds):
        raise CliError(f"neither {args.a!r} nor {args.b!r} is an engine bundle; give at least one .trtrefit file "
                       f"(compare two checkpoints with torch directly)")
    if all(kinds):
        a, b = _load_bundle(args.a, progress), _load_bundle(args.b, progress)
        notes = []
        if a.fingerprint != b.fingerprint:
            notes.append("the two bundles were compiled from different graphs")
        with progress.step("comparing the weights the two bundles hold"):
            result = refitcore.audit(a.current_weights(), b.current_weights(), rtol=args.rtol, atol=args.atol,
                                     a_label=args.a, b_label=args.b)
    else:
        bundle_path, ckpt_path = (args.a, args.b) if kinds[0] else (args.b, args.a)
        engine = _load_bundle(bundle_path, progress)
        state = _load_checkpoint(ckpt_path, progress)
        notes = []
        try:
            with progress.step("mapping the checkpoint through the bundle's weight map (cached path)"):
                mapped = refitcore.cached_mapping(engine.weight_map, state)
        except ArchitectureMismatchError as err:
            raise CliError(f"checkpoint {ckpt_path!r} is for another architecture than {bundle_path!r}: {err}") from err
        except WeightMappingError as err:
            raise CliError(f"checkpoint {ckpt_path!r} cannot be mapped onto {bundle_path!r}: {err}",
                           EXIT_MISMATCH) from err
        result = refitcore.audit(mapped, engine.current_weights(), rtol=args.rtol, atol=args.atol,
                                 a_label=f"{ckpt_path} (mapped)", b_label=bundle_path)
    print(str(result))
    for n in notes:
        print(f"note: {n}")
    if args.report:
        data = result.to_json() | {"notes": notes}
        _write_text(args.report, json.dumps(data, indent=2, default=str) + "\n", progress, "JSON report")
    return EXIT_OK if result.ok and not notes else EXIT_MISMATCH


# ----------------------------------------------------------------------------- doctor

def _cmd_doctor(args, progress: Progress) -> int:
    try:
        from . import doctor
    except ImportError as err:
        if getattr(err, "name", None) not in ("refitcore.doctor", None):
            raise
        print(f"{PROG} doctor: this refitcore has no doctor module (refitcore.doctor: {err}); "
              f"upgrade pytest-trtrefit to get environment diagnostics", file=sys.stderr)
        return EXIT_UNUSABLE
    return int(doctor.main(list(args.doctor_args or [])) or 0)


# ----------------------------------------------------------------------------- parser

def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def _paths(text: str) -> str:
    if text == "both":
        return text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(p not in ("cached", "fallback") for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"--paths {text!r}: choose cached, fallback, cached,fallback or both")
    return "both" if len(parts) == 2 else parts[0]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .verify import DEFAULT_ATOL, DEFAULT_RTOL

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=_MAIN_HELP, epilog=_MAIN_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", parents=[common], formatter_class=fmt, epilog=_COMPILE_EPILOG,
                       help="compile a model factory into a refittable engine bundle",
                       description="Export MODULE:FACTORY's model, convert it to a refittable TensorRT network, "
                                   "build it, and save the bundle (plan, weight map, weights, factory).")
    c.add_argument("factory", metavar="MODULE:FACTORY", type=_factory_spec,
                   help="callable returning the nn.Module, e.g. torchvision.models:resnet18")
    c.add_argument("--input", action="append", required=True, type=parse_shape, metavar="SHAPE",
                   help="input shape like 1x3x224x224; repeat for each input of a multi-input model")
    c.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="input dtype (default: float32)")
    c.add_argument("--backend", default="auto", choices=("auto", "reference", "tensorrt"),
                   help="engine backend (default: auto = tensorrt when usable here, else reference)")
    c.add_argument("--checkpoint", metavar="CKPT", help="load these weights into the model before compiling")
    c.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="where to write the engine bundle")
    c.set_defaults(func=_cmd_compile)

    g = sub.add_parser("gate", parents=[common], formatter_class=fmt, epilog=_GATE_EPILOG,
                       help="refuse a checkpoint whose refit does not reproduce eager PyTorch",
                       description="Refit a copy of the engine with CHECKPOINT through the chosen path(s), compare "
                                   "with eager PyTorch on SAMPLES, audit cached vs fallback, refuse NaN/Inf weights.")
    g.add_argument("bundle", metavar="BUNDLE", help="engine bundle written by `trtrefit compile`")
    g.add_argument("checkpoint", metavar="CHECKPOINT", help="state_dict checkpoint (torch.save; read weights-only)")
    g.add_argument("--inputs", required=True, metavar="SAMPLES", help="random:N[:SEED], FILE.pt or FILE.npy "
                   "(see below)")
    g.add_argument("--paths", default="both", type=_paths, metavar="PATHS",
                   help="cached, fallback, or both (= cached,fallback; default: both, which also audits them)")
    g.add_argument("--rtol", type=_positive_float, default=DEFAULT_RTOL,
                   help=f"relative tolerance vs eager (default: {DEFAULT_RTOL:g})")
    g.add_argument("--atol", type=_positive_float, default=DEFAULT_ATOL,
                   help=f"absolute tolerance vs eager, scaled by max(1, max|eager|) (default: {DEFAULT_ATOL:g})")
    g.add_argument("--model", type=_factory_spec, metavar="MODULE:FACTORY",
                   help="model factory to rebuild the eager model (default: the one recorded in the bundle)")
    g.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    g.add_argument("--markdown", metavar="FILE.md", help="write a Markdown summary for CI job logs "
                   "(appended when FILE is $GITHUB_STEP_SUMMARY)")
    g.set_defaults(func=_cmd_gate)

    a = sub.add_parser("audit", parents=[common], formatter_class=fmt, epilog=_AUDIT_EPILOG,
                       help="compare the weights of two bundles, or of a bundle and a checkpoint",
                       description="Compare engine weights weight by weight: missing, extra, shape/dtype, max abs "
                                   "and relative difference; the report leads with the worst weight.")
    a.add_argument("a", metavar="A", help="engine bundle or checkpoint")
    a.add_argument("b", metavar="B", help="engine bundle or checkpoint")
    a.add_argument("--rtol", type=_positive_float, default=1e-5,
                   help="relative tolerance, of each weight's max |value| (default: 1e-05)")
    a.add_argument("--atol", type=_positive_float, default=1e-7, help="absolute tolerance (default: 1e-07)")
    a.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    a.set_defaults(func=_cmd_audit)

    d = sub.add_parser("doctor", parents=[common], formatter_class=fmt,
                       help="what this machine can do: GPU, TensorRT flavour, usable backends",
                       description="Diagnose the environment (delegates to refitcore.doctor).",
                       epilog="examples:\n  trtrefit doctor\n  trtrefit doctor --json --require-tensorrt\n\n"
                              "other arguments are passed on to refitcore.doctor.")
    d.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trtrefit`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "doctor":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.doctor_args = extra  # `trtrefit doctor ARGS...`: passed on to refitcore.doctor
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_UNUSABLE
    progress = Progress(quiet=args.quiet)
    logger = logging.getLogger("refitcore")
    level, handler = logger.level, None
    if not args.quiet:
        # refitcore reports its choices (e.g. the backend 'auto' picked) through logging.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    else:
        logger.setLevel(logging.ERROR)
    try:
        return args.func(args, progress)
    except CliError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
