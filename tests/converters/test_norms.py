"""GroupNorm (TensorRT's grouped normalization + a refittable per-channel affine), InstanceNorm and
RMSNorm: affine parameters are refittable constants."""
import pytest
import torch
from torch import nn

from .harness import check_converter


class After(nn.Module):
    def __init__(self, norm, c=4, conv=nn.Conv2d):
        super().__init__()
        self.conv = conv(3, c, 1)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("model, shape", [
    pytest.param(After(nn.GroupNorm(2, 4)), (2, 3, 5, 5), id="group_norm_2_groups"),
    pytest.param(After(nn.GroupNorm(1, 4, eps=1e-3)), (1, 3, 5, 5), id="group_norm_1_group_poolformer"),
    pytest.param(After(nn.GroupNorm(4, 4, affine=False)), (1, 3, 5, 5), id="group_norm_no_affine"),
    pytest.param(After(nn.GroupNorm(3, 6), 6, nn.Conv3d), (1, 3, 2, 3, 3), id="group_norm_3d"),
    pytest.param(After(nn.InstanceNorm2d(4, affine=True)), (2, 3, 5, 5), id="instance_norm_affine"),
    pytest.param(After(nn.InstanceNorm1d(4), 4, nn.Conv1d), (2, 3, 7), id="instance_norm_1d_no_affine"),
])
def test_norm_matches_eager_and_refits(model, shape):
    check_converter(model, torch.randn(shape))


class Rms(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.RMSNorm([6], **kw)

    def forward(self, x):
        return self.norm(self.fc(x))


@pytest.mark.parametrize("kw", [pytest.param({}, id="default_eps"), pytest.param({"eps": 1e-3}, id="eps"),
                                pytest.param({"elementwise_affine": False}, id="no_weight")])
def test_rms_norm_matches_eager_and_refits(kw):
    check_converter(Rms(**kw), torch.randn(2, 3, 4))


def test_group_norm_affine_is_refittable():
    engine = check_converter(After(nn.GroupNorm(2, 4)), torch.randn(1, 3, 4, 4))
    keys = {s.inputs["x"].get("key") for s in engine.weight_map.sources.values() if "x" in s.inputs}
    assert {"norm.weight", "norm.bias"} <= keys
