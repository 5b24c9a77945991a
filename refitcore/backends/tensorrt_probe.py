"""Can this machine build, run *and refit* a TensorRT engine? Asked once, in a subprocess.

A runtime that refuses the GPU (TensorRT-RTX on compute capability 9.0: "does not support this
compute capability"), hangs, or crashes in native code must become a skip reason and a
``trtrefit doctor`` line, never take the test process down. So :func:`probe` runs
``python -m refitcore.backends.tensorrt_probe_child`` (:mod:`.tensorrt_probe_child`) with a
timeout and reads one JSON line back, and returns a :class:`ProbeResult`: usable or not, why, and
the stage the probe reached (so that ``trtrefit doctor`` can say which step works).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from refitcore import _trt

__all__ = ["probe", "interpret", "ProbeResult", "PROBE_TIMEOUT_S", "STAGES", "REPORT_MARK"]

PROBE_TIMEOUT_S = float(os.environ.get("REFITCORE_TRT_PROBE_TIMEOUT", "180"))
REPORT_MARK = "REFITCORE-PROBE "   # the child's report line starts with this
# The stages of the probe, in order ("done": everything worked).
STAGES = ("import", "find a CUDA device for", "build", "deserialize", "run", "refit", "done")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What the capability probe found: ``ok`` (a TensorRT engine builds, runs and refits here),
    ``reason`` (why, in words) and ``stage`` (the last of :data:`STAGES` it reached; None when the
    child reported a stage we do not know)."""

    ok: bool
    reason: str
    stage: str | None


def _label(flavour: str | None) -> str:
    return {"tensorrt_rtx": "TensorRT-RTX", "tensorrt": "TensorRT"}.get(flavour or "", flavour or "TensorRT")


def interpret(report: dict) -> tuple[bool, str]:
    """Turn the child's report into (usable, precise reason)."""
    if report.get("ok"):
        return True, (f"{_label(report.get('flavour'))} {report.get('version')} built, ran and refitted an engine on "
                      f"{report.get('device')} (compute capability {report.get('cc')})")
    stage = report.get("stage", "?")
    reason = str(report.get("reason", "")).strip() or "no message"
    label = f"{_label(report.get('flavour'))} {report.get('version') or ''}".strip()
    cc = report.get("cc")
    if "compute capability" in reason.lower() and ("not support" in reason.lower() or "unsupported" in reason.lower()):
        return False, (f"{_label(report.get('flavour'))} does not support compute capability {cc} "
                       f"({report.get('device')}): {label} refused to {stage} an engine: {reason}")
    where = f" on {report.get('device')} (compute capability {cc})" if report.get("device") else ""
    return False, f"{label} failed to {stage} a test engine{where}: {reason}"


def _package_root() -> str:
    """The directory that holds the ``refitcore`` package (for the child's PYTHONPATH)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe(timeout: float | None = None, command: list[str] | None = None) -> ProbeResult:
    """Cheap checks first (TensorRT importable, a CUDA device visible), then the subprocess.
    ``command`` replaces the child (tests use it to simulate a hang or a crash)."""
    if command is None:
        if not _trt.available():
            try:
                _trt.trt()
            except _trt.TensorRTUnavailableError as err:
                return ProbeResult(False, str(err), "import")
        import torch

        if not torch.cuda.is_available():
            return ProbeResult(False, "no CUDA device: torch.cuda.is_available() is False (no GPU, or no driver "
                                      "visible to torch)", "find a CUDA device for")
        command = [sys.executable, "-m", "refitcore.backends.tensorrt_probe_child"]
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-400:] if isinstance(err.stderr, bytes) else (err.stderr or "")[-400:]
        if isinstance(tail, bytes):
            tail = tail.decode("utf-8", "replace")
        return ProbeResult(False, f"the TensorRT capability probe did not finish within {timeout:g} s (a hang in the "
                                  f"runtime?)" + (f"; its last output: {tail.strip()}" if tail.strip() else "")
                           + "; set REFITCORE_TRT_PROBE_TIMEOUT to allow longer", "import")
    reports = [line[len(REPORT_MARK):] for line in proc.stdout.splitlines() if line.startswith(REPORT_MARK)]
    if not reports:
        if proc.returncode < 0:
            how = f"was killed by signal {-proc.returncode}"
        else:
            how = f"exited with status {proc.returncode} without a report"
        tail = proc.stderr.strip()[-600:]
        return ProbeResult(False, f"the TensorRT capability probe {how} after {time.perf_counter() - t0:.1f} s (a "
                                  f"crash in the runtime?)" + (f"; stderr: {tail}" if tail else ""), "import")
    try:
        report = json.loads(reports[-1])
    except ValueError as err:
        return ProbeResult(False, f"the TensorRT capability probe sent an unreadable report ({err}): "
                                  f"{reports[-1][:200]}", "import")
    ok, reason = interpret(report)
    return ProbeResult(ok, reason, report.get("stage") if report.get("stage") in STAGES else None)
