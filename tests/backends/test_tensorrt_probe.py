"""The TensorRT capability probe (refitcore/backends/tensorrt_probe.py): a hang, a crash or a refusal
of the runtime becomes a precise reason and the stage it reached, never a crash of the caller."""
from __future__ import annotations

import sys

import pytest

from refitcore.backends.tensorrt_probe import ProbeResult, interpret, probe


def test_probe_timeout_becomes_a_reason():
    result = probe(timeout=1.0, command=[sys.executable, "-c", "import time; time.sleep(30)"])
    assert isinstance(result, ProbeResult)
    assert result.ok is False and "did not finish within 1 s" in result.reason


def test_probe_crash_becomes_a_reason():
    result = probe(timeout=60, command=[sys.executable, "-c", "import os; os.abort()"])
    assert result.ok is False and "killed by signal" in result.reason


# What TensorRT-RTX 1.7.1.116 said on an NVIDIA H200 (benchmarks/results/build_times.md).
H200_MESSAGE = ("[FAILED_INITIALIZATION] IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine "
                "cannot run on this GPU, which has compute capability 9.0. Supported compute capabilities: 8.0 8.6 "
                "8.9 12.0 12.1 >12.0. TensorRT-RTX does not support this compute capability, so the engine cannot "
                "be rebuilt for it. In throwUnlessComputeCapSupported at /_src/runtime/dispatch/runtime.cpp:84)")


def test_probe_report_is_read_back():
    import json

    report = {"ok": False, "stage": "deserialize", "flavour": "tensorrt_rtx", "version": "1.7.1.116",
              "device": "NVIDIA H200", "cc": "9.0", "reason": H200_MESSAGE}
    line = f"print('REFITCORE-PROBE ' + {json.dumps(json.dumps(report))})"
    result = probe(timeout=60, command=[sys.executable, "-c", line])
    ok, reason = result.ok, result.reason
    assert ok is False
    assert result.stage == "deserialize"   # what `trtrefit doctor` reads to say which step fails
    assert reason.startswith("TensorRT-RTX does not support compute capability 9.0 (NVIDIA H200): "
                             "TensorRT-RTX 1.7.1.116 refused to deserialize an engine: [FAILED_INITIALIZATION]"), reason
    assert H200_MESSAGE in reason


def test_probe_without_report_is_an_error_not_a_pass():
    result = probe(timeout=60, command=[sys.executable, "-c", "print('hello')"])
    assert result.ok is False and "exited with status 0 without a report" in result.reason


@pytest.mark.parametrize("report,ok,needle", [
    ({"ok": True, "flavour": "tensorrt", "version": "10.9", "device": "RTX 4090", "cc": "8.9"}, True,
     "built, ran and refitted"),
    ({"ok": False, "stage": "build", "flavour": "tensorrt_rtx", "version": "1.7", "device": "GPU", "cc": "8.6",
      "reason": "Error Code 1: Myelin"}, False, "failed to build a test engine on GPU (compute capability 8.6)"),
    ({"ok": False, "stage": "refit", "flavour": "tensorrt", "version": "10.9", "reason": "refit had no effect"},
     False, "failed to refit"),
], ids=["ok", "build-fails", "refit-fails"])
def test_interpret(report, ok, needle):
    got_ok, reason = interpret(report)
    assert got_ok is ok and needle in reason
