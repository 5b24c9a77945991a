"""The engine kinds by name (:mod:`refitcore.engine.kinds` says what a kind is and how to add one).

A saved engine names its kind in its impl header (``"kind"``; absent: a whole network, as in every
file written before kinds had names); loading looks the name up here.
"""
from __future__ import annotations

from refitcore.engine import hybrid, segmented_build, torch_tensorrt, whole
from refitcore.engine.kinds import EngineKind
from refitcore.errors import BundleError

__all__ = ["KINDS", "kind_named", "kind_of_header"]

KINDS: dict[str, EngineKind] = {kind.name: kind for kind in (
    whole.KIND,
    segmented_build.KIND,
    hybrid.KIND,
    torch_tensorrt.KIND,
)}


def kind_named(name: str) -> EngineKind:
    """The kind registered under ``name``; :class:`KeyError` naming the known ones otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"no engine kind {name!r}; known kinds: {sorted(KINDS)}") from None


def kind_of_header(impl_header: dict, where: str) -> EngineKind:
    """The kind of a saved engine's impl header; :class:`BundleError` for a name no kind has."""
    name = impl_header.get("kind", whole.NAME)
    if not isinstance(name, str) or name not in KINDS:
        raise BundleError(f"{where}: engine file content is invalid: unknown engine kind {str(name)[:40]!r} "
                          f"(known: {sorted(KINDS)})")
    return KINDS[name]
