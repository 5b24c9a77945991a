"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN), unrolled over their static sequence length.

Each layer and direction holds its weights once, as named refittable constants
(``"<layer>.l<k>[_reverse].weight_ih CONSTANT"``, ``weight_hh``, ``bias_ih``, ``bias_hh``), which
every time step reads: the input projection of the whole sequence is one matrix multiply, then each
step multiplies the hidden state by ``weight_hh`` and applies the gates (PyTorch's equations, the
gate order of its weights: LSTM i, f, g, o; GRU r, z, n; RNN one, through tanh or relu). The
network is plain layers (slices, matrix multiplies, activations, elementwise), so any TensorRT
builder accepts it and the reference backend interprets it; TensorRT's loop layers would keep the
network small for long sequences, and dynamic sequence lengths need them: such calls are refused,
as are projected LSTMs (proj_size) and training-mode dropout between layers. A packed sequence
(``pack_padded_sequence``) never reaches these converters: it does not export, and compile says so
(:class:`refitcore.errors.PackedSequenceError`).
"""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, as_tensor, shape_of
from refitcore.conversion.converters.activation import activation
from refitcore.conversion.converters.elementwise import elementwise
from refitcore.conversion.converters.shape import slice_
from refitcore.conversion.registry import Unsupported, converter
from refitcore.conversion.shape_tensors import is_symbolic

aten = torch.ops.aten

__all__ = ["recurrent"]

_KINDS = {aten.lstm.input: "LSTM", aten.gru.input: "GRU", aten.rnn_tanh.input: "RNN_TANH",
          aten.rnn_relu.input: "RNN_RELU"}
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _check(node) -> str | None:
    kind = _KINDS[node.target]
    x = node.args[0].meta["val"]
    params = node.args[2]
    has_biases, num_layers, dropout, train, bidirectional = node.args[3:8]
    if any(is_symbolic(s) for s in x.shape):
        return f"{kind} with dynamic shapes (the recurrence is unrolled over a static sequence length)"
    if x.dtype != torch.float32:
        return f"{kind} on {x.dtype} input"
    if train and dropout:
        return f"{kind} with training-mode dropout between layers"
    if len(params) != num_layers * (2 if bidirectional else 1) * (4 if has_biases else 2):
        return f"{kind} with proj_size (a projected hidden state)"
    return None


def _matmul_t(ctx: ConversionContext, x, w, suffix: str):
    """x @ w^T (w a [1, out, in] constant)."""
    op = ctx.trt.MatrixOperation
    return ctx.name(ctx.network.add_matrix_multiply(x, op.NONE, w, op.TRANSPOSE), suffix).get_output(0)


def _gates(ctx: ConversionContext, x, n: int, hidden: int, suffix: str) -> list:
    """The ``n`` gate blocks of [1, B, n * hidden] along the last axis."""
    batch = shape_of(x)[1]
    return [slice_(ctx, x, [0, 0, k * hidden], [1, batch, hidden], [1, 1, 1], suffix=f"{suffix}{k}")
            for k in range(n)]


def _lstm_step(ctx: ConversionContext, xp, h, c, w_hh, hidden: int, s: str):
    """PyTorch's LSTM cell; ``xp`` already holds W_ih x + b_ih + b_hh."""
    g = elementwise(ctx, xp, _matmul_t(ctx, h, w_hh, f"{s}.hh"), "SUM", suffix=f"{s}.gates")
    i, f, gg, o = _gates(ctx, g, 4, hidden, f"{s}.gate")
    i, f, o = (activation(ctx, v, "SIGMOID", suffix=f"{s}.{name}") for v, name in ((i, "i"), (f, "f"), (o, "o")))
    gg = activation(ctx, gg, "TANH", suffix=f"{s}.g")
    c = elementwise(ctx, elementwise(ctx, f, c, "PROD", suffix=f"{s}.fc"),
                    elementwise(ctx, i, gg, "PROD", suffix=f"{s}.ig"), "SUM", suffix=f"{s}.c")
    h = elementwise(ctx, o, activation(ctx, c, "TANH", suffix=f"{s}.tanh_c"), "PROD", suffix=f"{s}.h")
    return h, c


def _gru_step(ctx: ConversionContext, xp, h, w_hh, b_hh, hidden: int, s: str):
    """PyTorch's GRU cell: n = tanh(x_n + r * (W_hn h + b_hn)), h' = n + z * (h - n)."""
    hp = _matmul_t(ctx, h, w_hh, f"{s}.hh")
    if b_hh is not None:
        hp = elementwise(ctx, hp, b_hh, "SUM", suffix=f"{s}.hh_bias")
    x_r, x_z, x_n = _gates(ctx, xp, 3, hidden, f"{s}.x_gate")
    h_r, h_z, h_n = _gates(ctx, hp, 3, hidden, f"{s}.h_gate")
    r = activation(ctx, elementwise(ctx, x_r, h_r, "SUM", suffix=f"{s}.r_sum"), "SIGMOID", suffix=f"{s}.r")
    z = activation(ctx, elementwise(ctx, x_z, h_z, "SUM", suffix=f"{s}.z_sum"), "SIGMOID", suffix=f"{s}.z")
    n = elementwise(ctx, x_n, elementwise(ctx, r, h_n, "PROD", suffix=f"{s}.rh"), "SUM", suffix=f"{s}.n_sum")
    n = activation(ctx, n, "TANH", suffix=f"{s}.n")
    step = elementwise(ctx, z, elementwise(ctx, h, n, "SUB", suffix=f"{s}.h_minus_n"), "PROD", suffix=f"{s}.zd")
    return elementwise(ctx, n, step, "SUM", suffix=f"{s}.h")


