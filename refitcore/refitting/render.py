"""The words every refit report shares: :class:`refitcore.RefitResult`, the gate's terminal,
JSON and Markdown reports, and the pytest plugin's mismatch report each say a number, a culprit
and an audit the same way through these functions; and :class:`Silent`, the progress reporter
that says nothing, and :class:`Ticker` (both from :mod:`refitcore.progress`, which every layer may use).

The audit helpers read the JSON form (:meth:`refitcore.refitting.audit.Audit.to_json`), so a
report loaded back from a file renders as the report that wrote it. Standard library only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from refitcore.progress import PROGRESS_EVERY_S, Silent, Ticker

__all__ = ["Silent", "Ticker", "PROGRESS_EVERY_S", "number", "indented", "culprit_note", "no_culprit_note",
           "culprit_lines", "audit_line",
           "audit_failure_lines", "audit_problem", "audit_markdown"]


def number(x: float | None) -> str:
    """A measurement in three significant digits; '-' when there is none, 'inf'/'nan' as they are."""
    if x is None:
        return "-"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def indented(text: object, prefix: str = "  ") -> str:
    """``text`` with every line indented by ``prefix`` (a nested block of a report)."""
    return prefix + str(text).replace("\n", "\n" + prefix)


def culprit_note(culprit) -> str:
    """One line naming the culprit weight, its recipe and why it is suspect."""
    return (f"first engine weight where the witnesses disagree: {culprit.name!r} (recipe {culprit.recipe}); "
            f"{culprit.why}")


def no_culprit_note(worst: Any) -> str:
    """One line for a failing path whose weights every witness agrees on."""
    return ("cached and fallback agree on every weight (and the refitted engine holds them): the difference "
            f"comes from the network or the tolerance (worst: {worst})")


def culprit_lines(culprit) -> str:
    """The culprit section of a mismatch report: the culprit in full, or why there is none."""
    if culprit is not None:
        return str(culprit)
    return ("culprit: none among the weights: the cached map, the fallback map and the engine's weights agree, "
            "so the difference lies in the network or the backend, not in the weight mapping")


def audit_line(audit: Mapping[str, Any]) -> str:
    """'audit cached vs fallback: agree on every weight' or '... DISAGREE on N weight(s)'."""
    state = "agree on every weight" if audit["ok"] else f"DISAGREE on {len(audit['failures'])} weight(s)"
    return f"audit cached vs fallback: {state}"


def audit_failure_lines(audit: Mapping[str, Any], limit: int = 10) -> list[str]:
    """One line per disagreeing weight (the worst first), at most ``limit``."""
    return [f"- {f['name']}: {f['status']} max abs diff {number(f['max_abs'])} {f.get('detail') or ''}"
            for f in audit["failures"][:limit]]


def audit_problem(audit: Mapping[str, Any]) -> str:
    """The problem a failed audit adds to a report's list."""
    failures = audit["failures"]
    return (f"audit: cached and fallback mappings disagree on {len(failures)} weight(s), "
            f"first {failures[0]['name']!r}")


def audit_markdown(audit: Mapping[str, Any]) -> str:
    """The audit in one Markdown sentence."""
    if audit["ok"]:
        return "Audit cached vs fallback: **agree** on every weight."
    worst = audit.get("worst") or {}
    return (f"Audit cached vs fallback: **{len(audit['failures'])} weight(s) disagree**; worst "
            f"`{worst.get('name')}` ({worst.get('status')}, max abs diff {number(worst.get('max_abs'))}).")
