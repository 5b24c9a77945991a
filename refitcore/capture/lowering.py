"""torch.export and the graph passes that run before conversion.

``export_model`` exports in eval mode and lowers to ATen IR (functional, BatchNorm as
``_native_batch_norm_legit_no_training``) while keeping the composite ops we convert as a
whole (conv2d, linear, layer_norm, scaled_dot_product_attention, ...). ``plan_fusions``
finds the conv + eval BatchNorm pairs that fold into one convolution.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import operator
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import sympy
import torch
from torch import fx
from torch.export.graph_signature import OutputKind

from refitcore.capture.structured import register_cache_pytrees
from refitcore.errors import MutationError

__all__ = ["export_model", "lower", "CONV_OPS", "plan_fusions", "FusionPlan", "module_path", "graph_fingerprint",
           "input_names", "DETAIL_LOG", "DETAIL_HINT"]

DETAIL_LOG = logging.getLogger("refitcore.export")   # torch.export's own messages, and full export errors
DETAIL_HINT = "the full text is logged at DEBUG level by the 'refitcore' logger, e.g. pytest --log-level=DEBUG"

aten = torch.ops.aten
BATCH_NORM = aten._native_batch_norm_legit_no_training.default
CONV_OPS = (aten.conv2d.default, aten.conv1d.default, aten.conv3d.default, aten.convolution.default,
            aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def export_model(model: torch.nn.Module, example_inputs: Sequence[Any], kwargs: dict | None = None, *,
                 dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """Export ``model`` in eval mode and lower it to functional ATen IR (positional and keyword
    inputs: any pytree of tensors, Python scalars and None; ``dynamic_shapes``: as
    ``torch.export.export`` takes it, see :mod:`refitcore.capture.shapes`)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    register_cache_pytrees()   # a decoder's DynamicCache output (transformers' own export support)
    was_training = model.training
    model.eval()
    try:
        with _torch_messages_to_debug():
            ep = torch.export.export(model, tuple(example_inputs), dict(kwargs or {}), dynamic_shapes=dynamic_shapes,
                                     strict=False)
    finally:
        model.train(was_training)
    return lower(ep)


def packed_sequence_users(model: torch.nn.Module, example_inputs: Sequence[Any],
                          kwargs: dict | None = None) -> list[tuple[str, str]]:
    """(module path, class name) of each recurrent module (``nn.RNN``/``LSTM``/``GRU``) that a call
    on the example feeds a ``PackedSequence``: asked when the export fails, to say why (one eager
    call; a model that fails eagerly too has none to report)."""
    found: list[tuple[str, str]] = []

    def hook(path: str):
        def pre(module, inputs):
            if inputs and isinstance(inputs[0], torch.nn.utils.rnn.PackedSequence):
                found.append((path, type(module).__name__))
        return pre

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in model.named_modules()
               if isinstance(m, torch.nn.RNNBase)]
    if not handles:
        return []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs, **dict(kwargs or {}))
    except Exception:  # noqa: BLE001 - the export's own error is reported instead
        pass
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(dict.fromkeys(found))


