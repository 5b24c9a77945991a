"""Does TensorRT's builder accept the networks we construct? Builds a list of small networks (static
ones, and dynamic-shape ones with their optimization profiles) through the tensorrt backend's build
path (``BuilderFlag.REFIT``, strict fp32) and prints one line per network::

    name  OK|REFUSED  build seconds  error

Run on a machine with a CUDA GPU and a TensorRT Python API (``tensorrt`` or ``tensorrt_rtx``)::

    python scripts/gpu_builder_check.py [--only tiny_resnet_batch,attention_seq] [--json out.json]

Only the build is checked: no engine is deserialized or run (TensorRT-RTX builds plans on compute
capability 9.0 GPUs but refuses to run them). Exit status 0 when every network built, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[], tuple[Any, tuple]]      # -> (model, example inputs)
    dynamic_shapes: Any = None
    profiles: Any = None
    precision: str = "fp32"


def _cases() -> list[Case]:
    import torch

    from refitcore.capture.shapes import DimRange
    from tests.converters.test_recurrent import TextClassifier
    from tests.dynamic_models import BATCH, SEQ, BertHidden, Flat, TinyAttention, TinyResNet

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(4, 6, batch_first=True, bidirectional=True)
            self.rnn = torch.nn.RNN(12, 5, nonlinearity="relu", num_layers=2)

        def forward(self, x):
            y, _ = self.gru(x)
            z, _ = self.rnn(y.transpose(0, 1))
            return z

    class GridSample(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x, grid):
            return torch.nn.functional.grid_sample(self.conv(x), grid, mode="bilinear", padding_mode="zeros",
                                                   align_corners=False)

    class PaddedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    def seeded(fn):
        def make():
            torch.manual_seed(0)
            return fn()
        return make

    conv_bn = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),  # noqa: E731
                                          torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 4))
    return [
        Case("conv_bn_static", seeded(lambda: (conv_bn().eval(), (torch.randn(1, 3, 16, 16),)))),
        Case("tiny_resnet_static", seeded(lambda: (TinyResNet().eval(), (torch.randn(2, 3, 16, 16),)))),
        Case("tiny_resnet_batch", seeded(lambda: (TinyResNet().eval(), (torch.randn(2, 3, 16, 16),))),
             {0: {0: BATCH}}),
        Case("flat_reshape_batch", seeded(lambda: (Flat().eval(), (torch.randn(2, 3, 4),))), {0: {0: (1, 16)}}),
        Case("linear_two_profiles", seeded(lambda: (torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(),
                                                    (torch.randn(2, 4),))),
             {0: {0: (1, 16)}}, [{0: {0: (1, 2, 4)}}, {0: {0: (8, 12, 16)}}]),
        Case("attention_seq", seeded(lambda: (TinyAttention().eval(), (torch.randn(2, 8, 16),))),
             {0: {1: SEQ}}),
        Case("attention_batch_and_seq", seeded(lambda: (TinyAttention().eval(), (torch.randn(2, 8, 16),))),
             {0: {0: (1, 4), 1: SEQ}}),
        Case("bert_padding_mask_seq", seeded(lambda: (BertHidden().eval(), (torch.randint(0, 100, (2, 8)),
                                                                             torch.ones(2, 8, dtype=torch.long)))),
             {0: {1: DimRange(*SEQ, name="seq")}, 1: {1: DimRange(*SEQ, name="seq")}}),
        # strongly typed reduced-precision networks (weights stored in the engine's type)
        Case("conv_bn_fp16", seeded(lambda: (conv_bn().eval(), (torch.randn(1, 3, 16, 16),))), precision="fp16"),
        Case("conv_bn_bf16", seeded(lambda: (conv_bn().eval(), (torch.randn(1, 3, 16, 16),))), precision="bf16"),
        Case("tiny_resnet_batch_fp16", seeded(lambda: (TinyResNet().eval(), (torch.randn(2, 3, 16, 16),))),
             {0: {0: BATCH}}, precision="fp16"),
        Case("attention_seq_bf16", seeded(lambda: (TinyAttention().eval(), (torch.randn(2, 8, 16),))),
             {0: {1: SEQ}}, precision="bf16"),
        Case("bert_padding_mask_fp16", seeded(lambda: (BertHidden().eval(), (torch.randint(0, 100, (2, 8)),
                                                                              torch.ones(2, 8, dtype=torch.long)))),
             precision="fp16"),
        # layers added since the last check: unrolled recurrences, grid sample, -inf masks
        Case("lstm_text_classifier", seeded(lambda: (TextClassifier().eval(), (torch.randint(0, 20, (3, 7)),)))),
        Case("gru_relu_rnn", seeded(lambda: (Recurrent().eval(), (torch.randn(2, 5, 4),)))),
        Case("grid_sample", seeded(lambda: (GridSample().eval(), (torch.randn(1, 2, 6, 6),
                                                                          torch.rand(1, 4, 4, 2) * 2 - 1)))),
        Case("mha_key_padding_mask", seeded(lambda: (PaddedAttention().eval(), (
            torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))))),
    ]




def check(case: Case) -> dict:
    """Export, convert and build ``case`` (the steps of ``refitcore.compile`` up to the plan)."""
    from refitcore import _trt
    from refitcore.backends.tensorrt_build import build_plan
    from refitcore.backends.tensorrt_refit import make_error_recorder
    from refitcore.capture.lowering import export_model, input_names, plan_fusions
    from refitcore.capture.shapes import export_example, resolve_dynamic_shapes
    from refitcore.conversion.convert import convert

    row: dict = {"name": case.name, "ok": False, "build_s": None, "error": ""}
    try:
        model, examples = case.make()
        export_ds, profiles = resolve_dynamic_shapes(model, examples, case.dynamic_shapes, profiles=case.profiles)
        ep = export_model(model, export_example(examples, profiles), dynamic_shapes=export_ds)
        if profiles is not None:
            profiles = dataclasses.replace(profiles, input_names=tuple(input_names(ep)))
            row["profiles"] = profiles.to_json()["profiles"]
        result = convert(ep, fusion=plan_fusions(ep.graph_module), profiles=profiles, precision=case.precision)
        row["layers"] = int(result.network.num_layers)
        row["precision"] = case.precision
        t0 = time.perf_counter()
        pb = build_plan(result.builder, result.network, refit=True, recorder=make_error_recorder(_trt.trt()),
                        profiles=profiles, precision=case.precision)
        row.update(ok=True, build_s=round(pb.seconds, 3), plan_bytes=pb.nbytes,
                   network_supported=pb.network_supported)
    except Exception as err:  # noqa: BLE001 - every refusal is a row of the report
        row["build_s"] = round(time.perf_counter() - t0, 3) if "t0" in locals() else None
        row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from refitcore import _trt

    if not _trt.available():
        print("no TensorRT Python API (tensorrt or tensorrt_rtx) importable here", file=sys.stderr)
        return 2
    print(f"# {_trt.flavour()} {_trt.version()}")
    cases = _cases()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    rows = []
    for case in cases:
        row = check(case)
        rows.append(row)
        seconds = "-" if row["build_s"] is None else f"{row['build_s']:.2f}s"
        print(f"{row['name']:<26} {'OK' if row['ok'] else 'REFUSED':<8} {seconds:>8}  {row['error']}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
