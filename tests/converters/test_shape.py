"""Reshapes and data movement: roll, constant padding, stack, channel shuffle, shape-only masks."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.shufflenetv2 import channel_shuffle

from .harness import Proj, check_converter


def swin_mask(x):
    """Swin's shifted-window mask: built with new_zeros and slice assignment from shapes only."""
    mask = x.new_zeros((x.shape[1], x.shape[2]))
    mask[:2, :] = 1.0
    mask[:, 3:] += 2.0
    return x + mask.unsqueeze(-1).masked_fill(mask.unsqueeze(-1) != 0, -100.0)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y: torch.roll(y, shifts=(-2, 3), dims=(1, 2)), id="roll_two_axes"),
    pytest.param(lambda y: torch.roll(y, shifts=1, dims=-1), id="roll_last"),
    pytest.param(lambda y: F.pad(y, (0, 0, 1, 2, 0, 3)), id="pad_zero_inner_axes"),
    pytest.param(lambda y: F.pad(y, (1, 1), value=2.5), id="pad_value"),
    pytest.param(lambda y: F.pad(y, (0, 0, -1, 0)), id="pad_negative_crops"),
    pytest.param(lambda y: torch.stack([y, 2 * y], dim=1), id="stack"),
    pytest.param(lambda y: channel_shuffle(y.permute(0, 3, 1, 2), 2), id="channel_shuffle"),
    pytest.param(swin_mask, id="shape_only_mask"),
    pytest.param(lambda y: torch.cat([y.new_ones(y.shape), y], dim=2), id="new_ones_cat"),
    # torch.cat skips a 1-D empty tensor (a transformers DynamicCache's first update)
    pytest.param(lambda y: torch.cat([torch.tensor([], device=y.device), y], dim=-2), id="cat_onto_empty"),
])
def test_shape_op_matches_eager_and_refits(fn):
    check_converter(Proj(fn), torch.randn(1, 5, 6, 4))
