"""Partition an exported graph into TensorRT and PyTorch segments (pure: graph in, plan out).

Only *dynamic* nodes (those that depend on the model's inputs) are partitioned; nodes computed
from weights alone are folded by the converter into the TensorRT segment that uses them, or
recomputed by the PyTorch interpreter. A dynamic node runs in PyTorch when it has no converter
(or its converter's capability validator declines it), when the user lists its op in
``torch_executed_ops``, when a tensor it reads or makes has a dtype TensorRT lacks, or when it
belongs to a run of convertible ops shorter than ``min_block_size`` (as in Torch-TensorRT:
a tiny TensorRT engine between two PyTorch parts costs more than it saves). Each maximal run of
the remaining nodes, in graph order, becomes one TensorRT segment.

:func:`subprogram` extracts one TensorRT segment as a small program that
:func:`refitcore.conversion.convert.convert` converts like a whole ExportedProgram: its
placeholders are the segment's inputs (user inputs or values made by earlier segments) and
the parameters and constants it reads.
"""
from __future__ import annotations

import dataclasses
import operator
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from refitcore.capture.lowering import CONV_OPS, module_path, tensor_inputs
from refitcore.capture.shapes import ShapeProfiles
from refitcore.conversion.convert import dynamic_node_names, is_size_node, node_problem
from refitcore.partition.torch_program import SHAPE_ONLY_OPS

__all__ = ["Segment", "PartitionPlan", "partition", "subprogram", "SubProgram", "DEFAULT_MIN_BLOCK_SIZE",
           "op_matcher", "executed_op_names", "executed_op_nodes", "segment_profiles"]

DEFAULT_MIN_BLOCK_SIZE = 5     # Torch-TensorRT's default
TRT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool})


@dataclasses.dataclass
class Segment:
    """One part of the graph: ``kind`` 'tensorrt' or 'torch', its dynamic nodes in graph order, the
    values it reads from outside (``inputs``) and those it hands on (``outputs``)."""

    kind: str
    nodes: list[str]
    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> Segment:
        return cls(d["kind"], list(d["nodes"]), list(d.get("inputs", [])), list(d.get("outputs", [])))


@dataclasses.dataclass
class PartitionPlan:
    """The segments and, for every node that runs in PyTorch, why (and its module path)."""

    segments: list[Segment]
    fallback: dict[str, list[str]]      # node name -> [op, module path, reason]
    skipped: list[str]                  # assertion nodes with no result (dropped)
    counted: dict[str, str]             # dynamic node name -> op (every op the model runs per call)

    @property
    def fully_converted(self) -> bool:
        return not self.fallback and all(s.kind == "tensorrt" for s in self.segments)

    def to_json(self) -> dict:
        # Lists, not objects: a JSON writer that sorts keys must not reorder the graph-ordered tables.
        return {"segments": [s.to_json() for s in self.segments],
                "fallback": [[k] + list(v) for k, v in self.fallback.items()],
                "skipped": self.skipped, "counted": [[k, v] for k, v in self.counted.items()]}

    @classmethod
    def from_json(cls, d: Mapping) -> PartitionPlan:
        return cls([Segment.from_json(s) for s in d["segments"]], {e[0]: list(e[1:]) for e in d["fallback"]},
                   list(d.get("skipped", [])), {e[0]: e[1] for e in d.get("counted", [])})


# Torch-TensorRT lowers these composite ops to the op named on the left, so its users name that op
# ("aten.convolution.default"); our lowering keeps them whole (refitcore.capture.lowering), and
# naming the op they decompose to names them.
_KEPT_WHOLE = {"aten.convolution": tuple(str(op) for op in CONV_OPS)}


def _known_op(name: str) -> bool:
    """Whether ``'ns.op'`` or ``'ns.op.overload'`` is an operator torch has."""
    parts = name.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        return False
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
    except (AttributeError, RuntimeError):
        return False
    return len(parts) == 2 or parts[2] in packet.overloads()


