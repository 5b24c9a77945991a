"""1-D and 3-D pooling (1-D runs as 2-D over (L, 1)) and adaptive average pooling 1-D/3-D."""
import pytest
import torch
from torch import nn

from .harness import check_converter


def after(conv, pool):
    return nn.Sequential(conv, pool)


C1, C3 = (lambda: nn.Conv1d(3, 4, 1)), (lambda: nn.Conv3d(3, 4, 1))


@pytest.mark.parametrize("model, shape", [
    pytest.param(after(C1(), nn.MaxPool1d(3, 2, 1)), (1, 3, 9), id="max_pool1d"),
    pytest.param(after(C1(), nn.MaxPool1d(2, ceil_mode=True)), (1, 3, 7), id="max_pool1d_ceil"),
    pytest.param(after(C1(), nn.AvgPool1d(3, 2, 1, count_include_pad=False)), (2, 3, 8), id="avg_pool1d_excl_pad"),
    pytest.param(after(C1(), nn.AdaptiveAvgPool1d(3)), (1, 3, 7), id="adaptive_avg1d_uneven"),
    pytest.param(after(C1(), nn.AdaptiveAvgPool1d(1)), (1, 3, 7), id="adaptive_avg1d_global"),
    pytest.param(after(C1(), nn.AdaptiveAvgPool1d(2)), (1, 3, 8), id="adaptive_avg1d_even"),
    pytest.param(after(C3(), nn.MaxPool3d(2)), (1, 3, 4, 4, 4), id="max_pool3d"),
    pytest.param(after(C3(), nn.AvgPool3d(2, padding=1)), (1, 3, 3, 4, 4), id="avg_pool3d_pad"),
    pytest.param(after(C3(), nn.AdaptiveAvgPool3d(1)), (1, 3, 2, 4, 4), id="adaptive_avg3d_global"),
    pytest.param(after(C3(), nn.AdaptiveAvgPool3d((1, 2, 2))), (1, 3, 2, 4, 4), id="adaptive_avg3d_even"),
])
def test_pooling_matches_eager_and_refits(model, shape):
    check_converter(model, torch.randn(shape))
