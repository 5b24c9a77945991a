"""pytest plugin entry point (options, markers, fixtures)."""
from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("trt-refit", "TensorRT refit checks (pytest-trtrefit)")
    group.addoption("--trt-refit", action="store_true", default=False,
                    help="run tests marked trt_refit (default: skipped)")


def pytest_configure(config):
    config.addinivalue_line("markers", "trt_refit: refit checks; need --trt-refit")
