"""Upsampling as IResizeLayer: nearest (FLOOR rounding), nearest-exact, linear/bilinear/trilinear
with align_corners both ways, by size and by whole scale factors; DeepLab-style segmentation head."""
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