def executed_op_names(ops: Iterable[Any]) -> tuple[str, ...]:
    """``torch_executed_ops`` as sorted canonical names, ``'aten.embedding.default'`` (one overload)
    or ``'aten.embedding'`` (every overload), however a user spells them: an op overload
    (``torch.ops.aten.embedding.default``), a packet (``torch.ops.aten.embedding``), or a string in
    either form, with or without ``'torch.ops.'`` (or as a schema, ``'aten::embedding'``). Raises
    :class:`ValueError` naming every entry that is no operator torch has: a misspelt op would
    otherwise be ignored silently."""
    if isinstance(ops, str):
        ops = [ops]
    names, unknown = set(), []
    for op in ops:
        name = (op if isinstance(op, str) else str(op)).strip()
        name = name.removeprefix("torch.ops.").replace("::", ".")
        if _known_op(name):
            names.add(name)
        else:
            unknown.append(op if isinstance(op, str) else f"{op!r} ({type(op).__name__})")
    if unknown:
        raise ValueError(f"torch_executed_ops: {unknown} name no operator torch has; give ATen ops as "
                         f"torch.ops.aten.<op>.<overload>, torch.ops.aten.<op> or their names "
                         f"('aten.<op>.<overload>', 'aten.<op>')")
    return tuple(sorted(names))


def op_matcher(ops: Iterable[Any]) -> Callable[[Any], bool]:
    """A predicate on node targets from user-given ops (any spelling :func:`executed_op_names`
    takes): an overload matches itself, a packet every overload of it, and an op that our lowering
    keeps whole matches when the op it decomposes to is named (``aten.convolution``: the convs)."""
    names = set(executed_op_names(ops))
    names |= {whole for name in list(names) for packet, kept in _KEPT_WHOLE.items()
              if name == packet or name.startswith(packet + ".") for whole in kept}

    def match(target) -> bool:
        name = str(target)
        return name in names or any(name.startswith(n + ".") for n in names)

    return match


def executed_op_nodes(ep, ops: Iterable[Any]) -> tuple[list[fx.Node], list[str]]:
    """(the nodes that depend on the inputs and that ``ops`` name, the names among ``ops`` that
    match no node of the graph at all)."""
    names = executed_op_names(ops)
    dynamic = dynamic_node_names(ep)
    calls = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    unmatched = [name for name in names if not any(op_matcher([name])(n.target) for n in calls)]
    user_op = op_matcher(names)
    return [n for n in calls if n.name in dynamic and user_op(n.target)], unmatched


def _tensors(val) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []


def _dtype_problem(node: fx.Node) -> str | None:
    vals = _tensors(node.meta.get("val"))
    for a in node.all_input_nodes:
        if a.op != "get_attr":
            vals += _tensors(a.meta.get("val"))
    for v in vals:
        if v.dtype not in TRT_DTYPES:
            return f"dtype {str(v.dtype).replace('torch.', '')} has no TensorRT equivalent here"
    return None


def _is_assertion(node: fx.Node) -> bool:
    return not node.users and node.meta.get("val", None) is None and "assert" in str(node.target)


def _assertions(gm: fx.GraphModule) -> set[str]:
    """Runtime assertions (no result, no users) and the nodes that only feed them (the symbolic
    sizes a data-dependent shape is checked with): they compute nothing the model returns."""
    dead: set[str] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function":
            continue
        if _is_assertion(node) or (node.users and all(u.name in dead for u in node.users)):
            dead.add(node.name)
    return dead


def partition(ep, *, torch_executed_ops: Iterable[Any] = (), min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
              forced: Mapping[str, str] | None = None) -> PartitionPlan:
    """Plan the segments of an exported program (``forced``: node name -> reason to run it in PyTorch)."""
    if min_block_size < 1:
        raise ValueError(f"min_block_size must be >= 1, got {min_block_size}")
    gm = ep.graph_module
    dynamic = dynamic_node_names(ep)
    user_op = op_matcher(torch_executed_ops)
    forced = dict(forced or {})
    order: list[fx.Node] = []
    skipped: list[str] = sorted(_assertions(gm), key=[n.name for n in gm.graph.nodes].index)
    dropped = set(skipped)
    reasons: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name not in dynamic or node.name in dropped or is_size_node(node):
            continue   # a size (dynamic shapes) is computed by each segment that reads it: _with_sizes
        order.append(node)
        if node.target is operator.getitem:
            continue
        reason = forced.get(node.name)
        if reason is None and user_op(node.target):
            reason = "listed in torch_executed_ops"
        if reason is None:
            problem = node_problem(node)
            if problem is not None:
                reason = f"no converter ({problem})" if problem else "no converter"
        if reason is None:
            reason = _dtype_problem(node)
        if reason is not None:
            reasons[node.name] = reason
    kinds: dict[str, str] = {}
    for node in order:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].name in kinds:
            kinds[node.name] = kinds[node.args[0].name]
        else:
            kinds[node.name] = "torch" if node.name in reasons else "tensorrt"
    runs = _runs(order, kinds)
    for run in runs:
        if run[0] == "tensorrt":
            size = sum(1 for n in run[1] if n.target is not operator.getitem)
            if size < min_block_size:
                for n in run[1]:
                    kinds[n.name] = "torch"
                    if n.target is not operator.getitem:
                        reasons[n.name] = f"in a convertible run of {size} op(s) < min_block_size={min_block_size}"
    segments = [Segment(kind, _with_sizes(gm, [n.name for n in nodes])) for kind, nodes in _runs(order, kinds)]
    _wire(gm, segments, dynamic)
    fallback = {name: [_op(n), module_path(n), reasons[name]] for n in order
                for name in [n.name] if kinds[name] == "torch" and name in reasons}
    counted = {n.name: _op(n) for n in order if n.target is not operator.getitem}
    return PartitionPlan(segments, fallback, skipped, counted)


