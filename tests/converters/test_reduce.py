"""Reductions and norms: sum, max, L2 normalize (Swin V2's cosine attention)."""
import pytest
import torch
import torch.nn.functional as F

from .harness import Proj, check_converter


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y: y.sum(dim=(1, 3)), id="sum"),
    pytest.param(lambda y: y.sum(dim=-1, keepdim=True), id="sum_keepdim"),
    pytest.param(lambda y: y.amax(dim=2), id="amax"),
    pytest.param(lambda y: F.normalize(y, dim=-1), id="normalize"),
    pytest.param(lambda y: torch.linalg.vector_norm(y, dim=(1, 2)), id="vector_norm"),
    pytest.param(lambda y: y.mean(dim=(-2, -1)), id="mean"),
])
def test_reduction_matches_eager_and_refits(fn):
    check_converter(Proj(fn), torch.randn(1, 5, 6, 4))
