"""The child side of the TensorRT capability probe (:mod:`.tensorrt_probe`), run as
``python -m refitcore.backends.tensorrt_probe_child``: prints one report line and exits 0.

It builds a one-layer network (a 1x1 convolution with named weights) with REFIT through
:mod:`.tensorrt_build`, deserializes and runs it through :class:`.tensorrt.TensorRTEngine`,
refits the kernel through the real adapter, and checks both answers against torch. The report's
``stage`` says how far it got.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from refitcore import _trt
from refitcore.backends.tensorrt import TensorRTEngine
from refitcore.backends.tensorrt_build import build_plan
from refitcore.backends.tensorrt_probe import REPORT_MARK
from refitcore.backends.tensorrt_refit import make_error_recorder

__all__ = ["main"]


def _emit(report: dict) -> None:
    sys.stdout.write(REPORT_MARK + json.dumps(report) + "\n")
    sys.stdout.flush()


def _child(report: dict) -> dict:
    report["stage"] = "import"
    t = _trt.trt()
    report.update(flavour=_trt.flavour(), version=_trt.version())

    report["stage"] = "find a CUDA device for"
    if not torch.cuda.is_available():
        report["reason"] = "torch.cuda.is_available() is False"
        return report
    cap = torch.cuda.get_device_capability()
    report.update(device=torch.cuda.get_device_name(), cc=f"{cap[0]}.{cap[1]}")

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
        return torch.nn.functional.conv2d(inp, torch.from_numpy(k).reshape(2, 2, 1, 1).cuda(),
                                          torch.from_numpy(b).cuda())

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
    except BaseException as err:  # noqa: BLE001 - report any failure, whatever it is, as data (the stage says where)
        said = getattr(err, "tensorrt_messages", None)
        report.update(ok=False, reason="; ".join(said) if said else f"{type(err).__name__}: {err}")
    _emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
