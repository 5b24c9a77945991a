"""cumsum (ICumulativeLayer), diff (slices and a difference), top-k / argmax / argmin (ITopKLayer),
trigonometric and rounding unaries, repeat/tile, pixel (un)shuffle, shape-only constants (arange) and a static complex
buffer seen as real (view_as_real folds to a literal)."""
import pytest
import torch
from torch import nn

from .harness import Proj, check_converter


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y: y.cumsum(1), id="cumsum"),
    pytest.param(lambda y: torch.cumsum(y, -1) * y, id="cumsum_last"),
    pytest.param(lambda y: y.topk(2, dim=-1)[0] * 2, id="topk_values"),
    pytest.param(lambda y: y.topk(3, dim=1, largest=False)[1].float() + y[:, :3], id="topk_smallest_indices"),
    pytest.param(lambda y: y.argmax(-1).float() + y.sum(-1), id="argmax"),
    pytest.param(lambda y: y.argmin(1, keepdim=True).float() * y, id="argmin_keepdim"),
    pytest.param(lambda y: torch.sin(y) + torch.cos(y) * torch.tan(y / 4), id="sin_cos_tan"),
    pytest.param(lambda y: torch.floor(y * 3) + torch.ceil(y) + torch.sign(y) + torch.round(y * 5), id="rounding"),
    pytest.param(lambda y: y.pow(2) + torch.rsqrt(y.abs() + 1), id="pow_rsqrt"),
    pytest.param(lambda y: y.repeat(1, 2, 3), id="repeat"),
    pytest.param(lambda y: y.repeat(2, 1, 1, 2), id="repeat_adds_axis"),
    pytest.param(lambda y: torch.tile(y, (2,)), id="tile"),
    pytest.param(lambda y: y + torch.arange(4), id="arange_folds"),
    pytest.param(lambda y: torch.diff(y), id="diff"),
    pytest.param(lambda y: torch.diff(y, n=2, dim=1), id="diff_n2_dim1"),
    pytest.param(lambda y: torch.diff(y, dim=0, prepend=y[:1] * 0, append=y[-1:]), id="diff_prepend_append"),
    pytest.param(lambda y: torch.diff(y, dim=-1, prepend=torch.ones(2, 3, 1)), id="diff_constant_prepend"),
    pytest.param(lambda y: torch.diff(y > 0, dim=1).float() + y[:, 1:], id="diff_bool_xor"),
    pytest.param(lambda y: torch.diff((y * 4).long(), dim=2).float() * y[..., 1:], id="diff_int64"),
])
def test_misc_op_matches_eager_and_refits(fn):
    check_converter(Proj(fn), torch.randn(2, 3, 4))


@pytest.mark.parametrize("fn, shape", [
    pytest.param(lambda y: nn.functional.pixel_shuffle(y, 2), (1, 8, 3, 2), id="pixel_shuffle"),
    pytest.param(lambda y: nn.functional.pixel_unshuffle(y, 2), (2, 2, 4, 6), id="pixel_unshuffle"),
])
def test_pixel_shuffle_matches_eager_and_refits(fn, shape):
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(shape[1], shape[1], 1)

        def forward(self, x):
            return fn(self.conv(x))

    check_converter(Conv(), torch.randn(shape))


class Rotary(nn.Module):
    """A complex buffer of rotations (rotary embeddings): its real view is a constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        angles = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.5])
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, x):
        rot = torch.view_as_real(self.freqs).reshape(3, 4)
        return self.fc(x) * rot


def test_view_as_real_of_a_static_complex_buffer_folds():
    check_converter(Rotary(), torch.randn(2, 3, 4))
