"""Converters at fp16 and bf16: every floating tensor of the network has the engine's type except
the float32 parts (normalization, softmax, accumulating reductions), the outputs keep the model's
type, the result matches eager in the engine's dtype, and the cached and fallback mappings agree
exactly (docs/precision.md)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import refitcore
from refitcore.conversion.network_reader import read_network
from refitcore.refitting.audit import audit_paths
from refitcore.refitting.mapping import cached_mapping, fallback_mapping
from tests.converters.harness import Proj, random_weights

F = nn.functional
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp16": 5e-3, "bf16": 3e-2}     # relative to the output's largest magnitude (tests/test_precision.py)
FP32_LAYERS = {"SOFTMAX", "NORMALIZATION", "CUMULATIVE"}   # and REDUCE SUM/AVG/PROD


def _conv_bn():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].running_mean.normal_()
    return m, torch.randn(1, 3, 6, 6)


CASES = {
    "softmax": lambda: (Proj(lambda y: torch.softmax(y * 3, -1)), torch.randn(2, 4)),
    "log_softmax": lambda: (Proj(lambda y: torch.log_softmax(y, -1)), torch.randn(2, 4)),
    "layer_norm": lambda: (Proj(nn.LayerNorm(4)), torch.randn(2, 3, 4)),
    "rms_norm": lambda: (Proj(nn.RMSNorm(4)), torch.randn(2, 3, 4)),
    "group_norm": lambda: (nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)), torch.randn(1, 4, 3, 3)),
    "instance_norm": lambda: (nn.Sequential(nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4, affine=True)),
                              torch.randn(1, 4, 3, 3)),
    "sum_mean_norm": lambda: (Proj(lambda y: y.sum(-1) + y.mean(-1) + torch.linalg.vector_norm(y, dim=-1)),
                              torch.randn(2, 3, 4)),
    "cumsum": lambda: (Proj(lambda y: torch.cumsum(y, -1)), torch.randn(2, 4)),
    "conv_bn_relu": _conv_bn,
    "conv_transpose": lambda: (nn.ConvTranspose2d(3, 2, 3, stride=2), torch.randn(1, 3, 4, 4)),
    "attention_masked": lambda: (Proj(lambda y: F.scaled_dot_product_attention(
        y, y, y, attn_mask=torch.ones(3, 3, dtype=torch.bool).tril())), torch.randn(1, 3, 4)),
    "gelu_matmul": lambda: (Proj(lambda y: F.gelu(y) @ y.transpose(-1, -2)), torch.randn(2, 3, 4)),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_converter_at_reduced_precision(case, precision):
    dt = DTYPES[precision]
    torch.manual_seed(0)
    model, x = CASES[case]()
    model = random_weights(model.eval(), 0)
    engine = refitcore.compile(model, x, backend="reference", precision=precision, strict=True)
    out = engine(x)
    assert out.dtype == torch.float32                      # the model's type at the boundary
    with torch.no_grad():
        want = copy.deepcopy(model).to(dt)(x.to(dt)).float()
    assert _rel(out, want) < TOL[precision], case

    layers = engine.impl.plan["layers"]
    types = {t["name"]: t["dtype"] for layer in layers for t in layer["outputs"]}
    types.update({t["name"]: t["dtype"] for t in engine.impl.plan["inputs"]})
    narrow = {"fp16": "HALF", "bf16": "BF16"}[precision]
    seen = set()
    for layer in layers:
        ins = [types[n] for n in layer["inputs"] if n is not None and types[n] in ("FLOAT", "HALF", "BF16")]
        if not ins or layer["type"] == "CAST":
            continue
        assert len(set(ins)) == 1, (layer["name"], ins)          # strongly typed: one float type per layer
        seen.update(ins)
        fp32_op = layer["type"] in FP32_LAYERS or (layer["type"] == "REDUCE"
                                                   and layer["attrs"]["op"] in ("SUM", "AVG", "PROD"))
        if fp32_op:
            assert ins[0] == "FLOAT", (layer["name"], layer["type"], ins)   # statistics and sums in float32
    assert narrow in seen
    stored = {str(a.dtype) for a in engine.impl.current_weights().values()}
    assert stored <= {"float16", "uint16", "float32"} and stored & {"float16", "uint16"}

    new = random_weights(model, 1)
    assert audit_paths(cached_mapping(engine.weight_map, new), fallback_mapping(engine, new)).ok
    refitted = refitcore.refit(engine, new, path="cached").engine
    with torch.no_grad():
        want = copy.deepcopy(new).to(dt)(x.to(dt)).float()
    assert _rel(refitted(x), want) < TOL[precision], case


def test_fp32_networks_are_strongly_typed_and_unchanged_in_type():
    """fp32 compiles keep every floating tensor FLOAT (no casts added)."""
    model, x = _conv_bn()
    engine = refitcore.compile(model.eval(), x, backend="reference")
    assert all(t["dtype"] in ("FLOAT", "INT32", "INT64", "BOOL")
               for layer in engine.impl.plan["layers"] for t in layer["outputs"])
    assert not any(layer["type"] == "CAST" for layer in engine.impl.plan["layers"])


def test_bf16_weights_without_a_host_copy_are_refused_by_the_reader():
    """TensorRT's Python API cannot read BF16 weights back: the reader needs the converter's record."""
    from refitcore.conversion.convert import convert

    ep = torch.export.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    result = convert(ep, precision="bf16")
    with pytest.raises(RuntimeError, match="BF16 weights"):
        read_network(result.network)
    plan = read_network(result.network, result.weights)
    assert any(w.dtype.name == "uint16" for layer in plan["layers"] for w in layer["weights"].values())
