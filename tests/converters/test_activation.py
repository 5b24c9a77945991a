"""Activations: softmax, log_softmax, hard/SiLU gates and the squeeze-excitation product."""
import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from .harness import Proj, check_converter


@pytest.mark.parametrize("act", [
    pytest.param(nn.Softmax(dim=-1), id="softmax_last"),
    pytest.param(nn.Softmax(dim=1), id="softmax_dim1"),
    pytest.param(nn.Hardswish(), id="hardswish"),
    pytest.param(nn.Hardsigmoid(), id="hardsigmoid"),
    pytest.param(nn.SiLU(), id="silu"),
    pytest.param(nn.Sigmoid(), id="sigmoid"),
    pytest.param(nn.GELU(approximate="tanh"), id="gelu_tanh"),
    pytest.param(nn.ReLU6(), id="relu6"),
    pytest.param(nn.LogSoftmax(dim=-1), id="log_softmax_last"),
    pytest.param(nn.LogSoftmax(dim=1), id="log_softmax_dim1"),
])
def test_activation_matches_eager_and_refits(act):
    check_converter(Proj(act, d=6), torch.randn(2, 3, 6) * 3)


class SEBlock(nn.Module):
    """MobileNetV3/EfficientNet: conv, BatchNorm (eps 1e-3), hardswish, squeeze-excitation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)
        self.se = SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid)

    def forward(self, x):
        return self.se(nn.functional.hardswish(self.bn(self.conv(x))))


def test_squeeze_excitation_matches_eager_and_refits():
    check_converter(SEBlock(), torch.randn(1, 3, 8, 8))


def test_log_softmax_stays_finite_where_softmax_underflows():
    """Logits 200 apart: exp underflows to 0 in float32, so log(softmax) would be -inf; PyTorch's
    shifted form is finite (-200), and so is the engine's."""
    engine = check_converter(Proj(lambda y: torch.log_softmax(y * 100, dim=-1)), torch.randn(2, 3, 4) * 3)
    x = torch.tensor([[[1.0, -1.0, 0.0, 0.0]]]).expand(2, 3, 4).contiguous()
    out = engine(x)
    assert torch.isfinite(out).all(), out


def test_underscore_log_softmax_converts():
    """aten._log_softmax.default (what some decompositions leave) takes the same converter."""
    check_converter(Proj(lambda y: torch.ops.aten._log_softmax.default(y, 1, False)), torch.randn(2, 3, 4))
