"""Pooling: ceil_mode (PyTorch's last-window rule), padding counted or not, adaptive windows."""
import pytest
import torch
from torch import nn

from .harness import check_converter


class ConvPool(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        return self.pool(self.conv(x))


@pytest.mark.parametrize("pool, size", [
    pytest.param(nn.MaxPool2d(3, 2, ceil_mode=True), 13, id="max_ceil_extra_window"),
    pytest.param(nn.MaxPool2d(2, 2, ceil_mode=True), 7, id="max_ceil_odd"),
    pytest.param(nn.MaxPool2d(3, 2, 1, ceil_mode=True), 6, id="max_ceil_last_window_in_padding_dropped"),
    pytest.param(nn.MaxPool2d(3, 2, ceil_mode=True), 9, id="max_ceil_equals_floor"),
    pytest.param(nn.AvgPool2d(3, 2, ceil_mode=True), 6, id="avg_ceil_no_padding"),
    pytest.param(nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), 6, id="avg_ceil_exclude_pad"),
    pytest.param(nn.AvgPool2d(3, 1, 1), 6, id="avg_count_include_pad"),
    pytest.param(nn.AvgPool2d(3, 1, 1, count_include_pad=False), 6, id="avg_count_exclude_pad"),
    pytest.param(nn.AdaptiveAvgPool2d((3, 2)), 7, id="adaptive_uneven"),
    pytest.param(nn.AdaptiveAvgPool2d(2), 8, id="adaptive_even"),
    pytest.param(nn.AdaptiveAvgPool2d(1), 5, id="adaptive_global"),
])
def test_pooling_matches_eager_and_refits(pool, size):
    check_converter(ConvPool(pool), torch.randn(1, 3, size, size))
