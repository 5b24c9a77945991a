"""Where a pytest run keeps its engine provider and its report recorder: the plugin builds both in
``pytest_configure`` and stores them in ``config.stash``; every module that needs them (hooks,
fixtures, the declarative items) reads them from here."""
from __future__ import annotations

import pytest

from .config import RefitConfig
from .engines import EngineProvider
from .recorder import ReportRecorder
from .service import RefitSession

__all__ = ["ENGINES_KEY", "RECORDER_KEY", "get_engines", "get_recorder", "get_config", "get_session"]

ENGINES_KEY = pytest.StashKey[EngineProvider]()
RECORDER_KEY = pytest.StashKey[ReportRecorder]()


def get_engines(config) -> EngineProvider:
    """The :class:`EngineProvider` of this pytest run."""
    return config.stash[ENGINES_KEY]


def get_recorder(config) -> ReportRecorder:
    """The :class:`ReportRecorder` of this pytest run."""
    return config.stash[RECORDER_KEY]


def get_config(config) -> RefitConfig:
    """The resolved ``--trt-refit`` options of this pytest run."""
    return get_engines(config).config


def get_session(config) -> RefitSession:
    """The checks of this pytest run (what the ``trt_refit`` fixture gives), over its provider and recorder."""
    engines = get_engines(config)
    return RefitSession(engines.config, engines=engines, recorder=get_recorder(config))
