"""`trtrefit doctor` says, step by step, what the TensorRT probe could and could not do."""
from __future__ import annotations

import pytest

from refitcore import doctor
from refitcore.backends import tensorrt_probe

H200 = ("TensorRT-RTX does not support compute capability 9.0 (NVIDIA H200): TensorRT-RTX 1.7.1.116 refused to "
        "deserialize an engine: [FAILED_INITIALIZATION] ...")


@pytest.mark.parametrize("stage,ok,expected", [
    ("deserialize", False, {"plan build": True, "deserialize and run": False, "refit of": False}),
    ("refit", False, {"plan build": True, "deserialize and run": True, "refit of": False}),
    ("build", False, {"plan build": False, "deserialize and run": False, "refit of": False}),
    ("done", True, {"plan build": True, "deserialize and run": True, "refit of": True}),
], ids=["refused-at-deserialize", "refused-at-refit", "build-fails", "all-works"])
def test_stage_lines_follow_the_probe(monkeypatch, stage, ok, expected):
    monkeypatch.setattr(tensorrt_probe, "last_stage", stage)
    checks = doctor._stage_checks(ok, H200)
    assert len(checks) == 3
    for check in checks:
        key = next(k for k in expected if k in check.item)
        assert check.value is expected[key], check
    failing = [c for c in checks if c.value is False]
    if not ok:
        # the step that failed carries TensorRT's reason; later steps say they were not tried
        assert failing[0].reason == H200
        assert all("not tried" in c.reason for c in failing[1:])


def test_no_cuda_device_means_nothing_tried(monkeypatch):
    monkeypatch.setattr(tensorrt_probe, "last_stage", "find a CUDA device for")
    checks = doctor._stage_checks(False, "no CUDA device")
    assert [c.value for c in checks] == [False, False, False]
    assert all("finding a CUDA device" in c.reason for c in checks)