def lower(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` in the IR our converters take: functional ATen (the ``ATEN`` dialect) with every
    composite op whole. A program as ``torch.export.export`` returns it (the ``TRAINING`` dialect:
    ``aten.dropout``, ``aten.batch_norm``, in-place ops) is lowered with an empty decomposition
    table: functionalise (relu_ -> relu) and lower BatchNorm to its eval form, but keep every
    composite op whole, so each one maps onto one TensorRT layer family. A program already in the
    ``ATEN`` dialect (lowered by :func:`export_model`, or by anyone) is returned as it is: the
    dialect says what a program is, whatever ops it happens to hold. A program that writes into an
    input or buffer raises :class:`~refitcore.errors.MutationError` naming them."""
    lowered = ep if ep.dialect == "ATEN" else ep.run_decompositions({})
    # Lowering makes in-place writes functional: the new value of a mutated input or buffer is an
    # extra output of the graph (graph_signature.output_specs). An engine returns outputs and
    # writes nothing back, so a program that mutates is refused here, naming what it mutates.
    sig = lowered.graph_signature
    inputs = [s.target for s in sig.output_specs if s.kind == OutputKind.USER_INPUT_MUTATION]
    buffers = [s.target for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION]
    if inputs or buffers:
        raise MutationError(inputs, buffers)
    return lowered


class _ToDebug(logging.Filter):
    """Drops torch's records below ERROR from a handler, logging each at DEBUG on :data:`DETAIL_LOG`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch") or record.levelno >= logging.ERROR:
            return True
        DETAIL_LOG.debug("%s: %s", record.name, record.getMessage())
        return False


@contextlib.contextmanager
def _torch_messages_to_debug() -> Iterator[None]:
    """While torch.export runs, its warnings, log messages and what it prints (a failing program's
    whole FX graph) go to :data:`DETAIL_LOG` at DEBUG level instead of the terminal; the caller
    reports one line."""
    loggers = [logging.getLogger()] + [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
                                       if name.startswith("torch") and isinstance(lg, logging.Logger)]
    handlers = {h for lg in loggers for h in lg.handlers}   # torch's loggers have their own, not propagating
    quiet = _ToDebug()
    for h in handlers:
        h.addFilter(quiet)
    printed = io.StringIO()      # torch.export prints a failing program's partial FX graph to stderr
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(printed):
            warnings.simplefilter("always")
            yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)
        for w in caught:
            DETAIL_LOG.debug("torch.export warned: %s: %s", w.category.__name__, w.message)
        if printed.getvalue().strip():
            DETAIL_LOG.debug("torch.export printed:\n%s", printed.getvalue())


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost nn.Module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


@dataclasses.dataclass
class FusionPlan:
    """conv node name -> BatchNorm node name folded into it (and back)."""

    conv_to_bn: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def bn_to_conv(self) -> dict[str, str]:
        return {bn: conv for conv, bn in self.conv_to_bn.items()}


def plan_fusions(gm: fx.GraphModule) -> FusionPlan:
    """Find conv -> BatchNorm pairs where the conv output feeds only that BatchNorm and only the
    BatchNorm's normalised output (item 0) is used. Any groups, with or without conv bias;
    transposed convolutions too (their kernels fold along axis 1, per group: the converter and
    the ``bn_fold_kernel`` recipe's ``axis``/``groups`` parameters handle it)."""
    plan = FusionPlan()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not BATCH_NORM:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_function" or src.target not in CONV_OPS:
            continue
        if len(src.users) != 1:
            continue  # the conv output also feeds something else: BatchNorm becomes a scale layer
        users_ok = all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                       for u in node.users)
        if not users_ok:
            continue
        plan.conv_to_bn[src.name] = node.name
    return plan


def tensor_inputs(ep: torch.export.ExportedProgram) -> list[tuple[str, tuple]]:
    """(name, example shape: SymInts where a size varies) of each tensor the caller passes, in the
    order of the network's inputs (a None or Python-scalar input is a graph constant, no input)."""
    from torch.export.graph_signature import InputKind

    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    return [(n.name, tuple(n.meta["val"].shape)) for n in ep.graph_module.graph.find_nodes(op="placeholder")
            if n.name in user and isinstance(n.meta.get("val"), torch.Tensor)]


def input_names(ep: torch.export.ExportedProgram) -> list[str]:
    """The names of the network's inputs (:func:`tensor_inputs`)."""
    return [name for name, _ in tensor_inputs(ep)]


def _sizes(shape, symbols: dict) -> list:
    """A shape as JSON: a dynamic size is written with its symbols renamed in order of appearance
    (``d0``, ``d1``...), so two exports of one architecture with the same ranges compare equal."""
    out: list[int | str] = []
    for s in shape:
        if isinstance(s, torch.SymInt) and not s.node.expr.is_number:
            expr = s.node.expr
            for sym in sorted(expr.free_symbols, key=str):
                symbols.setdefault(str(sym), f"d{len(symbols)}")
            out.append(str(expr.subs({sym: sympy.Symbol(symbols[str(sym)]) for sym in expr.free_symbols})))
        else:
            out.append(int(s))
    return out


def _describe_arg(a: Any, symbols: dict):
    if isinstance(a, fx.Node):
        val: Any = a.meta.get("val")   # a fake tensor, a SymInt, a tuple of them...
        return ["node", a.name, _sizes(val.shape, symbols) if hasattr(val, "shape") else None]
    if isinstance(a, (list, tuple)):
        return [_describe_arg(x, symbols) for x in a]
    if isinstance(a, (int, float, bool, str)) or a is None:
        return a
    return str(a)


def graph_fingerprint(ep: Any) -> tuple[str, list[list]]:
    """A hash of the graph's ops, arguments and the shapes of its weights, and the list it hashes,
    so that two architectures can be compared op by op. ``ep``: an ExportedProgram, or a program
    that reads like one (graph, graph_signature, state_dict, constants)."""
    sig = ep.graph_signature
    entries: list[list] = []
    targets = {}
    for spec in sig.input_specs:
        targets[spec.arg.name] = spec.target
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    symbols: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            tgt = targets.get(node.name)
            val = node.meta.get("val")
            shape = _sizes(val.shape, symbols) if hasattr(val, "shape") else None
            dtype = str(val.dtype) if hasattr(val, "dtype") else None
            entries.append(["input" if tgt is None else "weight", tgt or node.name, shape, dtype])
        elif node.op == "call_function":
            entries.append(["op", str(node.target), node.name, module_path(node),
                            _describe_arg(list(node.args), symbols), _describe_arg(dict(node.kwargs), symbols)])
        elif node.op == "output":
            entries.append(["output", _describe_arg(list(node.args), symbols)])
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()
    return digest, entries
