"""Matrix products: einsum (MaxViT's attention) with uppercase and spaced subscripts."""
import pytest
import torch
from torch import nn

from .harness import check_converter


class Einsum(nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.equation = equation

    def forward(self, x):
        y = self.fc(x)
        return torch.einsum(self.equation, y, x)


@pytest.mark.parametrize("equation", [
    pytest.param("B G H I D, B G H J D -> B G H I J", id="maxvit_scores"),
    pytest.param("bghid,bghjd->bghjd", id="elementwise_batch"),
    pytest.param("bghid,bghid->bgh", id="contract_two"),
])
def test_einsum_matches_eager_and_refits(equation):
    check_converter(Einsum(equation), torch.randn(1, 2, 2, 3, 4))
