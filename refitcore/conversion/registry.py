"""Converter registry keyed on the exact ATen overload (``aten.mean.dim``, not ``aten.mean``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["ConverterEntry", "Unsupported", "converter", "lookup", "registered_targets"]


class Unsupported(Exception):
    """Raised by a converter for a call it cannot express (the message says why)."""

# (ctx, node, args, kwargs) -> value
ConverterFn = Callable[..., Any]
# node -> None when the converter handles it, else a reason it cannot
CapabilityFn = Callable[[Any], str | None]


@dataclasses.dataclass(frozen=True)
class ConverterEntry:
    target: Any
    fn: ConverterFn
    capability: CapabilityFn | None = None


_REGISTRY: dict[Any, ConverterEntry] = {}


def converter(*targets: Any, capability: CapabilityFn | None = None):
    """Register ``fn`` as the converter of each exact overload in ``targets``.

    Example::

        @converter(aten.relu.default)
        def relu(ctx, node, args, kwargs):
            return activation(ctx, args[0], "RELU")
    """
    for t in targets:
        if type(t).__name__ == "OpOverloadPacket":
            raise TypeError(f"register an exact overload such as {t}.default, not the packet {t}")

    def deco(fn: ConverterFn) -> ConverterFn:
        for t in targets:
            if t in _REGISTRY:
                raise ValueError(f"{t} already has a converter ({_REGISTRY[t].fn.__module__}."
                                 f"{_REGISTRY[t].fn.__name__}); remove one of the two registrations")
            _REGISTRY[t] = ConverterEntry(t, fn, capability)
        return fn

    return deco


def lookup(target: Any) -> ConverterEntry | None:
    return _REGISTRY.get(target)


def registered_targets() -> list[str]:
    return sorted(str(t) for t in _REGISTRY)

