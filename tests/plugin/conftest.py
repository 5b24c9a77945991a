"""Shared by the plugin's black-box tests: in-process pytester runs and Hypothesis's global seed."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _keep_hypothesis_seed():
    """In-process runs set Hypothesis's global seed (as --hypothesis-seed does); restore it."""
    from hypothesis import core

    saved = core.global_force_seed
    yield
    core.global_force_seed = saved


def model_repo(pytester, module: str, source: str):
    """A model repository for in-process runs: ``module`` (holding ``source``) importable from its root."""
    pytester.makepyfile(**{module: source})
    pytester.syspathinsert()
    return pytester
