"""Repository-level pytest configuration: Hypothesis profiles for CI and development."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per xdist worker: with `-n 2` on two cores, torch's default (one thread per
    # core in every worker) oversubscribes the CPU and slows eager runs and conversions down sharply.
    import torch

    torch.set_num_threads(1)
