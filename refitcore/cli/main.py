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
import os
import sys
import time
from collections.abc import Iterator, Sequence

from refitcore.capture.shapes import cli_inputs, format_range, input_shape_arg
from refitcore.cli.text import AUDIT_EPILOG, COMPILE_EPILOG, DOCTOR_FLAGS, GATE_EPILOG, MAIN_EPILOG, MAIN_HELP
from refitcore.gating.files import EXIT_MISMATCH, EXIT_OK, EXIT_UNUSABLE, InputError as CliError, open_checkpoint
from refitcore.gating.samples import load_samples
from refitcore.options import (
    PRECISION_TOLERANCES,
    TOOL,
    parse_backend,
    parse_factory,
    parse_paths,
    parse_precision,
    parse_shape,
    parse_tolerance,
)

__all__ = ["main", "build_parser", "parse_shape", "load_samples", "EXIT_OK", "EXIT_MISMATCH", "EXIT_UNUSABLE"]

PROG = TOOL


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


def _out(text: str) -> None:
    """Print to stdout; a reader that went away (``trtrefit gate ... | head``) ends output quietly:
    stdout is pointed at devnull, as Python's signal docs recommend, and the exit code stands."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _writable(path: str | None, what: str) -> None:
    """Fail before the work starts when ``path`` cannot be written: a directory, or no such folder."""
    if path is None:
        return
    if os.path.isdir(path):
        raise CliError(f"{what} {path!r} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{what} {path!r}: no such directory {folder!r}; create it first")


def _write_text(path: str, text: str, progress: Progress, what: str) -> None:
    mode = "a" if path == os.environ.get("GITHUB_STEP_SUMMARY") else "w"
    with open(path, mode, encoding="utf-8") as f:
        f.write(text)
    progress.info(f"wrote {what} to {path}")


def _cmd_compile(args, progress: Progress) -> int:
    import torch

    from refitcore.capture.eager import eager_model, skeleton
    from refitcore.compiler.native import compile as compile_model
    from refitcore.errors import BackendUnavailableError, UnsupportedOperatorError

    _writable(args.output, "output")
    try:
        model = skeleton(args.factory) if args.checkpoint else eager_model({}, model=args.factory, keep_missing=True)
    except (ValueError, TypeError) as err:
        raise CliError(f"{err} (is the package importable from here? check PYTHONPATH)") from err
    if args.checkpoint:
        state = open_checkpoint(args.checkpoint, progress)
        own = model.state_dict()
        extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
        if extra or missing:
            raise CliError(f"checkpoint {args.checkpoint!r} does not fit {args.factory}: " + "; ".join(
                f"{what} keys {keys[:5]}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                for what, keys in (("unexpected", extra), ("missing", missing)) if keys))
        # The checkpoint is mapped (refitcore.refitting.checkpoints) and the model is the CLI's own:
        # built on the meta device and given the mapped tensors themselves where their dtypes are the
        # model's, so compile holds the file's pages and no copy (with --strip-engine-weights, nothing else).
        share = all(state[k].dtype == v.dtype for k, v in own.items())
        del own, model
        try:
            model = eager_model(state, model=args.factory, share=share)
        except (ValueError, TypeError, RuntimeError) as err:
            raise CliError(f"checkpoint {args.checkpoint!r} does not fit {args.factory}: {err}") from err
    g = torch.Generator().manual_seed(0)
    example_shapes, dynamic_shapes = cli_inputs(args.input)   # the example is each range's opt
    inputs = tuple(torch.randn(s, generator=g) for s in example_shapes)
    shapes = ", ".join(format_range(r) for r in args.input)
    try:  # a shape the model rejects is a usage error: say so before exporting
        with torch.no_grad():
            model(*inputs)
    except Exception as err:  # whatever the model raises, the input does not fit it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CliError(f"{args.factory} rejects input shape(s) {shapes}: {first}") from err
    with progress.step(f"compiling {args.factory} for input {shapes} (export, conversion, {args.backend} build)"):
        try:
            # A cache hit is checked against eager PyTorch on the example inputs before it is saved.
            engine = compile_model(model, inputs, backend=args.backend, precision=parse_precision(args.dtype),
                                   model_factory=args.factory, dynamic_shapes=dynamic_shapes,
                                   cache=args.cache, verify_inputs=[inputs] if args.cache else None,
                                   strip_engine_weights=args.strip_engine_weights, progress=progress)
        except UnsupportedOperatorError as err:
            raise CliError(str(err)) from err
        except BackendUnavailableError as err:
            raise CliError(f"{err}\n(try --backend reference)") from err
    with progress.step(f"saving {args.output}"):
        engine.save(args.output)
    stripped = " (stripped: refit before running)" if engine.weightless else ""
    _out(f"wrote {args.output}: backend {engine.backend} ({engine.backend_reason}), "
         f"{len(engine.weight_names)} refittable weights{stripped}, "
         f"inputs {[list(s) for s in engine.io.input_shapes]}, "
         f"factory {args.factory}" + {True: "; engine cache hit (loaded and refitted)",
                                      False: "; engine cache miss (stored)", None: ""}[engine.cache_hit]
         + f"\n{engine.summary()}" + (f"\nnote: {engine.note}" if engine.note else ""))
    return EXIT_OK


def _cmd_gate(args, progress: Progress) -> int:
    from refitcore.gating.gate import gate

    _writable(args.report, "--report")
    _writable(args.markdown, "--markdown")
    if args.trust_factory and not args.model:
        progress.info("warning: --trust-factory imports and runs the model factory the bundle names; use it only "
                      "for bundles you trust")
    report = gate(args.bundle, args.checkpoint, args.inputs, paths=args.paths, rtol=args.rtol, atol=args.atol,
                  model=args.model, trust_factory=args.trust_factory, progress=progress)
    _out(str(report))
    if args.report:
        _write_text(args.report, json.dumps(report.to_json(), indent=2, default=str) + "\n", progress, "JSON report")
    if args.markdown:
        _write_text(args.markdown, report.to_markdown(), progress, "Markdown summary")
    if report.error is not None:
        code = report.exit_code
        print(f"{PROG} gate: {'FAIL' if code == EXIT_MISMATCH else 'ERROR'} (exit {code}): "
              f"{report.error.splitlines()[0]}", file=sys.stderr)
    return report.exit_code


def _cmd_audit(args, progress: Progress) -> int:
    from refitcore.gating.files import compare_files

    _writable(args.report, "--report")
    result, notes = compare_files(args.a, args.b, rtol=args.rtol, atol=args.atol, progress=progress)
    _out("\n".join([str(result)] + [f"note: {n}" for n in notes]))
    if args.report:
        data = result.to_json() | {"notes": notes}
        _write_text(args.report, json.dumps(data, indent=2, default=str) + "\n", progress, "JSON report")
    return EXIT_OK if result.ok and not notes else EXIT_MISMATCH


def _cmd_doctor(args, progress: Progress) -> int:
    try:
        from refitcore.cli import doctor
    except ImportError as err:
        if getattr(err, "name", None) not in ("refitcore.cli.doctor", None):
            raise
        print(f"{PROG} doctor: this refitcore has no doctor module (refitcore.cli.doctor: {err}); "
              f"upgrade pytest-trtrefit to get environment diagnostics", file=sys.stderr)
        return EXIT_UNUSABLE
    given = [flag for flag, _ in DOCTOR_FLAGS if getattr(args, f"doctor_{flag.lstrip('-').replace('-', '_')}", False)]
    return int(doctor.main(given + list(args.doctor_args or [])) or 0)


def build_parser() -> argparse.ArgumentParser:
    from refitcore._version import __version__
    from refitcore.backends import BACKENDS
    from refitcore.refitting.verify import DEFAULT_ATOL, DEFAULT_RTOL

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=MAIN_HELP, epilog=MAIN_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], formatter_class=fmt, epilog=epilog, help=summary,
                           description=description)
        p.set_defaults(func=func)
        return p

    def operands(p: argparse.ArgumentParser, *specs: tuple[str, str, str]) -> None:
        for dest, metavar, text in specs:      # positional arguments: (dest, METAVAR, help)
            p.add_argument(dest, metavar=metavar, help=text)

    def tolerances(p: argparse.ArgumentParser, rtol: float, atol: float, rtol_of: str, atol_of: str,
                   per_precision: bool = False) -> None:
        """``per_precision``: the default is None, resolved from the engine's precision by the command
        (:func:`refitcore.options.tolerances_for`); the help lists float32's and the others'."""
        for flag, value, of, what in (("--rtol", rtol, rtol_of, "relative"), ("--atol", atol, atol_of, "absolute")):
            i = 0 if flag == "--rtol" else 1
            others = (f"; fp16 and bf16 engines: {PRECISION_TOLERANCES['fp16'][i]:g} and "
                      f"{PRECISION_TOLERANCES['bf16'][i]:g}" if per_precision else "")
            p.add_argument(flag, type=parse_tolerance, default=None if per_precision else value,
                           help=f"{what} tolerance{of} (default: {value:g}{others})")

    c = command("compile", _cmd_compile, "compile a model factory into a refittable engine bundle",
                "Export MODULE:FACTORY's model, convert it to a refittable TensorRT network, build it, and save "
                "the bundle (plan, weight map, weights, factory).", COMPILE_EPILOG)
    c.add_argument("factory", metavar="MODULE:FACTORY", type=parse_factory,
                   help="callable returning the nn.Module, e.g. torchvision.models:resnet18")
    c.add_argument("--input", action="append", required=True, type=input_shape_arg, metavar="SHAPE",
                   help="input shape like 1x3x224x224, or with ranges: 1-8x3x64x64 (dim 0 from 1 to 8, "
                        "tuned for 1) or 1-4-8x3x64x64 (min-opt-max); repeat for each input of a multi-input "
                        "model")
    c.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="engine precision (compile's precision=fp32, fp16 or bf16); the model and its example "
                        "inputs keep their own dtype (default: float32)")
    c.add_argument("--backend", default="auto", type=parse_backend, metavar="{" + ",".join(BACKENDS) + "}",
                   help="engine backend (default: auto = tensorrt when usable here, else reference)")
    c.add_argument("--checkpoint", metavar="CKPT", help="load these weights into the model before compiling")
    c.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="where to write the engine bundle")
    c.add_argument("--strip-engine-weights", action="store_true",
                   help="save the bundle without its refittable weights (TensorRT's weight-stripped plan): "
                        "compile holds one copy of the weights, and `trtrefit gate` refits every weight anyway")
    c.add_argument("--cache", metavar="DIR", help="engine cache directory: on a hit, load the engine and refit the "
                   "model's weights instead of exporting and building, after checking it against eager PyTorch on the "
                   "example input (default: no cache)")

    g = command("gate", _cmd_gate, "refuse a checkpoint whose refit does not reproduce eager PyTorch",
                "Refit a copy of the engine with CHECKPOINT through the chosen path(s), compare with eager "
                "PyTorch on SAMPLES, audit cached vs fallback, refuse NaN/Inf weights.", GATE_EPILOG)
    operands(g, ("bundle", "BUNDLE", "engine bundle written by `trtrefit compile`"),
             ("checkpoint", "CHECKPOINT", "state_dict checkpoint (torch.save; read weights-only)"))
    g.add_argument("--inputs", required=True, metavar="SAMPLES", help="random:N[:SEED], FILE.pt or FILE.npy "
                   "(see below)")
    g.add_argument("--paths", default=("cached", "fallback"), type=parse_paths, metavar="PATHS",
                   help="cached, fallback, or both (= cached,fallback; default: both, which also audits them)")
    tolerances(g, DEFAULT_RTOL, DEFAULT_ATOL, " vs eager", " vs eager, scaled by max(1, max|eager|)",
               per_precision=True)
    g.add_argument("--model", type=parse_factory, metavar="MODULE:FACTORY",
                   help="model factory to rebuild the eager model (the bundle's recorded one needs --trust-factory)")
    g.add_argument("--trust-factory", action="store_true",
                   help="import and run the model factory the bundle records (only for bundles you trust)")
    g.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    g.add_argument("--markdown", metavar="FILE.md", help="write a Markdown summary for CI job logs "
                   "(appended when FILE is $GITHUB_STEP_SUMMARY)")

    a = command("audit", _cmd_audit, "compare the weights of two bundles, or of a bundle and a checkpoint",
                "Compare engine weights weight by weight: missing, extra, shape/dtype, max abs and relative "
                "difference; the report leads with the worst weight.", AUDIT_EPILOG)
    operands(a, ("a", "A", "engine bundle or checkpoint"), ("b", "B", "engine bundle or checkpoint"))
    tolerances(a, 1e-5, 1e-7, ", of each weight's max |value|", "")
    a.add_argument("--report", metavar="FILE.json", help="write a JSON report")

    d = command("doctor", _cmd_doctor, "what this machine can do: GPU, TensorRT flavour, usable backends",
                "Diagnose the environment (delegates to refitcore.cli.doctor).",
                "examples:\n  trtrefit doctor\n  trtrefit doctor --json --require-tensorrt\n\n"
                "other arguments are passed on to refitcore.cli.doctor.")
    for flag, text in DOCTOR_FLAGS:
        d.add_argument(flag, action="store_true", dest=f"doctor_{flag.lstrip('-').replace('-', '_')}", help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trtrefit`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "doctor":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.doctor_args = extra  # `trtrefit doctor ARGS...`: passed on to refitcore.cli.doctor
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
