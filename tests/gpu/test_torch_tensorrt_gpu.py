"""Torch-TensorRT's own engines on a GPU (compiler='torch_tensorrt', backend='tensorrt'): compiled with
``torch_tensorrt.dynamo.compile``, refitted with ``refit_module_weights``, every weight read back off the
engines with TensorRT's Refitter and audited exactly against the CPU harness's witness. Marked ``gpu``;
skipped with the reason where there is no CUDA device or no usable Torch-TensorRT."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import refitcore
from refitcore.engine import torch_tensorrt as ttrt, torch_tensorrt_api

pytestmark = pytest.mark.gpu

# fp32 with TF32 off where the compile settings allow it: TensorRT's kernels still differ from eager in summation order.
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def torch_tensorrt_gpu():
    if not torch.cuda.is_available():
        pytest.skip("Torch-TensorRT's own engines need a CUDA GPU and torch.cuda.is_available() is False here")
    ok, why = torch_tensorrt_api.available()
    if not ok:
        pytest.skip(f"Torch-TensorRT is not usable here: {why}")
    return why


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def seeded(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _close(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL), float((a - b).abs().max())


def test_compile_and_refit_through_the_public_api(torch_tensorrt_gpu):
    engine = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)
    assert isinstance(engine.impl, ttrt.TorchTensorRTGpuImpl)
    with torch.no_grad():
        ok, err = _close(engine(X), seeded(0)(X))
    assert ok, f"engine vs eager max abs error {err:.3g}"
    new = seeded(1)
    result = refitcore.refit(engine, new, path="fallback", verify_inputs=[X], rtol=RTOL, atol=ATOL)
    assert result, str(result)
    with torch.no_grad():
        ok, err = _close(result.engine(X), new(X))
    assert ok, f"refitted engine vs eager max abs error {err:.3g}"
    witness = refitcore.fallback_mapping(engine, new)
    held = result.engine.impl.current_weights()
    assert held.keys() == witness.keys()
    assert all(np.array_equal(held[k], witness[k]) for k in held), [k for k in held
                                                                   if not np.array_equal(held[k], witness[k])]


def test_a_weight_left_stale_on_the_engine_is_named(torch_tensorrt_gpu, monkeypatch):
    engine = refitcore.compile(seeded(0), X, compiler="torch_tensorrt", backend="tensorrt", min_block_size=1)
    stale = next(n for n in engine.weight_names if n.startswith(ttrt.ACC) and "fc" in n)
    api = torch_tensorrt_api.load()
    refit = api.refit_module

    def leaves_one_stale(compiled, new_program, inputs):   # refit, then put the old value of one weight back
        refitted = refit(compiled, new_program, inputs)
        segment, name = ttrt.split_weight_name(stale)
        old = engine.impl.current_weights()[stale]
        target = api.cuda_engine(segment, refitted.get_submodule(segment))
        assert not api.write_engine(target, {name: np.ascontiguousarray(old.reshape(-1))})
        return refitted

    monkeypatch.setattr(api, "refit_module", leaves_one_stale)
    result = refitcore.refit(engine, seeded(1), path="fallback", verify_inputs=[X])
    assert not result and stale in {d.name for d in result.audit.failures}, str(result.audit)
