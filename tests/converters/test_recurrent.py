"""LSTM, GRU and RNN (tanh and relu), unrolled over the sequence: one and several layers, uni- and bidirectional,
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


def _relu_rnn(**kw):
    return nn.RNN(nonlinearity="relu", **kw)


CELLS = [pytest.param(nn.LSTM, id="LSTM"), pytest.param(nn.GRU, id="GRU"), pytest.param(nn.RNN, id="RNN_tanh"),
         pytest.param(_relu_rnn, id="RNN_relu")]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kw", CONFIGS)
def test_recurrent_matches_eager_and_refits(cell, kw):
    x = torch.randn((2, 5, 4) if kw.get("batch_first") else (5, 2, 4))
    engine = check_converter(Rnn(cell, **kw), x)
    assert engine.partition is None, engine.summary()


@pytest.mark.parametrize("cell", CELLS)
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


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_weights_refit_from_the_state_dict(nonlinearity):
    """nn.RNN's weight_ih/weight_hh/biases of each layer and direction are named engine weights
    derived from their state_dict keys; a refit with other weights matches eager."""
    model = Rnn(nn.RNN, input_size=4, hidden_size=3, num_layers=2, bidirectional=True,
                nonlinearity=nonlinearity).eval()
    x = torch.randn(5, 2, 4)
    engine = refitcore.compile(model, (x,), backend="reference", strict=True)
    keys = {str(src.inputs) for src in engine.weight_map.sources.values()}
    for name in ("weight_ih_l1_reverse", "weight_hh_l0", "bias_ih_l1", "bias_hh_l0_reverse"):
        assert any(f"rnn.{name}" in k for k in keys), keys
    new = Rnn(nn.RNN, input_size=4, hidden_size=3, num_layers=2, bidirectional=True,
              nonlinearity=nonlinearity).eval()
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, new, path=path, verify_inputs=[(x,)], audit=True)
        assert result, str(result)


class PackedClassifier(nn.Module):
    """Padded batch -> pack_padded_sequence -> recurrent layer -> pad_packed_sequence -> Linear."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=["LSTM", "GRU", "RNN"])
def test_a_packed_sequence_is_refused_at_compile_naming_the_op_and_module(cell, strict):
    """A packed sequence's step sizes come from the lengths' values: compile refuses it (strict or not:
    not a hybrid that quietly runs the recurrence in PyTorch), naming the op and the module, and says
    what to do; naming the modules to compile keeps the recurrence in PyTorch."""
    from refitcore.errors import ExportError, PackedSequenceError

    model, x, lengths = PackedClassifier(cell).eval(), torch.randn(3, 5, 4), torch.tensor([5, 3, 2])
    with pytest.raises(PackedSequenceError) as info:
        refitcore.compile(model, (x, lengths), backend="reference", strict=strict)
    message = str(info.value)
    assert isinstance(info.value, ExportError) and info.value.modules == [("rnn", cell.__name__)]
    assert f"aten._pack_padded_sequence) feeds {cell.__name__} at rnn" in message, message
    assert "pass the padded tensor" in message and "submodules=" in message, message
    engine = refitcore.compile(model, (x, lengths), backend="reference", submodules=["head"])
    with torch.no_grad():
        torch.testing.assert_close(engine(x, lengths), model(x, lengths), rtol=1e-5, atol=1e-5)
