"""Unsupported operators: one error listing every unsupported call of the model, found in one pass,
each with its ATen target and module path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import refitcore


class LogCumSumExp(nn.Module):
    def forward(self, x):
        return torch.logcumsumexp(x, dim=1)


class Spectrum(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x, dim=-1).real


class Bessel(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


class ManyUnsupported(nn.Module):
    """Supported layers (conv, ReLU) around three kinds of unsupported op; one of them called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.spec = Spectrum()
        self.blocks = nn.Sequential(nn.ReLU(), Bessel())
        self.head = LogCumSumExp()

    def forward(self, x):
        y = self.spec(self.conv(x))
        y = self.blocks(y)
        return self.head(self.head(y))


def test_every_unsupported_op_is_listed_in_one_pass():
    """strict=True: a model that does not convert whole is refused (without it, those ops run in PyTorch)."""
    model = ManyUnsupported().eval()
    with pytest.raises(refitcore.UnsupportedOperatorError) as info:
        refitcore.compile(model, torch.randn(1, 3, 8, 8), backend="reference", strict=True)
    err = info.value
    found = {(target.split(" ")[0], path) for target, path, _node in err.ops}
    assert ("aten.logcumsumexp.default", "head") in found
    assert any("i0" in t and p == "blocks.1" for t, p in found), found
    assert any("fft" in t and p == "spec" for t, p in found), found
    # The module called twice is listed twice (two calls, two nodes).
    assert sum(1 for t, p, _ in err.ops if t.startswith("aten.logcumsumexp")) == 2
    nodes = [n for _, _, n in err.ops]
    assert len(nodes) == len(set(nodes))
    # Supported ops are not listed.
    assert not any("conv" in t or "relu" in t for t, _, _ in err.ops), err.ops
    text = str(err)
    for target, path, node in err.ops:
        assert target in text and f"at {path}" in text and node in text
    assert "converter" in text  # says what to do


def test_unsupported_error_is_a_refitcore_error():
    assert issubclass(refitcore.UnsupportedOperatorError, refitcore.RefitCoreError)


def test_supported_model_raises_nothing():
    """The check is not trigger-happy: the same model without the unsupported ops compiles."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    engine = refitcore.compile(model, torch.randn(1, 3, 8, 8), backend="reference")
    assert len(engine.weight_names) == 2


def test_unsupported_ops_run_in_pytorch_without_strict():
    """The default partitions: the same model compiles, its unsupported ops run in PyTorch, listed with
    their module paths, and it matches eager."""
    torch.manual_seed(0)
    model = ManyUnsupported().eval()
    x = torch.randn(1, 3, 8, 8)
    engine = refitcore.compile(model, x, backend="reference")
    fallen = {(op, path) for op, path, _reason in engine.partition.fallback.values()}
    assert ("aten.logcumsumexp.default", "head") in fallen
    assert any("i0" in op and path == "blocks.1" for op, path in fallen), fallen
    with torch.no_grad():
        torch.testing.assert_close(engine(x), model(x), rtol=1e-5, atol=1e-5)
