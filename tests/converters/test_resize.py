"""Upsampling as IResizeLayer: nearest (FLOOR rounding), nearest-exact, linear/bilinear/trilinear
with align_corners both ways, by size and by whole scale factors; DeepLab-style segmentation head;
grid_sample (IGridSampleLayer) in every mode and padding mode it supports."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .harness import check_converter


class Up(nn.Module):
    def __init__(self, conv, **kw):
        super().__init__()
        self.conv = conv
        self.kw = kw

    def forward(self, x):
        return F.interpolate(self.conv(x), **self.kw)


C2, C1, C3 = nn.Conv2d(3, 2, 1), nn.Conv1d(3, 2, 1), nn.Conv3d(3, 2, 1)


@pytest.mark.parametrize("conv, shape, kw", [
    pytest.param(C2, (1, 3, 4, 5), dict(scale_factor=2, mode="nearest"), id="nearest_x2"),
    pytest.param(C2, (1, 3, 4, 5), dict(size=(7, 3), mode="nearest"), id="nearest_size_up_down"),
    pytest.param(C2, (1, 3, 5, 5), dict(size=(8, 12), mode="nearest-exact"), id="nearest_exact_size"),
    pytest.param(C1, (1, 3, 5), dict(scale_factor=3, mode="nearest"), id="nearest_1d"),
    pytest.param(C3, (1, 3, 2, 3, 3), dict(size=(3, 5, 4), mode="nearest"), id="nearest_3d"),
    pytest.param(C2, (1, 3, 4, 4), dict(scale_factor=1.5, mode="bilinear"), id="bilinear_x1.5"),
    pytest.param(C2, (2, 3, 5, 4), dict(size=(9, 7), mode="bilinear", align_corners=True), id="bilinear_align"),
    pytest.param(C2, (1, 3, 5, 6), dict(size=(3, 2), mode="bilinear"), id="bilinear_down"),
    pytest.param(C2, (1, 3, 5, 6), dict(size=(1, 4), mode="bilinear", align_corners=True), id="bilinear_align_1px"),
    pytest.param(C1, (1, 3, 5), dict(size=11, mode="linear", align_corners=True), id="linear_1d"),
    pytest.param(C3, (1, 3, 2, 3, 3), dict(scale_factor=2, mode="trilinear"), id="trilinear"),
])
def test_resize_matches_eager_and_refits(conv, shape, kw):
    check_converter(Up(conv, **kw), torch.randn(shape))


def test_segmentation_head_upsamples_to_the_input():
    from torchvision.models.segmentation.lraspp import LRASPPHead

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.low = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.high = nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.head = LRASPPHead(4, 6, 3, 8)

        def forward(self, x):
            low = self.low(x)
            out = self.head({"low": low, "high": self.high(low)})
            return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    check_converter(Seg(), torch.randn(1, 3, 16, 16))


class Warp(nn.Module):
    """A conv, then grid_sample of its output at a grid that is an input (optical-flow warping) or
    a projection of it (a learned sampling grid: refittable)."""

    def __init__(self, learned: bool = False, **kw):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.offset = nn.Linear(2, 2) if learned else None
        self.kw = kw

    def forward(self, x, grid):
        if self.offset is not None:
            grid = torch.tanh(self.offset(grid))
        return F.grid_sample(self.conv(x), grid, **self.kw)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["no_align", "align"])
def test_grid_sample_matches_eager_and_refits(mode, padding_mode, align_corners):
    torch.manual_seed(0)
    grid = torch.rand(2, 5, 3, 2) * 2.6 - 1.3   # beyond [-1, 1]: padding matters
    check_converter(Warp(mode=mode, padding_mode=padding_mode, align_corners=align_corners),
                    torch.randn(2, 3, 4, 6), grid)


def test_grid_sample_at_a_learned_grid_refits():
    check_converter(Warp(learned=True, align_corners=False), torch.randn(1, 3, 5, 5), torch.randn(1, 4, 4, 2))
