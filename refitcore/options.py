"""Option values shared by the ``trtrefit`` CLI and the pytest plugin: one parser for each.

Every parser takes text (or an already parsed value), returns the value, and raises
``argparse.ArgumentTypeError`` with a one-line message that says what was seen and what to give
(argparse and pytest both turn that into a usage error). Also the defaults every entry point shares
(tolerances, path names, the tool name, file limits). Standard library only: the plugin imports it
at pytest startup, and the lazy package root (PEP 562) loads nothing else with it.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import NoReturn

__all__ = ["BACKENDS", "COMPILERS", "DEFAULT_COMPILER", "parse_compiler", "REFIT_PATHS", "PATH_CHOICES",
           "PRECISIONS", "PRECISION_TOLERANCES", "tolerances_for",
           "parse_precision", "parse_backend", "parse_paths", "parse_tolerance",
           "check_tolerance", "parse_positive_int", "parse_examples", "parse_seed", "parse_shape", "parse_factory",
           "parse_bool", "parse_report_path"]

TOOL = "trtrefit"                                     # the command line tool's name, in every message it prints
DEFAULT_RTOL = 1e-4                                  # engine vs eager: |engine - eager| <= atol * max(1, max|eager|)
DEFAULT_ATOL = 1e-4                                  #   + rtol * |eager| (refitcore.refitting.verify)
# Engine vs eager per engine precision (the rule above): the float32 pair, and pairs for float16 and
# bfloat16 engines derived from a measurement (docs/precision-tolerances.md, benchmarks/precision_errors.py).
# For comparison, torch.testing.assert_close's per-dtype defaults, meant for ONE op: float32 rtol 1.3e-6
# atol 1e-5, float16 rtol 1e-3 atol 1e-5, bfloat16 rtol 1.6e-2 atol 1e-5. A whole network rounds at every
# layer, so its outputs sit further from float32 eager than one op's; atol here is scaled by
# max(1, max|eager|), which keeps near-zero outputs of a large-valued output from needing a large rtol.
PRECISIONS = ("fp32", "fp16", "bf16")                # CompileOptions.precision, compile(precision=...)
PRECISION_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (DEFAULT_RTOL, DEFAULT_ATOL),
    "fp16": (1e-2, 2e-2),
    "bf16": (5e-2, 7e-2),
}
# Cached vs fallback mappings compare exactly: compile, the cached path and the fallback compute every
# engine weight with one arithmetic (refitcore.conversion.recipes), so any difference is a map bug.
AUDIT_RTOL = 0.0
AUDIT_ATOL = 0.0
BACKENDS = ("auto", "reference", "tensorrt")         # refitcore.backends resolves these names
DEFAULT_COMPILER = "refitcore"                       # compile(compiler=...): refitcore's converters, or
COMPILERS = (DEFAULT_COMPILER, "torch_tensorrt")     #   Torch-TensorRT's (refitcore.engine.torch_tensorrt)
REFIT_PATHS = ("auto", "cached", "fallback")         # refitcore.refit(path=...)
PATH_CHOICES = ("cached", "fallback", "both")        # paths to check (CLI --paths, --trt-refit-paths)
# Largest tensor a file's header (a bundle, a cache entry) may declare, in elements (1 GiB of fp32):
# tools allocate inputs from a loaded engine's spec (``trtrefit gate --inputs random:N``), so a crafted
# file must not ask for hundreds of GB. The bundle reader and the reference backend both check it.
MAX_TENSOR_ELEMENTS = 2 ** 28


def _fail(msg: str) -> NoReturn:
    raise argparse.ArgumentTypeError(msg)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    _fail(f"expected true or false, got {text!r}")


def parse_backend(text: str) -> str:
    """'auto', 'reference' or 'tensorrt'."""
    value = str(text).strip().lower()
    if value not in BACKENDS:
        _fail(f"{text!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return value


def parse_paths(text: str | tuple | list) -> tuple[str, ...]:
    """'cached', 'fallback', 'both' or 'cached,fallback' -> the refit paths to check, in order."""
    if isinstance(text, (tuple, list)):
        parts = [str(p).strip().lower() for p in text]
    else:
        value = str(text).strip().lower()
        parts = ["cached", "fallback"] if value == "both" else [p.strip() for p in value.split(",") if p.strip()]
    if not parts or any(p not in ("cached", "fallback") for p in parts) or len(set(parts)) != len(parts):
        _fail(f"{text!r} is not a refit path; choose one of {', '.join(PATH_CHOICES)}")
    return tuple(p for p in ("cached", "fallback") if p in parts)


def parse_tolerance(text: str | float) -> float:
    """A finite, non-negative float (rtol/atol as in ``torch.allclose``; 0 asks for exact agreement)."""
    return _tolerance(str(text).strip(), repr(text), argparse.ArgumentTypeError)


def check_tolerance(value: float, name: str = "tolerance") -> float:
    """``value`` as a float when it is a finite, non-negative number, else ``ValueError``.

    The one check of rtol/atol that every entry point runs (``verify``, ``refit``, the gate, the
    plugin's options and declarations): with a NaN tolerance every comparison would pass, so a
    check could not fail. The message says what was seen (``rtol=nan``) and what to give."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a number; give a non-negative float such as 1e-4")
    return _tolerance(value, f"{name}={value!r}", ValueError)


