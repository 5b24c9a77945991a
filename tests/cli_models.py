"""Tiny model factories for the ``trtrefit`` CLI tests (importable as ``tests.cli_models:<name>``)."""
from __future__ import annotations

import torch
from torch import nn

from pytest_trtrefit.strategies import weight_set

__all__ = ["small_net", "other_net", "small_net_gelu", "randomized_state"]


class SmallNet(nn.Module):
    """conv + BatchNorm + ReLU + pooling + linear: a 1x3x32x32 classifier in a few thousand weights."""

    def __init__(self, width: int = 8, classes: int = 5, act=torch.relu):
        super().__init__()
        self.act = act
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


def other_net() -> nn.Module:
    """Another architecture (wider): its checkpoints do not fit an engine compiled from small_net."""
    torch.manual_seed(0)
    return SmallNet(width=12).eval()


def small_net_gelu() -> nn.Module:
    """The same parameters as small_net (same keys and shapes) but another graph (GELU for ReLU)."""
    torch.manual_seed(0)
    return SmallNet(act=nn.functional.gelu).eval()


def randomized_state(seed: int, factory=small_net) -> dict[str, torch.Tensor]:
    """A full state_dict of new random weights, BatchNorm statistics included (integer buffers as
    the factory's)."""
    return dict(weight_set(factory(), seed=seed, keep_integers=True))
