"""The words every refit report shares: :class:`refitcore.RefitResult`, the gate's terminal,
JSON and Markdown reports, and the pytest plugin's mismatch report each say a number, a culprit
and an audit the same way through these functions; and :class:`Silent`, the progress reporter
that says nothing (the pipeline talks to a progress reporter while it runs).

The audit helpers read the JSON form (:meth:`refitcore.refitting.audit.Audit.to_json`), so a
report loaded back from a file renders as the report that wrote it. Standard library only.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["Silent", "Ticker", "PROGRESS_EVERY_S", "number", "indented", "culprit_note", "no_culprit_note",
           "culprit_lines", "audit_line",
           "audit_failure_lines", "audit_problem", "audit_markdown"]


class Silent:
    """A progress reporter that says nothing. The interface: ``info(message)``, and ``step(what)``,
    a context manager around one step."""

    def info(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        yield


PROGRESS_EVERY_S = 3.0   # a step that runs longer than this says how far it got, this often


class Ticker:
    """Counts the parts of a long step (weights mapped, samples compared) and says how far it got
    through ``progress.info`` once the step has run :data:`PROGRESS_EVERY_S` seconds, then as
    often: short steps stay silent, a 7B checkpoint's minutes do not. One per step; call it once
    per part done. The reporter decides where it goes (the CLI: stderr, nothing with ``--quiet``).

    Example::

        tick = Ticker(progress, "engine weights mapped", len(names))
        for name in names:
            ...
            tick()
    """

    def __init__(self, progress: Any, what: str, total: int, every: float = PROGRESS_EVERY_S):
        self.progress, self.what, self.total, self.every = progress, what, total, every
        self.done = 0
        self.last = time.perf_counter()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.progress.info(f"  {self.what}: {self.done}/{self.total}")


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
