"""Convolutions 1-D/3-D and transposed convolutions (groups, output_padding, dilation), with a
following BatchNorm folded in: into a transposed convolution it folds along axis 1 of the
(in, out/groups, k...) kernel, per group."""
import pytest
import torch
from torch import nn

from .harness import check_converter


def _bn(conv, c):
    return nn.Sequential(conv, nn.BatchNorm1d(c) if isinstance(conv, (nn.Conv1d, nn.ConvTranspose1d)) else
                         nn.BatchNorm3d(c) if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) else nn.BatchNorm2d(c))


@pytest.mark.parametrize("model, shape", [
    pytest.param(nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (1, 4, 9), id="conv1d"),
    pytest.param(_bn(nn.Conv1d(4, 6, 3, padding=1), 6), (2, 4, 7), id="conv1d_bn"),
    pytest.param(_bn(nn.Conv3d(3, 4, 3, padding=1, bias=False), 4), (1, 3, 3, 4, 4), id="conv3d_bn"),
    pytest.param(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (1, 4, 5, 5),
                 id="convT2d_output_padding"),
    pytest.param(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), (1, 4, 4, 5),
                 id="convT2d_groups_dilation"),
    pytest.param(nn.ConvTranspose1d(4, 2, 4, stride=3, padding=2, output_padding=2), (1, 4, 6), id="convT1d"),
    pytest.param(nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2, bias=False), (1, 2, 2, 3, 3), id="convT3d_groups"),
    pytest.param(_bn(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), 6), (1, 4, 5, 5), id="convT2d_bn"),
    pytest.param(_bn(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), 6), (2, 4, 3, 3),
                 id="convT2d_grouped_bn"),
    pytest.param(_bn(nn.ConvTranspose1d(6, 4, 3, groups=2), 4), (1, 6, 5), id="convT1d_grouped_bn"),
])
def test_conv_matches_eager_and_refits(model, shape):
    check_converter(model, torch.randn(shape))


def test_batchnorm_after_transposed_conv_folds_along_axis_1():
    model = _bn(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), 6)
    engine = check_converter(model, torch.randn(1, 4, 3, 3))
    kernels = [s for s in engine.weight_map.sources.values() if s.recipe == "bn_fold_kernel"]
    assert len(kernels) == 1 and kernels[0].params == {"eps": 1e-5, "axis": 1, "groups": 2}
    assert not any(s.recipe in ("bn_scale", "bn_shift") for s in engine.weight_map.sources.values())


def test_fold_recipe_scales_each_output_channel_of_a_grouped_transposed_kernel():
    from refitcore.conversion.recipes import bn_fold_kernel

    groups, cin, cout_g = 2, 4, 3
    weight = torch.randn(cin, cout_g, 2, 2)
    gamma, var = torch.randn(groups * cout_g), torch.rand(groups * cout_g) + 0.5
    folded = bn_fold_kernel(weight=weight, gamma=gamma, var=var, eps=1e-5, axis=1, groups=groups)
    factor = gamma / torch.sqrt(var + 1e-5)
    for i in range(cin):  # input row i belongs to group i // (cin / groups)
        g = i // (cin // groups)
        for j in range(cout_g):
            torch.testing.assert_close(folded[i, j], weight[i, j] * factor[g * cout_g + j])
    with pytest.raises(ValueError, match="output channels"):
        bn_fold_kernel(weight=weight, gamma=gamma, var=var, eps=1e-5, axis=1, groups=1)
