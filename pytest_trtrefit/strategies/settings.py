"""Hypothesis settings for refit property tests: :func:`refit_settings`."""
from __future__ import annotations

from hypothesis import settings
from hypothesis.errors import InvalidArgument

__all__ = ["refit_settings"]


def refit_settings(**overrides) -> settings:
    """Hypothesis settings for refit property tests: the "trt-refit" profile that ``--trt-refit``
    registers (``--trt-refit-examples`` examples, no deadline), else the current profile with no
    deadline and at most 10 examples. Use as a decorator: ``@refit_settings()``."""
    try:
        base = settings.get_profile("trt-refit")
    except InvalidArgument:  # the plugin is not active in this process
        base = settings(settings.default, deadline=None, max_examples=min(10, settings.default.max_examples))
    return settings(base, **overrides)
