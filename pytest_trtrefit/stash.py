"""Where a pytest run keeps its :class:`~pytest_trtrefit.service.RefitSession`: the plugin stores it
in ``config.stash`` at configure time, and every module that needs it (hooks, fixtures, the
declarative items) reads it from here."""
from __future__ import annotations

import pytest

from .service import RefitSession

__all__ = ["SESSION_KEY", "get_session", "get_seed"]

SESSION_KEY = pytest.StashKey[RefitSession]()


def get_session(config) -> RefitSession:
    """The :class:`RefitSession` of this pytest run."""
    return config.stash[SESSION_KEY]


def get_seed(config) -> int:
    """The run's seed (``--trt-refit-seed``, or the one drawn for this run)."""
    return get_session(config).config.seed
