"""'package.module:callable' model factories (recorded in saved engines, used by the CLI)."""
from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["load_factory"]


def load_factory(spec: str) -> Callable:
    """Import ``'package.module:attr.path'`` and return the callable."""
    if ":" not in spec:
        raise ValueError(f"model factory {spec!r} must look like 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model factory {spec!r}: cannot import {module_name!r}: {err}") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"model factory {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"model factory {spec!r} is not callable")
    return obj
