"""Gathers: an embedding table as a refittable constant, indexing with one index tensor,
index_select, torch.gather; GPT-2's Conv1D (addmm) and baddbmm."""
import pytest
import torch
from torch import nn

from .harness import check_converter


class Embed(nn.Module):
    """Token + position embeddings (the table lookups of BERT-style models), then a projection."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4, padding_idx=0)
        self.pos = nn.Embedding(6, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.fc(self.tok(ids) + self.pos(positions))


class Indexed(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("idx", torch.tensor([2, 0, -1]), persistent=False)
        self.fn = fn

    def forward(self, x, i):
        return self.fn(self, self.fc(x), i)


def test_embedding_table_is_refittable_and_gathered():
    engine = check_converter(Embed(), torch.tensor([[1, 0, 9, 3, 3]]))
    sources = engine.weight_map.sources
    table = [s for s in sources.values() if s.recipe == "copy" and s.inputs["x"] == {"key": "tok.weight"}]
    assert len(table) == 1 and table[0].shape == (10, 4)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda m, y, i: y[:, i], id="index_axis1_dynamic"),
    pytest.param(lambda m, y, i: y[i], id="index_axis0_dynamic_negative"),
    pytest.param(lambda m, y, i: y[:, m.idx], id="index_static_negative"),
    pytest.param(lambda m, y, i: torch.index_select(y, 2, i.abs()), id="index_select"),
    pytest.param(lambda m, y, i: torch.gather(y, 2, i.abs().reshape(1, 1, 3).expand(2, 3, 3)), id="gather_elements"),
])
def test_index_matches_eager_and_refits(fn):
    check_converter(Indexed(fn), torch.randn(2, 3, 4), torch.tensor([1, -2, 0]))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight laid out (in, out), y = addmm(b, x, W)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5))
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        y = torch.addmm(self.bias, x.view(-1, 4), self.weight)
        return y.view(x.shape[:-1] + (5,)), torch.addmm(self.bias, x.view(-1, 4), self.weight, beta=0.5, alpha=2.0)


class Baddbmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(1, 3, 3))

    def forward(self, x):
        y = self.fc(x)
        return torch.baddbmm(self.bias, y, y.transpose(1, 2), alpha=0.5)


@pytest.mark.parametrize("model", [pytest.param(Conv1D(), id="addmm_conv1d"),
                                   pytest.param(Baddbmm(), id="baddbmm")])
def test_addmm_matches_eager_and_refits(model):
    check_converter(model, torch.randn(2, 3, 4))
