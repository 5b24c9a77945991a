"""Elementwise: clamps, comparisons, where/masked_fill, unary ops, ranks equalized."""
import pytest
import torch

from .harness import Proj, check_converter


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y: y.clamp_min(0.1), id="clamp_min"),
    pytest.param(lambda y: y.clamp_max(0.1), id="clamp_max"),
    pytest.param(lambda y: torch.maximum(y, y * 0.5), id="maximum"),
    pytest.param(lambda y: torch.where(y > 0, y, y.exp()), id="where"),
    pytest.param(lambda y: y.masked_fill(y < 0.2, -3.0), id="masked_fill"),
    pytest.param(lambda y: torch.rsqrt(y.abs() + 1), id="rsqrt_abs"),
    pytest.param(lambda y: y.pow(2) - y.neg(), id="pow_neg"),
    pytest.param(lambda y: torch.addcmul(y, y.exp(), y[0, 0], value=0.5), id="addcmul_value"),
    pytest.param(lambda y: torch.addcmul(torch.ones(4), y, y), id="addcmul_constant_input"),
    pytest.param(lambda y: torch.addcdiv(y, y, y.abs() + 1, value=-2), id="addcdiv"),
    pytest.param(lambda y: y + torch.ones(4), id="rank_equalized_constant"),
    pytest.param(lambda y: y[:, :, :, 0] * y[0, 0, :, 0], id="rank_equalized_tensors"),
])
def test_elementwise_matches_eager_and_refits(fn):
    check_converter(Proj(fn), torch.randn(1, 5, 6, 4))
