"""LSTM and GRU, unrolled over the sequence: one and several layers, uni- and bidirectional,
batch_first both ways, with and without biases, initial states given or zero, and a text
classifier (Embedding -> LSTM -> Linear) that runs whole in TensorRT; every weight refits."""
import pytest
import torch
from torch import nn

import refitcore

from .harness import check_converter


class Rnn(nn.Module):
    """A recurrent layer returning every output it has (sequence, h_n[, c_n])."""

    def __init__(self, cell: type[nn.Module], with_state: bool = False, **kw):
        super().__init__()
        self.rnn = cell(**kw)
        self.with_state = with_state

    def forward(self, x, *state):
        out, hidden = self.rnn(x, (state if len(state) > 1 else state[0]) if self.with_state else None)
        return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)


CONFIGS = [
    pytest.param(dict(input_size=4, hidden_size=3), id="one_layer"),
    pytest.param(dict(input_size=4, hidden_size=3, num_layers=2, batch_first=True), id="two_layers_batch_first"),
    pytest.param(dict(input_size=4, hidden_size=3, bidirectional=True), id="bidirectional"),
    pytest.param(dict(input_size=4, hidden_size=5, num_layers=3, bidirectional=True, batch_first=True),
                 id="three_layers_bidirectional_batch_first"),
    pytest.param(dict(input_size=4, hidden_size=3, bias=False, num_layers=2), id="no_bias"),
]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("kw", CONFIGS)
def test_recurrent_matches_eager_and_refits(cell, kw):
    x = torch.randn((2, 5, 4) if kw.get("batch_first") else (5, 2, 4))
    engine = check_converter(Rnn(cell, **kw), x)
    assert engine.partition is None, engine.summary()


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_with_initial_states_as_inputs(cell):
    kw = dict(input_size=4, hidden_size=3, num_layers=2, bidirectional=True)
    states = [torch.randn(4, 2, 3) for _ in range(2 if cell is nn.LSTM else 1)]
    check_converter(Rnn(cell, with_state=True, **kw), torch.randn(6, 2, 4), *states)


class TextClassifier(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def test_text_classifier_runs_whole_in_tensorrt():
    tokens = torch.randint(0, 20, (3, 7))
    engine = check_converter(TextClassifier(), tokens)
    assert engine.partition is None, engine.summary()
    names = set(engine.weight_map.sources)
    assert any(n.endswith("l0_reverse.weight_hh CONSTANT") for n in names), sorted(names)


def test_recurrent_weights_refit_from_the_state_dict():
    """Each weight_ih/weight_hh/bias is one named engine weight derived from its state_dict key."""
    model = Rnn(nn.GRU, input_size=4, hidden_size=3).eval()
    engine = refitcore.compile(model, (torch.randn(5, 2, 4),), backend="reference", strict=True)
    keys = {str(src.inputs) for src in engine.weight_map.sources.values()}
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert any(f"rnn.{name}" in k for k in keys), keys