def _rnn_step(ctx: ConversionContext, xp, h, w_hh, act: str, s: str):
    """PyTorch's Elman cell: h' = act(W_ih x + b_ih + W_hh h + b_hh); ``xp`` holds both biases."""
    g = elementwise(ctx, xp, _matmul_t(ctx, h, w_hh, f"{s}.hh"), "SUM", suffix=f"{s}.pre")
    return activation(ctx, g, act, suffix=f"{s}.h")


def _concat(ctx: ConversionContext, tensors: list, axis: int, suffix: str):
    if len(tensors) == 1:
        return tensors[0]
    layer = ctx.network.add_concatenation(tensors)
    layer.axis = axis
    return ctx.name(layer, suffix).get_output(0)


def _state(ctx: ConversionContext, value, index: int, batch: int, hidden: int, suffix: str):
    """Initial state ``index`` ([1, B, H]) of an [L * D, B, H] tensor or constant."""
    return slice_(ctx, value, [index, 0, 0], [1, batch, hidden], [1, 1, 1], suffix=suffix)


def recurrent(ctx: ConversionContext, kind: str, x, hx: list, params: list, *, has_biases: bool, num_layers: int,
              bidirectional: bool, batch_first: bool):
    """(output, h_n[, c_n]) of ``aten.lstm.input`` / ``aten.gru.input`` / ``aten.rnn_tanh.input`` /
    ``aten.rnn_relu.input`` (``kind`` LSTM, GRU, RNN_TANH or RNN_RELU)."""
    trt = ctx.trt
    if isinstance(x, StaticValue):
        raise Unsupported(f"{kind} over a constant sequence")
    seq = x
    if batch_first:   # time-major inside: [T, B, I]
        layer = ctx.network.add_shuffle(x)
        layer.first_transpose = trt.Permutation([1, 0, 2])
        seq = ctx.name(layer, "time_major").get_output(0)
    steps, batch = shape_of(seq)[:2]
    hidden = shape_of(params[1])[1]
    gates = _GATES[kind]
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    states = [as_tensor(ctx, v, rank_=3, suffix=name) for v, name in zip(hx, ("h0", "c0"))]
    finals: list[list] = [[] for _ in states]
    for k in range(num_layers):
        outs = []
        for d in range(directions):
            tag = f"l{k}" + ("_reverse" if d else "")
            w = params[(k * directions + d) * per:(k * directions + d + 1) * per]
            w_ih = ctx.constant(w[0], rank=3, suffix=f"{tag}.weight_ih")
            w_hh = ctx.constant(w[1], rank=3, suffix=f"{tag}.weight_hh")
            b_ih = ctx.constant(w[2], rank=3, suffix=f"{tag}.bias_ih") if has_biases else None
            b_hh = ctx.constant(w[3], rank=3, suffix=f"{tag}.bias_hh") if has_biases else None
            xp = _matmul_t(ctx, seq, w_ih, f"{tag}.ih")
            if b_ih is not None:
                xp = elementwise(ctx, xp, b_ih, "SUM", suffix=f"{tag}.ih_bias")
            if kind != "GRU" and b_hh is not None:   # both biases add before the gates (GRU's b_hn is gated)
                xp = elementwise(ctx, xp, b_hh, "SUM", suffix=f"{tag}.hh_bias")
            index = k * directions + d
            h = _state(ctx, states[0], index, batch, hidden, f"{tag}.h0")
            c = _state(ctx, states[1], index, batch, hidden, f"{tag}.c0") if kind == "LSTM" else None
            hs: list = [None] * steps
            for t in (reversed(range(steps)) if d else range(steps)):
                s = f"{tag}.t{t}"
                x_t = slice_(ctx, xp, [t, 0, 0], [1, batch, gates * hidden], [1, 1, 1], suffix=f"{s}.x")
                if kind == "LSTM":
                    h, c = _lstm_step(ctx, x_t, h, c, w_hh, hidden, s)
                elif kind == "GRU":
                    h = _gru_step(ctx, x_t, h, w_hh, b_hh, hidden, s)
                else:
                    h = _rnn_step(ctx, x_t, h, w_hh, "TANH" if kind == "RNN_TANH" else "RELU", s)
                hs[t] = h
            finals[0].append(h)
            if kind == "LSTM":
                finals[1].append(c)
            outs.append(_concat(ctx, hs, 0, f"{tag}.output"))
        seq = _concat(ctx, outs, 2, f"l{k}.both_directions")
    out = seq
    if batch_first:
        layer = ctx.network.add_shuffle(seq)
        layer.first_transpose = trt.Permutation([1, 0, 2])
        out = ctx.name(layer, "batch_first").get_output(0)
    return (out, *(_concat(ctx, f, 0, name) for f, name in zip(finals, ("h_n", "c_n"))))


@converter(aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input, capability=_check)
def lstm_gru_rnn(ctx, node, args, kwargs):
    kind = _KINDS[node.target]
    hx = list(args[1]) if kind == "LSTM" else [args[1]]
    return recurrent(ctx, kind, args[0], hx, list(args[2]), has_biases=bool(args[3]), num_layers=int(args[4]),
                     bidirectional=bool(arg(args, kwargs, 7, "bidirectional", False)),
                     batch_first=bool(arg(args, kwargs, 8, "batch_first", False)))
