"""`trtrefit doctor`: its TensorRT line matches ``usable``, and it says, step by step, what the
TensorRT probe could and could not do."""
from __future__ import annotations

import pytest

from refitcore.backends import tensorrt as trt_backend
from refitcore.backends.tensorrt_probe import ProbeResult
from refitcore.cli import doctor

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
    gpu = items["CUDA device"].value is True
    assert reason in text and ("[ ok ]" if ok else "[FAIL]" if gpu else "[ n/a]") in text
    assert doctor.main([]) == 0
    assert doctor.main(["--require-tensorrt"]) == (0 if ok else 1)
    assert doctor.main(["--json"]) == 0
    assert '"item": "backend \'auto\' picks"' in capsys.readouterr().out


def _fake_machine(monkeypatch, *, gpu: bool, probe: ProbeResult):
    monkeypatch.setattr(doctor, "_torch_checks", lambda: [
        doctor.Check("torch", "2.x", "CUDA build 13.0"),
        doctor.Check("CUDA device", gpu, "1 visible" if gpu else "torch.cuda.is_available() is False")])
    monkeypatch.setattr(trt_backend, "probe_result", lambda: probe)
    monkeypatch.setattr(doctor, "resolve_backend", lambda name: ("reference", "test"))


def test_a_cpu_machine_gets_n_a_not_fail(monkeypatch, capsys):
    _fake_machine(monkeypatch, gpu=False, probe=ProbeResult(False, "no CUDA device", "find a CUDA device for"))
    checks = doctor.doctor()
    text = doctor.render(checks)
    assert "[FAIL]" not in text and text.count("[ n/a]") == 5, text
    assert "[ n/a] CUDA device" in text and "not expected without a CUDA GPU" in text
    assert doctor.main([]) == 0 and doctor.main(["--require-tensorrt"]) == 1   # exit codes keep their meaning
    capsys.readouterr()
    doctor.main(["--json"])
    assert '"status": "n/a"' in capsys.readouterr().out


def test_a_gpu_machine_where_tensorrt_fails_says_fail(monkeypatch):
    _fake_machine(monkeypatch, gpu=True, probe=ProbeResult(False, H200, "deserialize"))
    text = doctor.render(doctor.doctor())
    assert "[FAIL] TensorRT engine deserialize and run" in text and "[ n/a]" not in text
    assert doctor.main(["--require-tensorrt"]) == 1


def test_doctor_help_lists_every_flag(capsys):
    from refitcore.cli import main as cli

    with pytest.raises(SystemExit):
        cli.main(["doctor", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--json print the checks as JSON" in out and "--require-tensorrt exit with status 1" in out