def _op(node: fx.Node) -> str:
    return "getitem" if node.target is operator.getitem else str(node.target)


def _runs(order: list[fx.Node], kinds: Mapping[str, str]) -> list[tuple[str, list[fx.Node]]]:
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in order:
        kind = kinds[node.name]
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(node)
        else:
            runs.append((kind, [node]))
    return runs


def _with_sizes(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """``names`` and the size nodes they read (``sym_size.int`` and arithmetic on sizes, under dynamic
    shapes), in graph order. A size belongs to no segment of its own: each segment that reads one
    computes it from the tensors it reads it from (a TensorRT segment as shape arithmetic in its
    network, those tensors then being its inputs), so a size never splits a run of TensorRT ops and
    never crosses between segments."""
    nodes = {n.name: n for n in gm.graph.nodes}
    want = dict.fromkeys(names)
    stack = list(names)
    while stack:
        for a in nodes[stack.pop()].all_input_nodes:
            if a.op == "call_function" and is_size_node(a) and a.name not in want:
                want[a.name] = None
                stack.append(a.name)
    if len(want) == len(names):
        return names
    return [n.name for n in gm.graph.nodes if n.name in want]


def _static_closure(node: fx.Node, dynamic: set[str], into: dict[str, fx.Node]) -> None:
    """The weight-only nodes ``node`` reads (recursively), excluding placeholders."""
    if node.target in SHAPE_ONLY_OPS:
        return
    for a in node.all_input_nodes:
        if a.op == "call_function" and a.name not in dynamic and a.name not in into:
            _static_closure(a, dynamic, into)
            into[a.name] = a


def _wire(gm: fx.GraphModule, segments: list[Segment], dynamic: set[str]) -> None:
    """Fill each segment's ``inputs`` (dynamic values it reads from outside: user inputs or earlier
    segments' nodes) and ``outputs`` (its nodes read by later segments or the graph output)."""
    owners: dict[str, set[int]] = {}   # a size node is in every segment that reads it
    for i, s in enumerate(segments):
        for name in s.nodes:
            owners.setdefault(name, set()).add(i)
    nodes = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    needed_later: dict[str, set[int]] = {}
    for i, seg in enumerate(segments):
        reads: dict[str, None] = {}
        members: dict[str, fx.Node] = {}
        for name in seg.nodes:
            _static_closure(nodes[name], dynamic, members)
        for node in [nodes[n] for n in seg.nodes] + list(members.values()):
            for a in node.all_input_nodes:
                if a.name in dynamic and i not in owners.get(a.name, ()) and node.target not in SHAPE_ONLY_OPS:
                    reads[a.name] = None
        seg.inputs = list(reads)
        for name in seg.inputs:
            needed_later.setdefault(name, set()).add(i)
    graph_out = {a.name for a in out_node.all_input_nodes}
    for i, seg in enumerate(segments):
        seg.outputs = [n for n in seg.nodes if n in graph_out or any(j != i for j in needed_later.get(n, ()))]


@dataclasses.dataclass
class SubProgram:
    """What :func:`refitcore.conversion.convert.convert` reads of an ExportedProgram, for one segment."""

    graph_module: fx.GraphModule
    graph_signature: Any
    state_dict: dict
    constants: dict

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def subprogram(ep, segment: Segment) -> SubProgram:
    """The segment as a program of its own: placeholders for its inputs (user inputs and earlier
    segments' values, named as in the whole graph, so layer names stay those of the model), the
    parameters/buffers/constants it reads, its nodes and their weight-only ancestors."""
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    dynamic = dynamic_node_names(ep)
    nodes = {n.name: n for n in gm.graph.nodes}
    members: dict[str, fx.Node] = {}
    for name in segment.nodes:
        _static_closure(nodes[name], dynamic, members)
        members[name] = nodes[name]
    ordered = [n for n in gm.graph.nodes if n.name in members]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    input_specs: list[InputSpec] = []
    constants = dict(getattr(ep, "constants", {}) or {})

    def add_placeholder(src: fx.Node, spec: InputSpec) -> fx.Node:
        ph = graph.placeholder(src.name)
        ph.meta = dict(src.meta)
        env[src] = ph
        # fx renames a placeholder that shadows a builtin ('input' -> 'input_1'): the spec names it as fx does.
        input_specs.append(dataclasses.replace(spec, arg=TensorArgument(ph.name)))
        return ph

    user_in = set(segment.inputs)
    for name in segment.inputs:   # segment inputs first, in a fixed order: the network's inputs
        add_placeholder(nodes[name], InputSpec(InputKind.USER_INPUT, TensorArgument(name), None))
    for node in ordered:
        for a in node.all_input_nodes:
            if a in env:
                continue
            if a.op == "placeholder" and a.name not in user_in:
                s = specs[a.name]
                if s.kind == InputKind.USER_INPUT:
                    continue   # a user input read only for its shape (below)
                add_placeholder(a, InputSpec(s.kind, TensorArgument(a.name), s.target,
                                             getattr(s, "persistent", None)))
            elif a.name not in members and node.target in SHAPE_ONLY_OPS:
                continue
    for node in ordered:
        for a in node.all_input_nodes:
            if a not in env and node.target in SHAPE_ONLY_OPS:
                # Only its shape and dtype matter: a constant stand-in keeps the op foldable.
                cname = f"_shape_of_{a.name}"
                val = a.meta["val"]
                constants[cname] = torch.zeros(val.shape, dtype=val.dtype)
                add_placeholder(a, InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(a.name), cname))
        env[node] = graph.node_copy(node, lambda a: env[a])
    outs = tuple(env[nodes[n]] for n in segment.outputs)
    graph.output(outs)
    sub_gm = fx.GraphModule(torch.nn.Module(), graph)
    signature = types.SimpleNamespace(input_specs=input_specs)
    return SubProgram(sub_gm, signature, dict(ep.state_dict), constants)


