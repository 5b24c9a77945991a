"""Can this machine build, run *and refit* a TensorRT engine? Asked once, in a subprocess.

A runtime that refuses the GPU (TensorRT-RTX on compute capability 9.0: "does not support this
compute capability"), hangs, or crashes in native code must become a skip reason and a
``trtrefit doctor`` line, never take the test process down. So :func:`probe` runs this module
as ``python -m refitcore.backends.tensorrt_probe`` with a timeout and reads one JSON line back.

The child builds a one-layer network (a 1x1 convolution with named weights) with REFIT through
:mod:`.tensorrt_build`, deserializes and runs it through :class:`.tensorrt.TensorRTEngine`,
refits the kernel through the real adapter, and checks both answers against torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

__all__ = ["probe", "interpret", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = float(os.environ.get("REFITCORE_TRT_PROBE_TIMEOUT", "180"))
_MARK = "REFITCORE-PROBE "


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
    import refitcore

    return os.path.dirname(os.path.dirname(os.path.abspath(refitcore.__file__)))


# The stage the last probe reached ("import", "find a CUDA device for", "build", "deserialize", "run",
# "refit", or "done"), so that `trtrefit doctor` can say which step works and which does not.
STAGES = ("import", "find a CUDA device for", "build", "deserialize", "run", "refit", "done")
last_stage: str | None = None


def probe(timeout: float | None = None, command: list[str] | None = None) -> tuple[bool, str]:
    """(usable, reason). Cheap checks first (TensorRT importable, a CUDA device visible), then the
    subprocess. ``command`` replaces the child (tests use it to simulate a hang or a crash)."""
    global last_stage
    from .. import _trt

    last_stage = "import"

    if command is None:
        if not _trt.available():
            try:
                _trt.trt()
            except _trt.TensorRTUnavailableError as err:
                return False, str(err)
        import torch

        if not torch.cuda.is_available():
            last_stage = "find a CUDA device for"
            return False, "no CUDA device: torch.cuda.is_available() is False (no GPU, or no driver visible to torch)"
        command = [sys.executable, "-m", "refitcore.backends.tensorrt_probe"]
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
        return False, (f"the TensorRT capability probe did not finish within {timeout:g} s (a hang in the runtime?)"
                       + (f"; its last output: {tail.strip()}" if tail.strip() else "")
                       + "; set REFITCORE_TRT_PROBE_TIMEOUT to allow longer")
    reports = [line[len(_MARK):] for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if not reports:
        if proc.returncode < 0:
            how = f"was killed by signal {-proc.returncode}"
        else:
            how = f"exited with status {proc.returncode} without a report"
        tail = proc.stderr.strip()[-600:]
        return False, (f"the TensorRT capability probe {how} after {time.perf_counter() - t0:.1f} s (a crash in the "
                       f"runtime?)" + (f"; stderr: {tail}" if tail else ""))
    try:
        report = json.loads(reports[-1])
    except ValueError as err:
        return False, f"the TensorRT capability probe sent an unreadable report ({err}): {reports[-1][:200]}"
    last_stage = report.get("stage") if report.get("stage") in STAGES else None
    return interpret(report)


def _emit(report: dict) -> None:
    sys.stdout.write(_MARK + json.dumps(report) + "\n")
    sys.stdout.flush()


def _child(report: dict) -> dict:
    report["stage"] = "import"
    from .. import _trt

    t = _trt.trt()
    report.update(flavour=_trt.flavour(), version=_trt.version())
    import numpy as np
    import torch

    report["stage"] = "find a CUDA device for"
    if not torch.cuda.is_available():
        report["reason"] = "torch.cuda.is_available() is False"
        return report
    cap = torch.cuda.get_device_capability()
    report.update(device=torch.cuda.get_device_name(), cc=f"{cap[0]}.{cap[1]}")

    from .tensorrt import TensorRTEngine
    from .tensorrt_build import build_plan
    from .tensorrt_refit import make_error_recorder

    report["stage"] = "build"
    builder = t.Builder(_trt.logger())
    network = builder.create_network(0)
    x = network.add_input("x", t.float32, t.Dims((1, 2, 4, 4)))
    kernel = np.array([1.0, 2.0, -1.0, 0.5], dtype=np.float32)
    bias = np.array([0.25, -0.5], dtype=np.float32)
    wk, wb = t.Weights(kernel), t.Weights(bias)
    conv = network.add_convolution_nd(x, 2, t.Dims((1, 1)), wk, wb)
    conv.name = "probe.conv"
    network.set_weights_name(wk, "probe.conv KERNEL")
    network.set_weights_name(wb, "probe.conv BIAS")
    out = conv.get_output(0)
    out.name = "y"
    network.mark_output(out)
    pb = build_plan(builder, network, recorder=make_error_recorder(t))
    report["build_seconds"] = round(pb.seconds, 3)

    report["stage"] = "deserialize"
    meta = {"device_index": torch.cuda.current_device(), "input_names": ["x"], "output_names": ["y"],
            "weight_shapes": {"probe.conv KERNEL": [2, 2, 1, 1], "probe.conv BIAS": [2]}}
    engine = TensorRTEngine(pb.plan, {"probe.conv KERNEL": kernel.reshape(2, 2, 1, 1), "probe.conv BIAS": bias}, meta)

    report["stage"] = "run"
    inp = torch.randn(1, 2, 4, 4, device="cuda")

    def expected(k, b):
        return torch.nn.functional.conv2d(inp, torch.from_numpy(k).reshape(2, 2, 1, 1).cuda(), torch.from_numpy(b).cuda())

    got = engine.run([inp])[0]
    if not torch.allclose(got, expected(kernel, bias), atol=1e-5):
        report["reason"] = f"wrong result: max abs error {float((got - expected(kernel, bias)).abs().max()):.3g}"
        return report

    report["stage"] = "refit"
    new_kernel = np.array([-2.0, 0.5, 3.0, 1.0], dtype=np.float32)
    refitter = engine.create_refitter()
    ok = refitter.set_named_weights("probe.conv KERNEL", new_kernel.reshape(2, 2, 1, 1))
    ok = ok and refitter.set_named_weights("probe.conv BIAS", bias)
    if not ok or refitter.get_missing_weights() or not refitter.refit():
        report["reason"] = "; ".join(refitter.errors) or "the refitter reported missing weights"
        return report
    got = engine.run([inp])[0]
    if not torch.allclose(got, expected(new_kernel, bias), atol=1e-5):
        report["reason"] = f"refit had no effect or a wrong one: max abs error " \
                           f"{float((got - expected(new_kernel, bias)).abs().max()):.3g}"
        return report
    report.update(ok=True, stage="done")
    return report


def main() -> int:
    report: dict = {"ok": False, "stage": "start"}
    try:
        _child(report)
    except BaseException as err:  # report any failure, whatever it is, as data (the stage says where)
        said = getattr(err, "tensorrt_messages", None)
        report.update(ok=False, reason="; ".join(said) if said else f"{type(err).__name__}: {err}")
    _emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