def _tolerance(value, seen: str, error: type[Exception]) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{seen} is not a number; give a non-negative float such as 1e-4") from None
    if not (number >= 0.0) or not math.isfinite(number):
        raise error(f"{seen}: a tolerance must be finite and >= 0, such as 1e-4")
    return number


_PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32",
                      "fp16": "fp16", "float16": "fp16", "half": "fp16",
                      "bf16": "bf16", "bfloat16": "bf16"}


def parse_compiler(text: str) -> str:
    """'refitcore' or 'torch_tensorrt' (also 'torch-tensorrt'): the compiler ``compile(compiler=...)`` takes."""
    value = str(text).strip().lower().replace("-", "_")
    if value not in COMPILERS:
        _fail(f"{text!r} is not a compiler; choose one of {', '.join(COMPILERS)}")
    return value


def parse_precision(text: str) -> str:
    """'fp32', 'fp16' or 'bf16' (also 'float32', 'float16'/'half', 'bfloat16') -> the canonical name
    (:data:`PRECISIONS`) that ``compile(precision=...)`` takes."""
    value = _PRECISION_ALIASES.get(str(text).strip().lower())
    if value is None:
        _fail(f"{text!r} is not a precision; choose one of {', '.join(PRECISIONS)} (or float32, float16, bfloat16)")
    return value


def tolerances_for(precision: str | None, rtol: float | None = None, atol: float | None = None
                   ) -> tuple[float, float]:
    """(rtol, atol) of engine vs eager for an engine of ``precision`` (:data:`PRECISION_TOLERANCES`; None
    or an unknown name: float32's), each replaced by the caller's own value where one is given (not
    None). The plugin, the CLI and the gate pick their defaults through this one function.

    Example::

        rtol, atol = tolerances_for(engine.options.precision, rtol=user_rtol)
    """
    default_rtol, default_atol = PRECISION_TOLERANCES.get(str(precision), PRECISION_TOLERANCES["fp32"])
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def parse_positive_int(text: str | int, what: str = "value") -> int:
    """A whole number >= 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        _fail(f"{text!r} is not a whole number of {what}; give a positive integer such as 10")
    if value < 1:
        _fail(f"{value} {what}: give a positive integer such as 10")
    return value


def parse_examples(text: str | int) -> int:
    """A positive number of Hypothesis examples per generated property test."""
    return parse_positive_int(text, "examples")


def parse_seed(text: str | int) -> int:
    """A non-negative integer seed (decimal, or 0x... hexadecimal)."""
    try:
        value = int(str(text).strip(), 0)
    except ValueError:
        _fail(f"{text!r} is not an integer seed; give one such as 1234")
    if value < 0:
        _fail(f"seed {value} is negative; give a non-negative integer")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' (or '1,3,224,224') -> (1, 3, 224, 224)."""
    parts = [p for p in re.split(r"[x,×]", str(text).strip().lower()) if p != ""]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        _fail(f"input shape {text!r} must look like 1x3x224x224 (positive integers)")
    return shape


def parse_factory(text: str) -> str:
    """'package.module:callable' (checked for form only: nothing is imported here)."""
    text = str(text).strip()
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        _fail(f"{text!r} must look like MODULE:FACTORY, e.g. torchvision.models:resnet18")
    return text


def parse_report_path(text: str) -> str:
    value = str(text).strip()
    if not value:
        _fail("empty report path; give a file name such as trt-refit.json")
    return value
