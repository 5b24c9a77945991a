"""The one argument check of the strategies: every invalid argument raises
:class:`InvalidStrategyArgument` (Hypothesis's ``InvalidArgument``) with a message that says what
was given and what to give instead, up front, when the strategy is defined.

Like Hypothesis's own ``check_argument``/``check_type`` (``hypothesis.internal.validation``): each
call names the argument it checks, so no check guesses which argument a value was.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from hypothesis.errors import InvalidArgument

from refitcore.options import PRECISIONS, parse_precision

__all__ = ["InvalidStrategyArgument", "check_argument", "check_type", "check_one_of", "check_some_of",
           "check_precision"]


class InvalidStrategyArgument(InvalidArgument, ValueError, TypeError):
    """An invalid argument to a strategy or to the materializer. It is Hypothesis's
    ``InvalidArgument`` and, as these functions raised before they shared one check, also a
    ``ValueError`` (a bad value) and a ``TypeError`` (a value of the wrong kind), so existing
    ``except ValueError``/``except TypeError`` clauses keep catching it."""


def check_argument(condition: bool, message: str) -> None:
    """Raise :class:`InvalidStrategyArgument` with ``message`` (what was seen, what to give) unless
    ``condition`` holds."""
    if not condition:
        raise InvalidStrategyArgument(message)


def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str) -> None:
    """``value`` (the argument ``name``) is an instance of ``types``, described to the user as
    ``expected`` (for instance "an nn.Module or a callable returning one")."""
    check_argument(isinstance(value, types), f"{name}: expected {expected}, got {type(value).__name__}")


def check_one_of(name: str, value: Any, choices: tuple) -> None:
    """``value`` (the argument ``name``) is one of ``choices``."""
    check_argument(value in choices, f"{name}={value!r}: choose one of {choices}")


def check_some_of(name: str, values: Iterable[Any], choices: tuple, *, allow_empty: bool = False) -> None:
    """Every one of ``values`` (the argument ``name``) is one of ``choices``, and there is at least one
    unless ``allow_empty``."""
    values = list(values)
    unknown = [v for v in values if v not in choices]
    check_argument(not unknown and (values or allow_empty),
                   f"{name}={values!r}: " + (f"unknown {unknown}; " if unknown else "")
                   + f"choose {'any' if allow_empty else 'one or more'} of {choices}")


def check_precision(name: str, value: Any) -> str:
    """``value`` (the argument ``name``) names an engine precision: its canonical name (``'float16'`` ->
    ``'fp16'``; :func:`refitcore.options.parse_precision`)."""
    try:
        return parse_precision(value)
    except argparse.ArgumentTypeError:
        raise InvalidStrategyArgument(f"{name}={value!r}: choose one of {PRECISIONS} "
                                      f"(or float32, float16, bfloat16)") from None
