"""Progress of long work, for every layer: :class:`Silent`, the reporter that says nothing, and
:class:`Ticker`, which counts the parts of a long step (engine weights mapped, samples compared, graph
nodes converted) and says how far it got. A reporter is any object with ``info(message)`` and
``step(what)`` (a context manager around one step): the CLI's writes to stderr, ``--quiet`` silences it.
Work deep in the pipeline (the conversion of a network) reports to the reporter of the step it runs in:
:func:`reporting` sets it for the duration of a step, :func:`current` reads it. Standard library only.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Silent", "Ticker", "PROGRESS_EVERY_S", "reporting", "current"]


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


_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("refitcore_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Any) -> Iterator[None]:
    """Within the block, :func:`current` is ``progress`` (None: unchanged): how a step tells the work
    it calls, however deep, where to report (``compile(progress=...)``, the refit pipeline's steps)."""
    if progress is None:
        yield
        return
    token = _CURRENT.set(progress)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Any:
    """The reporter of the step running now (:func:`reporting`), else :class:`Silent`."""
    return _CURRENT.get() or Silent()
