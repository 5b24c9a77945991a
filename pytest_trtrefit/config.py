"""Options of ``pytest --trt-refit``: one table, parsers that list valid values, ini mirrors.

Every option exists twice: on the command line (``--trt-refit-examples 5``) and as an ini key
(``trt_refit_examples = 5``). The command line wins, then the ini file, then the default.
The value parsers are ``refitcore.options``'s (shared with the ``trtrefit`` CLI). Nothing here
imports torch or TensorRT: of refitcore, only its lazy package root and the standard-library
``refitcore.options`` load.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Callable
from typing import Any

from refitcore import options as _options  # standard library only (refitcore/__init__ is lazy)

__all__ = ["RefitConfig", "OPTIONS", "Option", "add_options", "resolve", "parse_backend", "parse_paths",
           "parse_examples", "parse_tolerance", "parse_seed", "parse_baseline", "parse_factor", "parse_dir",
           "parse_precision", "parse_compiler", "default_paths", "BACKENDS", "COMPILERS", "DEFAULT_COMPILER",
           "TORCH_TENSORRT", "PATH_CHOICES", "PRECISIONS", "DEFAULT_BASELINE_DIR", "DEFAULT_BASELINE_FACTOR"]

DEFAULT_EXAMPLES = 10

DEFAULT_RTOL = _options.DEFAULT_RTOL
DEFAULT_ATOL = _options.DEFAULT_ATOL
BACKENDS = _options.BACKENDS
PATH_CHOICES = _options.PATH_CHOICES
PRECISIONS = _options.PRECISIONS
COMPILERS = _options.COMPILERS
DEFAULT_COMPILER = _options.DEFAULT_COMPILER
TORCH_TENSORRT = "torch_tensorrt"
parse_bool = _options.parse_bool
parse_backend = _options.parse_backend
parse_paths = _options.parse_paths
parse_examples = _options.parse_examples
parse_tolerance = _options.parse_tolerance
parse_seed = _options.parse_seed
parse_path = _options.parse_report_path
parse_precision = _options.parse_precision
parse_compiler = _options.parse_compiler
_FP16_TOL, _BF16_TOL = _options.PRECISION_TOLERANCES["fp16"], _options.PRECISION_TOLERANCES["bf16"]


DEFAULT_BASELINE_DIR = ".trtrefit-baselines"
DEFAULT_BASELINE_FACTOR = 2.0
BASELINE_MODES = ("save", "compare")


def parse_baseline(value: str) -> str:
    v = str(value).strip().lower()
    if v not in BASELINE_MODES:
        raise argparse.ArgumentTypeError(f"{value!r}: choose save (store this run's errors) or compare "
                                         f"(fail on a regression against the stored ones)")
    return v


def parse_factor(value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number; give a factor > 1, e.g. 2") from None
    if not f > 1.0 or f != f or f == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: the regression factor must be a finite number > 1 (e.g. 2)")
    return f


def parse_dir(text: str) -> str:
    value = str(text).strip()
    if not value:
        raise argparse.ArgumentTypeError("empty directory; give one such as .engine-cache")
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str                 # command line flag
    ini: str                  # ini key
    parser: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    is_flag: bool = False

    @property
    def dest(self) -> str:
        return self.ini


OPTIONS: tuple[Option, ...] = (
    Option("--trt-refit", "trt_refit", parse_bool, False,
           "run the TensorRT refit checks (tests marked trt_refit and generated model checks); "
           "without it they are skipped (default: off)", is_flag=True),
    Option("--trt-refit-backend", "trt_refit_backend", parse_backend, "auto",
           "backend to compile and refit on: auto, reference or tensorrt (default: auto, which picks "
           "tensorrt only where a GPU engine can be built and run, else the CPU reference backend)",
           metavar="{auto,reference,tensorrt}"),
    Option("--trt-refit-compiler", "trt_refit_compiler", parse_compiler, DEFAULT_COMPILER,
           "compiler that builds the engines and refits them: refitcore (its converters; its cached map and "
           "fallback conversion) or torch_tensorrt (Torch-TensorRT's own lowering, partition, converters and "
           "refit_module_weights, each weight it sets audited against a fresh conversion; needs the "
           "torch_tensorrt extra); a check's compiler= argument or a declaration's 'compiler' key overrides it "
           f"(default: {DEFAULT_COMPILER})", metavar="{refitcore,torch_tensorrt}"),
    Option("--trt-refit-paths", "trt_refit_paths", parse_paths, ("cached", "fallback"),
           "refit paths to check: cached, fallback or both (default: both). Unless given, torch_tensorrt engines "
           "check fallback alone, the only refit path of Torch-TensorRT 2.13 on", metavar="{cached,fallback,both}"),
    Option("--trt-refit-examples", "trt_refit_examples", parse_examples, DEFAULT_EXAMPLES,
           f"Hypothesis examples per generated property test (default: {DEFAULT_EXAMPLES})", metavar="N"),
    Option("--trt-refit-precision", "trt_refit_precision", parse_precision, "fp32",
           "precision engines are compiled in: fp32, fp16 or bf16 (float32, float16, bfloat16); a check's "
           "precision= argument or a declaration's 'precision' key overrides it (default: fp32)",
           metavar="{fp32,fp16,bf16}"),
    Option("--trt-refit-rtol", "trt_refit_rtol", parse_tolerance, DEFAULT_RTOL,
           f"relative tolerance of engine vs eager outputs (default: {DEFAULT_RTOL:g}); unless given, fp16 and "
           f"bf16 engines use {_FP16_TOL[0]:g} and {_BF16_TOL[0]:g} (docs/precision-tolerances.md)", metavar="RTOL"),
    Option("--trt-refit-atol", "trt_refit_atol", parse_tolerance, DEFAULT_ATOL,
           f"absolute tolerance, scaled by max(1, max|eager output|) (default: {DEFAULT_ATOL:g}); unless given, "
           f"fp16 and bf16 engines use {_FP16_TOL[1]:g} and {_BF16_TOL[1]:g}, raised to twice the model's own "
           f"precision noise where that is larger", metavar="ATOL"),
    Option("--trt-refit-report", "trt_refit_report", parse_path, None,
           "write a JSON report of every refit check to PATH, for CI gating (default: no report)",
           metavar="PATH"),
    Option("--trt-refit-seed", "trt_refit_seed", parse_seed, None,
           "seed for generated weights and inputs; the header prints the one used, pass it back to "
           "reproduce a run (default: a random seed)", metavar="SEED"),
    # -- baselines and the per-layer HTML report (baseline.py, html_report.py) --
    Option("--trt-refit-baseline", "trt_refit_baseline", parse_baseline, None,
           "save: store each model's worst output error and per-engine-weight discrepancy as the baseline; "
           "compare: fail the run when one grew beyond --trt-refit-baseline-factor (default: neither)",
           metavar="{save,compare}"),
    Option("--trt-refit-baseline-dir", "trt_refit_baseline_dir", parse_path, DEFAULT_BASELINE_DIR,
           f"directory of the baseline files, relative to the rootdir (default: {DEFAULT_BASELINE_DIR})",
           metavar="DIR"),
    Option("--trt-refit-baseline-factor", "trt_refit_baseline_factor", parse_factor,
           DEFAULT_BASELINE_FACTOR, f"compare: an error more than FACTOR times its baseline is a regression "
           f"(default: {DEFAULT_BASELINE_FACTOR:g})", metavar="FACTOR"),
    Option("--trt-refit-html", "trt_refit_html", parse_path, None,
           "write an HTML report with a plot of per-engine-weight discrepancy and output errors to PATH "
           "(needs matplotlib: pip install pytest-trtrefit[plot]) (default: no HTML)", metavar="PATH"),
    Option("--trt-refit-cache-dir", "trt_refit_cache_dir", parse_dir, None,
           "keep compiled engines in this directory across sessions; a later session loads and refits them "
           "instead of compiling (default: pytest's cache directory, .pytest_cache/d/trtrefit-engines, "
           "emptied by --cache-clear; no persistence under -p no:cacheprovider)", metavar="DIR"),
    Option("--trt-refit-no-cache", "trt_refit_no_cache", parse_bool, False,
           "compile every engine afresh: neither read nor write the engine cache (default: off)", is_flag=True),
)


def add_options(parser) -> None:
    """Register the option group and the ini mirrors on a pytest ``Parser``."""
    group = parser.getgroup("trt-refit", "TensorRT refit checks (pytest-trtrefit)")
    for opt in OPTIONS:
        if opt.is_flag:
            group.addoption(opt.flag, action="store_const", const=True, default=None, dest=opt.dest, help=opt.help)
            parser.addini(opt.ini, type="bool", default=False, help=f"ini mirror of {opt.flag}")
        else:
            group.addoption(opt.flag, action="store", type=opt.parser, default=None, dest=opt.dest,
                            metavar=opt.metavar, help=opt.help)
            parser.addini(opt.ini, type="string", default="", help=f"ini mirror of {opt.flag}")


@dataclasses.dataclass(frozen=True)
class RefitConfig:
    """The resolved options (command line > ini > default)."""

    enabled: bool = False
    backend: str = "auto"
    paths: tuple[str, ...] = ("cached", "fallback")
    examples: int = DEFAULT_EXAMPLES
    rtol: float = DEFAULT_RTOL               # the session precision's default unless given (see tolerances)
    atol: float = DEFAULT_ATOL
    report: str | None = None
    seed: int = 0
    seed_given: bool = False
    baseline: str | None = None              # save | compare
    baseline_dir: str = DEFAULT_BASELINE_DIR
    baseline_factor: float = DEFAULT_BASELINE_FACTOR
    html: str | None = None
    cache_dir: str | None = None          # None: pytest's cache directory (when the cacheprovider is active)
    no_cache: bool = False
    precision: str = "fp32"                  # engines are compiled in it unless a check asks for another
    compiler: str = DEFAULT_COMPILER         # engines are built by it unless a check asks for another
    sources: dict = dataclasses.field(default_factory=dict, compare=False)  # option -> cli | ini | default

    def tolerances(self, precision: str | None = None) -> tuple[float, float]:
        """(rtol, atol) for an engine of ``precision`` (None: the session's): the values the command line
        or the ini gave, else that precision's defaults (:func:`refitcore.options.tolerances_for`)."""
        given = {k: self.sources.get(f"trt_refit_{k}") in ("cli", "ini") for k in ("rtol", "atol")}
        return _options.tolerances_for(precision or self.precision, self.rtol if given["rtol"] else None,
                                       self.atol if given["atol"] else None)

    def paths_for(self, compiler: str | None = None) -> tuple[str, ...]:
        """The refit paths checked on an engine of ``compiler`` (None: the session's): the paths given on
        the command line or in the ini; unless given, a Torch-TensorRT engine's is ``fallback`` alone
        (Torch-TensorRT's weight-name-map path was removed in 2.13: see :mod:`refitcore.engine.torch_tensorrt`)."""
        if self.sources.get("trt_refit_paths") in ("cli", "ini"):
            return self.paths
        return default_paths(compiler or self.compiler)

    def to_json(self) -> dict:
        return {"backend": self.backend, "paths": list(self.paths), "examples": self.examples, "rtol": self.rtol,
                "atol": self.atol, "seed": self.seed, "precision": self.precision, "compiler": self.compiler}


def default_paths(compiler: str) -> tuple[str, ...]:
    """The refit paths checked unless ``--trt-refit-paths`` says: both, and ``fallback`` alone for a
    Torch-TensorRT engine (``refit_module_weights``' refit; its weight-name-map path was removed in 2.13)."""
    return ("fallback",) if compiler == TORCH_TENSORRT else ("cached", "fallback")


def resolve(config, *, seed: int | None = None) -> RefitConfig:
    """Read every option: the command line wins, then the ini key, then the default.

    ``seed`` (a seed handed down by a pytest-xdist controller) is used when neither the command
    line nor the ini gives one, so every worker draws the same weights. Raises
    ``pytest.UsageError`` for an invalid ini value, naming the key and the valid values."""
    import pytest

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        cli = config.getoption(opt.dest, default=None)
        if cli is not None:
            values[opt.ini], sources[opt.ini] = cli, "cli"
            continue
        raw = config.getini(opt.ini)
        if opt.is_flag:
            if raw:
                values[opt.ini], sources[opt.ini] = True, "ini"
                continue
        elif raw not in (None, "") and str(raw).strip():
            try:
                values[opt.ini] = opt.parser(raw)
            except argparse.ArgumentTypeError as err:
                raise pytest.UsageError(f"ini option {opt.ini} = {raw!r}: {err}") from None
            sources[opt.ini] = "ini"
            continue
        values[opt.ini], sources[opt.ini] = opt.default, "default"
    seed_value = values["trt_refit_seed"]
    seed_given = seed_value is not None
    if seed_value is None:
        seed_value = seed if seed is not None else random.SystemRandom().randrange(2 ** 31)
    precision = values["trt_refit_precision"]
    rtol, atol = _options.tolerances_for(
        precision, *(values[f"trt_refit_{k}"] if sources[f"trt_refit_{k}"] != "default" else None
                     for k in ("rtol", "atol")))
    return RefitConfig(enabled=bool(values["trt_refit"]), backend=values["trt_refit_backend"],
                       paths=(tuple(values["trt_refit_paths"]) if sources["trt_refit_paths"] != "default"
                              else default_paths(values["trt_refit_compiler"])), examples=values["trt_refit_examples"],
                       rtol=rtol, atol=atol, precision=precision, compiler=values["trt_refit_compiler"],
                       report=values["trt_refit_report"], seed=int(seed_value), seed_given=seed_given,
                       baseline=values["trt_refit_baseline"], baseline_dir=values["trt_refit_baseline_dir"],
                       baseline_factor=values["trt_refit_baseline_factor"], html=values["trt_refit_html"],
                       cache_dir=values["trt_refit_cache_dir"], no_cache=bool(values["trt_refit_no_cache"]),
                       sources=sources)
