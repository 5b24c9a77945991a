"""Casts (with the metadata asserts export puts before them), comparisons, boolean logic, and
where/masked_fill on masks computed from the input."""
import pytest
import torch

from .harness import Proj, check_converter


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y: (y * 3).to(torch.int32).float() + y, id="float_int_float_truncates"),
    pytest.param(lambda y: y.half().float(), id="through_float16"),
    pytest.param(lambda y: (y > 0).to(torch.float32) * y, id="bool_to_float"),
    pytest.param(lambda y: ((y * 4).long() + 1) * 2, id="int64_arithmetic_output"),
    pytest.param(lambda y: y.to(torch.float32), id="noop_cast"),
    pytest.param(lambda y: ((y != 0.5) & (y >= -0.2) | ~(y <= 0.3)) * y, id="ne_ge_le_and_or_not"),
    pytest.param(lambda y: (torch.logical_xor(y > 0, y.abs() > 0.5) ^ (y == y)) * y, id="xor"),
    pytest.param(lambda y: torch.logical_and(y, y > 0.1).float() + torch.logical_not(y).float(), id="logical_on_float"),
    pytest.param(lambda y: y.masked_fill((y > 0) & (y < 0.5), -2.0), id="masked_fill_mask"),
    pytest.param(lambda y: torch.where(y.ne(0.1), y, torch.zeros_like(y)), id="where_ne"),
    pytest.param(lambda y: torch.where(y > 0, 1, 0) + y, id="where_int_scalars"),
    pytest.param(lambda y: (y * 4).long().masked_fill(y > 0.2, 7) * y, id="masked_fill_int_tensor"),
    pytest.param(lambda y: torch.where(y > 0, 3, -2) * 2, id="where_int_output"),
])
def test_casts_and_logic_match_eager_and_refit(fn):
    check_converter(Proj(fn), torch.randn(2, 3, 4))
