"""`trtrefit doctor`: its TensorRT line matches ``usable``, and it says, step by step, what the
TensorRT probe could and could not do."""
from __future__ import annotations

import pytest

from refitcore import doctor
from refitcore.backends import tensorrt as trt_backend
from refitcore.backends.tensorrt_probe import ProbeResult

H200 = ("TensorRT-RTX does not support compute capability 9.0 (NVIDIA H200): TensorRT-RTX 1.7.1.116 refused to "
        "deserialize an engine: [FAILED_INITIALIZATION] ...")


@pytest.mark.parametrize("stage,ok,expected", [
    ("deserialize", False, {"plan build": True, "deserialize and run": False, "refit of": False}),
    ("refit", False, {"plan build": True, "deserialize and run": True, "refit of": False}),
    ("build", False, {"plan build": False, "deserialize and run": False, "refit of": False}),
    ("done", True, {"plan build": True, "deserialize and run": True, "refit of": True}),
], ids=["refused-at-deserialize", "refused-at-refit", "build-fails", "all-works"])
def test_stage_lines_follow_the_probe(stage, ok, expected):
    checks = doctor.stage_checks(ProbeResult(ok, H200, stage))
    assert len(checks) == 3
    for check in checks:
        key = next(k for k in expected if k in check.item)
        assert check.value is expected[key], check
    failing = [c for c in checks if c.value is False]
    if not ok:
        # the step that failed carries TensorRT's reason; later steps say they were not tried
        assert failing[0].reason == H200
        assert all("not tried" in c.reason for c in failing[1:])


def test_no_cuda_device_means_nothing_tried():
    checks = doctor.stage_checks(ProbeResult(False, "no CUDA device", "find a CUDA device for"))
    assert [c.value for c in checks] == [False, False, False]
    assert all("finding a CUDA device" in c.reason for c in checks)


def test_doctor_lists_tensorrt_line_matching_usable(capsys):
    checks = doctor.doctor()
    items = {c.item: c for c in checks}
    ok, reason = trt_backend.usable()
    trt_line = items["tensorrt backend (build, run, refit)"]
    assert trt_line.value is ok and trt_line.reason == reason
    assert items["backend 'auto' picks"].value == ("tensorrt" if ok else "reference")
    text = doctor.render(checks)
    assert reason in text and ("[ ok ]" if ok else "[FAIL]") in text
    assert doctor.main([]) == 0
    assert doctor.main(["--require-tensorrt"]) == (0 if ok else 1)
    assert doctor.main(["--json"]) == 0
    assert '"item": "backend \'auto\' picks"' in capsys.readouterr().out
