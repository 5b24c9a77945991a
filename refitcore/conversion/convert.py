"""Convert an ExportedProgram's ATen graph into a TensorRT INetworkDefinition, recording the
weight map as each refittable weight is created."""
from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import fx
from torch.export.graph_signature import InputKind

from refitcore import _trt, dtypes
from refitcore.capture.lowering import FusionPlan, module_path, plan_fusions
from refitcore.conversion import (
    allowed_ops,
    converters,  # noqa: F401  (registers the built-in converters; the registry imports none)
)
from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.registry import Unsupported, lookup
from refitcore.conversion.shape_tensors import SymbolTable, is_symbolic, sym_value, symbolic_dims
from refitcore.conversion.weight_map import WeightMap
from refitcore.errors import BundleContentError, UnsupportedOperatorError
from refitcore.options import MAX_TENSOR_ELEMENTS
from refitcore.progress import Ticker, current

__all__ = ["ConversionResult", "convert", "layer_names_for", "unsupported_ops", "dynamic_node_names", "node_problem",
           "Program"]


class Program(Protocol):
    """What :func:`convert` reads of a program: a ``torch.export.ExportedProgram``, or one segment of
    it as a program of its own (:class:`refitcore.partition.partitioner.SubProgram`)."""

    @property
    def graph_module(self) -> fx.GraphModule: ...

    @property
    def graph_signature(self) -> Any: ...

    @property
    def state_dict(self) -> Mapping[str, Any]: ...

    @property
    def constants(self) -> Mapping[str, Any]: ...


@dataclasses.dataclass
class ConversionResult:
    network: Any
    builder: Any
    weight_map: WeightMap
    weights: dict[str, np.ndarray]          # engine weight name -> value as built
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    output_names: list[str]
    output_shapes: list[tuple[int, ...]]
    keepalive: list = dataclasses.field(repr=False, default_factory=list)
    profiles: Any = None                    # refitcore.capture.shapes.ShapeProfiles for dynamic inputs, else None
    shape_constants: list = dataclasses.field(default_factory=list)   # INT64 structure, never refitted


def _short_op(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def layer_names_for(gm: fx.GraphModule) -> dict[str, str]:
    """Deterministic layer base names: '<module path>/<op>', suffixed '_<k>' for repeats in graph
    order (a module called twice, or two ops of one kind in one module)."""
    seen: collections.Counter = collections.Counter()
    names = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "placeholder"):
            continue
        # A size node (sym_size.int on a dynamic input) can carry an exporter-internal module
        # stack; its layers are shape arithmetic: name them at the top level.
        path = "" if node.op == "call_function" and is_size_node(node) else (
            module_path(node) if node.op == "call_function" else "input")
        base = f"{path or 'model'}/{_short_op(node) if node.op == 'call_function' else node.name}"
        k = seen[base]
        seen[base] += 1
        names[node.name] = base if k == 0 else f"{base}_{k}"
    return names


aten = torch.ops.aten
# Ops whose result depends only on their input's shape and dtype (static shapes): they fold to
# literals, e.g. Swin's attention mask built with x.new_zeros(...).
SHAPE_ONLY_OPS = frozenset({aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                            aten.zeros_like.default, aten.ones_like.default, aten.full_like.default})
# Run-time checks torch.export adds for dynamic sizes; the optimization profile guarantees them.
ASSERT_OPS = frozenset({aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
                        aten.sym_constrain_range.default, aten._assert_tensor_metadata.default})


