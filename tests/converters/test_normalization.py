"""Normalization: LayerNorm over channels-last with permutes (ConvNeXt), BatchNorm eps 1e-3 folded
and unfolded, stochastic depth and dropout in eval."""
import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.ops import StochasticDepth

from .harness import check_converter


class BnEps(nn.Module):
    """eps 1e-3: one BatchNorm folded into its conv, one that cannot be (its input feeds two users)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        self.bn2 = nn.BatchNorm2d(4, eps=1e-3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.bn2(y), StochasticDepth(0.5, "row").eval()(y), nn.Dropout(0.3).eval()(y)


@pytest.mark.parametrize("model", [
    pytest.param(CNBlock(4, layer_scale=1e-6 * 1e5, stochastic_depth_prob=0.1), id="convnext_block"),
    pytest.param(nn.Sequential(nn.Conv2d(3, 4, 1), LayerNorm2d(4)), id="layernorm2d_permutes"),
    pytest.param(BnEps(), id="batchnorm_eps_1e-3"),
])
def test_normalization_matches_eager_and_refits(model):
    x = torch.randn(1, 3 if not isinstance(model, CNBlock) else 4, 6, 6)
    check_converter(model, x)