def segment_profiles(ep, segment: Segment, profiles: ShapeProfiles | None) -> ShapeProfiles | None:
    """The shape ranges of a TensorRT segment's inputs under the engine's ``profiles`` (None when the
    engine is static): each size of a segment input is an expression of the model inputs' size
    symbols (``s0``, ``2*s0``, ``s0 - 1``), evaluated at every profile's min, opt and max (its least
    and greatest value over the two ends: sizes are monotonic in their symbols in the graphs
    torch.export makes). Sizes of one expression share a dimension name, so ties stay ties.
    Raises ``ValueError`` for a size of a symbol no model input carries (data-dependent)."""
    if profiles is None:
        return None
    where: dict[Any, tuple[int, int]] = {}     # symbol -> (input index, dim)
    for i, (_name, shape) in enumerate(tensor_inputs(ep)):
        for d, size in enumerate(shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                where.setdefault(size.node.expr, (i, d))
    nodes = {n.name: n for n in ep.graph_module.graph.nodes}

    def table(p: int) -> tuple:
        rows = []
        for name in segment.inputs:
            row = []
            for size in nodes[name].meta["val"].shape:
                if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
                    row.append((int(size),) * 3)
                    continue
                expr = size.node.expr
                missing = [str(sym) for sym in expr.free_symbols if sym not in where]
                if missing:
                    raise ValueError(f"segment input {name!r}: its size {expr} depends on {missing}, which no model "
                                     f"input carries (a data-dependent size)")
                ends = [int(expr.subs({sym: profiles.profiles[p][where[sym][0]][where[sym][1]][k]
                                       for sym in expr.free_symbols})) for k in range(3)]
                lo, hi = min(ends[0], ends[2]), max(ends[0], ends[2])
                row.append((lo, min(max(ends[1], lo), hi), hi))
            rows.append(tuple(row))
        return tuple(rows)

    tables = tuple(table(p) for p in range(len(profiles.profiles)))
    ranges = tuple(tuple((min(t[i][d][0] for t in tables), tables[0][i][d][1], max(t[i][d][2] for t in tables))
                         for d in range(len(tables[0][i]))) for i in range(len(segment.inputs)))
    dim_names = tuple(tuple(None if isinstance(size, int) or size.node.expr.is_number else str(size.node.expr)
                            for size in nodes[name].meta["val"].shape) for name in segment.inputs)
    return ShapeProfiles(tuple(segment.inputs), ranges, tables, dim_names)