def is_size_node(node: fx.Node) -> bool:
    """A node computing a size (``sym_size.int``, ``operator.mul`` on SymInts...): it becomes shape
    arithmetic in the network (see :mod:`.shape_tensors`), not an op that needs a converter."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool)) or node.target in ASSERT_OPS


def _stand_in_shape(val) -> tuple[int, ...]:
    return tuple(1 if is_symbolic(s) else int(s) for s in val.shape)


def _symbolic_shape(node: fx.Node) -> bool:
    val: Any = node.meta.get("val")   # a fake tensor, a SymInt, a tuple of them...
    return hasattr(val, "shape") and any(is_symbolic(s) for s in val.shape)


def _dynamic_nodes(gm: fx.GraphModule, user_inputs: set[str]) -> set[str]:
    dynamic: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                dynamic.add(node.name)
        elif (node.op == "call_function" and (node.target not in SHAPE_ONLY_OPS or _symbolic_shape(node))
              and any(isinstance(a, fx.Node) and a.name in dynamic for a in node.all_input_nodes)):
            dynamic.add(node.name)
    return dynamic


def dynamic_node_names(ep) -> set[str]:
    """Names of the nodes that depend on the model's inputs (user inputs included); the others
    are computed from weights alone and fold into literals or weight-map operands."""
    user_inputs = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    return _dynamic_nodes(ep.graph_module, user_inputs)


def node_problem(node: fx.Node) -> str | None:
    """None when a converter handles ``node``; else why not ('' when no converter is registered)."""
    entry = lookup(node.target)
    if entry is None:
        return ""
    if entry.capability is not None:
        return entry.capability(node)
    return None


def unsupported_ops(ep: Program) -> list[tuple[str, str, str]]:
    """Every op call that needs a converter and has none (or whose converter declines it)."""
    dynamic = dynamic_node_names(ep)
    problems = []
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function" or node.name not in dynamic or is_size_node(node):
            continue
        reason = node_problem(node)
        if reason is not None:
            target = str(node.target) + (f" ({reason})" if reason else "")
            problems.append((target, module_path(node), node.name))
    return problems


def _encode(ctx: ConversionContext, value: Any):
    """JSON operand for an argument of a folded op (literal tensors are recorded on first use)."""
    if isinstance(value, StaticValue):
        return ctx.operand(value)
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, (list, tuple)):
        return [_encode(ctx, v) for v in value]
    if isinstance(value, (torch.device, torch.layout, torch.memory_format)):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record an argument of type {type(value).__name__} in the weight map")


def _statics(values):
    for v in values:
        if isinstance(v, StaticValue):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _statics(v)


def _concrete(v):
    if isinstance(v, StaticValue):
        return v.tensor
    if isinstance(v, (list, tuple)):
        return type(v)(_concrete(x) for x in v)
    return v


def _check_recordable(node: fx.Node, args: list, kwargs: dict) -> None:
    """A weight-only op replayed on every refit is recorded in the weight map, which an engine file
    carries: it must be an op a file may name, and its result's size must follow from shapes alone
    (the loader checks every operand on the ``meta`` device)."""
    name = str(node.target)
    try:
        recordable = (allowed_ops.is_allowed(name) and allowed_ops.check_call(
            node.target, args, kwargs, MAX_TENSOR_ELEMENTS, f"node {node.name}") is not None)
    except BundleContentError:
        recordable = False
    if not recordable:
        reason = (f"{name} (applied to weights; an engine file may not record it: not in "
                  f"refitcore.conversion.allowed_ops, or its size depends on the weights' values)")
        raise UnsupportedOperatorError([(reason, module_path(node), node.name)])


def _fold_static(ctx: ConversionContext, node: fx.Node, args: list, kwargs: dict):
    """Evaluate a node whose inputs are all known, keeping how its value derives from weights."""
    if node.target is operator.getitem:
        return args[0][args[1]]
    fn = cast(Callable[..., Any], node.target)   # a call_function node's target is the function
    values, named = _concrete(args), {k: _concrete(v) for k, v in kwargs.items()}
    if ctx.bounded:
        allowed_ops.check_call(fn, values, named, MAX_TENSOR_ELEMENTS, f"node {node.name}")
    out = fn(*values, **named)
    key_dependent = any(ctx.refittable(v) for v in _statics(list(args) + list(kwargs.values())))
    if key_dependent:
        _check_recordable(node, values, named)

    def wrap(value, index=None):
        if not isinstance(value, torch.Tensor):
            return value
        if not key_dependent:
            return StaticValue(value, None)  # a literal, recorded only if an engine weight uses it
        operand = {"op": str(node.target), "args": _encode(ctx, list(args)),
                   "kwargs": {k: _encode(ctx, v) for k, v in kwargs.items()}}
        if index is not None:
            operand["index"] = index
        return StaticValue(value, operand)

    if isinstance(out, (tuple, list)):
        return type(out)(wrap(v, i) for i, v in enumerate(out))
    return wrap(out)


def convert(ep: Program, params: Mapping[str, torch.Tensor] | None = None,
            *, fusion: FusionPlan | None = None, profiles: Any = None, precision: str = "fp32",
            progress: Any = None, bounded: bool = False) -> ConversionResult:
    """Build a strongly typed TensorRT network for ``ep``; ``params`` (fqn -> tensor) replaces its weights.

    Dimensions that ``ep`` exported as dynamic become -1 in the network inputs; ``profiles``
    (:class:`refitcore.capture.shapes.ShapeProfiles`) travels to the backend, which makes them
    optimization profiles.

    ``precision`` ('fp32', 'fp16', 'bf16'): the type of every floating tensor and weight inside the
    network. Weights are computed from the state_dict in float32 (or wider) and rounded once to it;
    the network's inputs and outputs keep the graph's types (cast at the boundary), as a model
    compiled with Torch-TensorRT's autocast does (docs/precision.md).

    ``progress``: told how many graph nodes were converted when it takes long
    (:class:`refitcore.progress.Ticker`: a 7B model's conversion, say); None: the reporter of the step
    running now (:func:`refitcore.progress.current`).

    ``bounded``: ``ep`` was read from a file (a saved engine's program record): every op evaluated on
    known values is first sized on ``meta`` (:func:`refitcore.conversion.allowed_ops.check_call`) and
    refused with :class:`BundleContentError` when it would make a tensor of more than
    MAX_TENSOR_ELEMENTS elements."""
    problems = unsupported_ops(ep)
    if problems:
        raise UnsupportedOperatorError(problems)
    trt = _trt.trt()
    gm = ep.graph_module
    sig = ep.graph_signature
    fusion = fusion or plan_fusions(gm)
    state: dict[str, torch.Tensor] = dict(ep.state_dict)
    if params is not None:
        state.update(params)
    # Floating weights as the refit paths see them (refitcore.refitting.prepare casts float64 to float32,
    # float16/bfloat16 are widened as read), so that compile computes every engine weight from the same
    # operands: bit-identical paths. Half and bfloat16 tensors are widened per read (StaticValue.widen).
    state = {k: v.detach().to(torch.float32) if v.is_floating_point() and v.dtype.itemsize > 4 else v.detach()
             for k, v in state.items()}
    constants = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
                 for k, v in (getattr(ep, "constants", {}) or {}).items()}

    float_dtype = dtypes.precision_dtype(precision)
    builder = trt.Builder(_trt.logger())
    # TensorRT 10+ and TensorRT-RTX networks are always explicit-batch (the flag is deprecated), and
    # strongly typed where the API has the flag (TensorRT-RTX's are, always): every tensor's type is
    # the one the converters give it, the builder picks no precision of its own.
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    wm = WeightMap()
    ctx = ConversionContext(network=network, weight_map=wm, layer_names=layer_names_for(gm),
                            fusions_conv_to_bn=dict(fusion.conv_to_bn), symbols=SymbolTable(),
                            float_dtype=float_dtype, bounded=bounded)

    specs = {s.arg.name: s for s in sig.input_specs}
    values: dict[str, Any] = {}
    ctx.values = values
    input_names, input_shapes = [], []

    def resolve(a):
        if isinstance(a, fx.Node):
            return values[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(resolve(x) for x in a)
        return a

    tick = Ticker(progress or current(), "graph nodes converted", len(gm.graph.nodes))
    for node in gm.graph.nodes:
        tick()
        ctx.node = node
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT and not isinstance(node.meta.get("val"), torch.Tensor):
                values[node.name] = node.meta.get("val")   # None or a Python scalar: a graph constant
            elif spec.kind == InputKind.USER_INPUT:
                val = node.meta["val"]
                dtype = getattr(trt.DataType, dtypes.trt_name(val.dtype, "FLOAT"))
                dims = symbolic_dims(val)   # -1 where the dimension is dynamic
                t = network.add_input(node.name, dtype, trt.Dims(dims))
                for d, size in enumerate(val.shape):
                    if is_symbolic(size) and size.node.expr.is_Symbol:
                        ctx.symbols.dims.setdefault(size.node.expr, (t, d))
                engine_type = getattr(trt.DataType, dtypes.trt_name(ctx.engine_type(val.dtype), "FLOAT"))
                if val.dtype.is_floating_point and t.dtype != engine_type:   # float32 into the engine's type
                    to_engine = network.add_cast(t, engine_type)
                    t = ctx.name(to_engine, full=f"input/{node.name}_cast").get_output(0)
                values[node.name] = t
                input_names.append(node.name)
                input_shapes.append(dims)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.persistent is not False:
                values[node.name] = _from_state(state[spec.target], {"key": spec.target})
            elif spec.target in constants:  # lifted constants: not in a state_dict
                values[node.name] = StaticValue(constants[spec.target], None, origin=_origin(spec.target))
            else:  # non-persistent buffers
                values[node.name] = _from_state(state[spec.target], None, origin=_origin(spec.target))
        elif node.op == "call_function" and is_size_node(node):
            val = node.meta.get("val")
            try:
                values[node.name] = (sym_value(ctx, val) if isinstance(val, torch.SymInt) and is_symbolic(val)
                                     else int(val) if isinstance(val, torch.SymInt) else None)
            except Unsupported as err:
                raise UnsupportedOperatorError([(f"{node.target} ({err})", module_path(node), node.name)]) from err
        elif node.op == "call_function":
            args = resolve(list(node.args))
            kwargs = {k: resolve(v) for k, v in node.kwargs.items()}
            if node.target in SHAPE_ONLY_OPS and not _symbolic_shape(node):
                # Only the input's shape/dtype matter: stand in a zero tensor of that shape. (A
                # dynamic input of new_zeros(x, size) matters by its dtype only: the output is static.)
                args = [StaticValue(torch.zeros(_stand_in_shape(a.meta["val"]), dtype=a.meta["val"].dtype), None)
                        if isinstance(a, fx.Node) else v for a, v in zip(node.args, args)]
            if not _any_dynamic(args) and not _any_dynamic(list(kwargs.values())):
                values[node.name] = _fold_static(ctx, node, args, kwargs)
            else:
                entry = lookup(node.target)
                try:
                    if entry is None:   # unsupported_ops() let only registered targets through
                        raise RuntimeError(f"internal error: no converter for {node.target}")
                    values[node.name] = entry.fn(ctx, node, args, kwargs)
                    ctx.check_all_named()
                except Unsupported as err:
                    raise UnsupportedOperatorError([(f"{node.target} ({err})", module_path(node), node.name)]) from err
                except Exception as err:
                    # Any other failure: say which call it was (the partitioner runs that call in PyTorch).
                    err.refitcore_node = node.name  # type: ignore[attr-defined]  # a tag on any exception type
                    raise
        elif node.op == "output":
            outs = resolve(node.args[0])
            output_names, output_shapes = [], []
            for i, (o, src) in enumerate(zip(outs, node.args[0])):
                if isinstance(o, StaticValue) or o is None:
                    raise UnsupportedOperatorError([("output does not depend on the inputs", "", str(src))])
                if o.is_network_input or o.is_network_output:
                    # One tensor returned twice (eval-mode identities), or an input returned as is:
                    # each output needs a tensor of its own.
                    o = ctx.name(network.add_identity(o), full=f"output_{i}/identity").get_output(0)
                want = dtypes.trt_name(src.meta["val"].dtype) if hasattr(src.meta.get("val"), "dtype") else None
                if want is not None and o.dtype.name != want and src.meta["val"].dtype.is_floating_point:
                    # back to the graph's type (an fp32 model compiled at fp16 answers in fp32)
                    to_graph = network.add_cast(o, getattr(trt.DataType, want))
                    o = ctx.name(to_graph, full=f"output_{i}/cast").get_output(0)
                o.name = f"output_{i}"
                network.mark_output(o)
                output_names.append(o.name)
                output_shapes.append(symbolic_dims(src.meta["val"]))
    ctx.node = None
    return ConversionResult(network=network, builder=builder, weight_map=wm, weights=ctx.weights,
                            input_names=input_names, input_shapes=input_shapes,
                            output_names=output_names, output_shapes=output_shapes,
                            keepalive=ctx.keepalive, profiles=profiles,
                            shape_constants=list(ctx.shape_constants))


def _from_state(t: torch.Tensor, operand: Any, origin: str | None = None) -> StaticValue:
    """A state_dict tensor as the conversion reads it: float16/bfloat16 widened to float32 at each read."""
    return StaticValue(t, operand, origin=origin, widen=t.dtype in (torch.float16, torch.bfloat16))


def _origin(target: str) -> str | None:
    """The attribute path of a lifted tensor that a model holds (a tensor attribute, a
    non-persistent buffer), or None for tensors created by the forward code itself, which
    torch.export lifts as ``<module path>.lifted_tensor_<n>`` (or ``_tensor_constant<n>``): those are
    constants of the code, the same in every model of this architecture."""
    last = target.rsplit(".", 1)[-1]
    return None if last.startswith(("lifted_tensor_", "_tensor_constant")) else target


def _any_dynamic(values) -> bool:
    for v in values:
        if isinstance(v, (list, tuple)):
            if _any_dynamic(v):
                return True
        elif v is not None and not isinstance(v, (StaticValue, int, float, bool, str, torch.dtype,
                                                  torch.device, torch.layout, torch.memory_format)):
            return True
    return False
