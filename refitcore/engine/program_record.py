"""The compiled graph, saved with the engine as data: what lets a loaded engine's fallback path
convert again without exporting the model anew.

An engine compiled in this process keeps its ``ExportedProgram``, and its fallback path converts
that program with the new weights. A loaded engine has none (an ``ExportedProgram`` is saved with
pickle, which an engine file may not hold), so it used to rebuild the eager model and run
``torch.export`` and the decompositions again: seconds of graph work, whatever the weights, where
converting the graph takes a fraction of a second. The program record is the lowered graph as JSON,
written by :meth:`refitcore.engine.refittable.RefittableEngine.save`:

- ``inputs``: the placeholders in graph order, each with its input kind (``PARAMETER``, ``BUFFER``,
  ``CONSTANT_TENSOR``, ``USER_INPUT``...), the state_dict key or constant it reads, and its value's
  shape and dtype;
- ``nodes``: every op call, as a PyTorch segment's records are (:mod:`refitcore.partition.torch_program`:
  ``aten`` overloads of the allowlist and ``getitem`` only; operands ``{"node": name}``, dtypes,
  devices, layouts, memory formats and JSON literals), plus the shape and dtype of its value (``val``)
  and the module path that made it (``module``: layer names and the fingerprint read it);
- ``outputs``: the output node's operands and the output specs;
- the lifted tensor constants and non-persistent buffers, as arrays of the file (``p/<name>``).

:func:`rebuild_program` turns a record and new weights into a program :func:`refitcore.conversion.convert.convert`
and :func:`refitcore.partition.partitioner.subprogram` read (graph module, graph signature, state_dict,
constants): no op is run, nothing is imported, node values are ``meta`` tensors. The fallback then
checks the rebuilt graph's fingerprint against the engine's before it converts, so a record that does
not describe the compiled graph is never used (:func:`refitcore.engine.reexport.exported_for`).

Recorded only for graphs of static shapes: a dynamic size is a ``SymInt`` of a shape environment, which
the record does not carry; such engines (and graphs with ``torch.cond``, or a value the record has no
form for) re-export as before, and :func:`record_program` says why.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export.graph_signature import (
    ConstantArgument,
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

from refitcore import dtypes
from refitcore.capture.lowering import module_path
from refitcore.conversion import allowed_ops
from refitcore.engine.bundle import MAX_RANK
from refitcore.engine.kinds import state_array
from refitcore.errors import BundleContentError, UnsupportedOperatorError
from refitcore.options import MAX_TENSOR_ELEMENTS
from refitcore.partition.torch_program import LAYOUTS, MEMORY_FORMATS, check_records, collect_refs, encode_value

__all__ = ["VERSION", "record_program", "check_program", "rebuild_program", "weight_inputs", "RecordedProgram",
           "RecordedGraph",
           "NotRecordable"]

VERSION = 1
MAX_NODES = 1_000_000
_INPUT_KINDS = {k.name: k for k in InputKind}
_OUTPUT_KINDS = {k.name: k for k in OutputKind}


class NotRecordable(Exception):
    """The graph has something the record has no form for (the message says what and where)."""


# ---- writing --------------------------------------------------------------------------------------
def _val(value: Any, where: str) -> Any:
    """A node's meta value as JSON: ``{"tensor": shape, "dtype": name}``, a list of them, a literal."""
    if isinstance(value, torch.Tensor):
        if any(isinstance(s, torch.SymInt) for s in value.shape):
            raise NotRecordable(f"{where} has a dynamic size ({tuple(value.shape)})")
        return {"tensor": [int(s) for s in value.shape], "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, (list, tuple)):
        return [_val(v, where) for v in value]
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise NotRecordable(f"{where} is a symbolic size")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NotRecordable(f"{where} has a value of type {type(value).__name__}")


def _arg_spec(arg: Any, where: str) -> dict:
    if isinstance(arg, TensorArgument):
        return {"tensor": arg.name}
    if isinstance(arg, ConstantArgument) and (arg.value is None or isinstance(arg.value, (bool, int, float, str))):
        return {"constant": arg.name, "value": arg.value}
    raise NotRecordable(f"{where} is a {type(arg).__name__}")


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    name = str(node.target)
    if not allowed_ops.is_allowed(name):
        raise NotRecordable(f"node {node.name!r} calls {name}, which an engine file may not name "
                            f"(refitcore.conversion.allowed_ops)")
    return name


def record_program(ep: Any) -> tuple[dict | None, dict[str, np.ndarray], str | None]:
    """(record, constant arrays by name, None) of a lowered program, or (None, {}, why) when it
    cannot be recorded (dynamic shapes, ``torch.cond``, a value without a JSON form)."""
    try:
        return _record(ep) + (None,)
    except (NotRecordable, UnsupportedOperatorError, TypeError, KeyError, ValueError) as err:
        return None, {}, f"{type(err).__name__}: {err}" if not isinstance(err, NotRecordable) else str(err)


def _record(ep: Any) -> tuple[dict, dict[str, np.ndarray]]:
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    ref = lambda a: {"node": a.name}   # noqa: E731 - every operand is a node of the record's own graph
    inputs, nodes, outputs = [], [], None
    for node in gm.graph.nodes:
        where = f"node {node.name!r}"
        if node.op == "placeholder":
            spec = specs[node.name]
            inputs.append({"name": node.name, "kind": spec.kind.name, "arg": _arg_spec(spec.arg, where),
                           "target": spec.target, "persistent": spec.persistent,
                           "val": _val(node.meta.get("val"), where)})
        elif node.op == "call_function":
            args = encode_value(list(node.args), ref)
            kwargs = [[k, encode_value(v, ref)] for k, v in node.kwargs.items()]
            try:
                _check_operands(_operands({"args": args, "kwargs": kwargs}), where)
            except BundleContentError as err:
                raise NotRecordable(str(err)) from None
            # kwargs as [name, operand] pairs: the file's JSON is written with sorted keys, and the
            # fingerprint sees keyword arguments in the graph's order
            nodes.append({"name": node.name, "op": _op_name(node), "args": args, "kwargs": kwargs,
                          "val": _val(node.meta.get("val"), where), "module": module_path(node)})
        elif node.op == "output":
            outputs = {"args": encode_value(list(node.args), ref),
                       "specs": [{"kind": s.kind.name, "arg": _arg_spec(s.arg, "an output"), "target": s.target}
                                 for s in ep.graph_signature.output_specs]}
        else:
            raise NotRecordable(f"{where} is a {node.op} node")
    constants: dict[str, np.ndarray] = {}
    for name, value in (getattr(ep, "constants", None) or {}).items():
        if not isinstance(value, torch.Tensor):
            raise NotRecordable(f"the constant {name!r} is a {type(value).__name__}, not a tensor")
        constants[name] = np.array(state_array(value.detach()), copy=True)
    return {"version": VERSION, "inputs": inputs, "nodes": nodes, "outputs": outputs}, constants


# ---- checking (at load) -----------------------------------------------------------------------------
def _fail(where: str, what: str) -> BundleContentError:
    return BundleContentError(f"the engine file's program record: {where}: {what}")


def _check_val(v: Any, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise _fail(where, "value nests too deep")
    if v is None or isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, list):
        for x in v:
            _check_val(x, where, depth + 1)
        return
    if not (isinstance(v, dict) and set(v) == {"tensor", "dtype"} and isinstance(v["tensor"], list)
            and len(v["tensor"]) <= MAX_RANK
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["tensor"])):
        raise _fail(where, f"malformed value {str(v)[:80]}")
    if math.prod(v["tensor"]) > MAX_TENSOR_ELEMENTS:   # stand-ins of this shape are made (SHAPE_ONLY_OPS)
        raise _fail(where, f"a value of {math.prod(v['tensor'])} elements (more than {MAX_TENSOR_ELEMENTS})")
    allowed_ops.decode_dtype(v["dtype"], f"the engine file's program record: {where}")


def _check_arg(a: Any, where: str) -> None:
    ok = isinstance(a, dict) and (
        (set(a) == {"tensor"} and isinstance(a["tensor"], str))
        or (set(a) == {"constant", "value"} and isinstance(a["constant"], str)
            and (a["value"] is None or isinstance(a["value"], (bool, int, float, str)))))
    if not ok:
        raise _fail(where, f"malformed argument {str(a)[:80]}")


def check_program(record: Any, constants: Mapping[str, np.ndarray]) -> None:
    """Refuse (:class:`BundleContentError`) a record that is not one: unknown fields or kinds, an op
    outside the allowlist, a malformed operand or value, a node read before it is made or made twice,
    a constant the file does not hold. Nothing is evaluated."""
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise _fail("header", f"not a version {VERSION} record")
    inputs, nodes, outputs = record.get("inputs"), record.get("nodes"), record.get("outputs")
    if not (isinstance(inputs, list) and isinstance(nodes, list) and isinstance(outputs, dict)):
        raise _fail("header", "inputs, nodes and outputs must be a list, a list and an object")
    if len(inputs) + len(nodes) > MAX_NODES:
        raise _fail("header", f"more than {MAX_NODES} nodes")
    seen: set[str] = set()
    for i, inp in enumerate(inputs):
        if not (isinstance(inp, dict) and set(inp) == {"name", "kind", "arg", "target", "persistent", "val"}
                and isinstance(inp["name"], str) and inp["kind"] in _INPUT_KINDS
                and isinstance(inp["target"], (str, type(None))) and isinstance(inp["persistent"], (bool, type(None)))):
            raise _fail(f"input {i}", "not an input record")
        here = f"input {inp['name'][:80]!r}"
        _check_arg(inp["arg"], here)
        _check_val(inp["val"], here)
        kind = _INPUT_KINDS[inp["kind"]]
        if kind == InputKind.CONSTANT_TENSOR or (kind == InputKind.BUFFER and inp["persistent"] is False):
            if inp["target"] not in constants:
                raise _fail(here, f"the constant {str(inp['target'])[:80]!r} is not in the file")
        elif kind not in (InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER):
            raise _fail(here, f"input kind {inp['kind']} is not supported")
        if inp["name"] in seen:
            raise _fail(here, "defined twice")
        seen.add(inp["name"])
    plain = []
    for i, r in enumerate(nodes):
        if not (isinstance(r, dict) and set(r) == {"name", "op", "args", "kwargs", "val", "module"}
                and isinstance(r["module"], str) and isinstance(r["kwargs"], list)
                and all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in r["kwargs"])
                and len({kv[0] for kv in r["kwargs"]}) == len(r["kwargs"])):
            raise _fail(f"node {i}", "not a node record")
        if not isinstance(r["op"], str) or r["op"] == "cond" or r["op"].startswith("operator."):
            raise _fail(f"node {i}", f"op {str(r['op'])[:80]} is not part of a program record")
        _check_operands(_operands(r), f"node {r['name']!r}"[:90])
        plain.append({"name": r["name"], "op": r["op"], "args": r["args"], "kwargs": dict(r["kwargs"])})
    check_records(plain, "the engine file's program record")   # allowlisted ops, operand kinds, literal sizes
    for r in nodes:
        where = f"node {r['name'][:80]!r}"
        _check_val(r["val"], where)
        for name in _node_refs(_operands(r)):
            if name not in seen:
                raise _fail(where, f"reads {name[:80]!r} before it is made")
        if r["name"] in seen:
            raise _fail(where, "defined twice")
        seen.add(r["name"])
    if not (set(outputs) == {"args", "specs"} and isinstance(outputs["specs"], list)
            and isinstance(outputs["args"], list) and len(outputs["args"]) == 1):
        raise _fail("outputs", "not an output record")
    for s in outputs["specs"]:
        if not (isinstance(s, dict) and set(s) == {"kind", "arg", "target"} and s["kind"] in _OUTPUT_KINDS
                and isinstance(s["target"], (str, type(None)))):
            raise _fail("outputs", f"malformed output spec {str(s)[:80]}")
        _check_arg(s["arg"], "outputs")
    _check_operands(outputs["args"], "outputs")
    for name in _node_refs(outputs["args"]):
        if name not in seen:
            raise _fail("outputs", f"read {name[:80]!r}, which is not made")


# No "dict": a file's JSON is written with sorted keys, and the fingerprint sees a dict in its own order.
_OPERAND_KINDS = ("node", "dtype", "device", "layout", "memory_format")
_DEVICE = re.compile(r"(cpu|meta|cuda)(:[0-9]{1,3})?")


def _check_operands(operand: Any, where: str, depth: int = 0) -> None:
    """Only the operand kinds a record's graph has (PyTorch segments' ``param``/``const``/``zeros``/``graph``
    are not), and devices by name."""
    if depth > 64:
        raise _fail(where, "operands nest too deep")
    if isinstance(operand, list):
        for v in operand:
            _check_operands(v, where, depth + 1)
    elif isinstance(operand, dict):
        if len(operand) != 1 or next(iter(operand)) not in _OPERAND_KINDS:
            raise _fail(where, f"operand {str(operand)[:80]} is not part of a program record")
        (kind, value), = operand.items()
        if kind == "device" and not (isinstance(value, str) and _DEVICE.fullmatch(value)):
            raise _fail(where, f"device {str(value)[:40]!r} is not one")
    elif not (operand is None or isinstance(operand, (bool, int, float, str))):
        raise _fail(where, f"operand {str(operand)[:80]} is not JSON data")


def _operands(record: dict) -> list:
    """A node record's positional and keyword operands, as one operand list."""
    return [record["args"], [v for _, v in record["kwargs"]]]


def _node_refs(operand: Any) -> dict:
    """The node names ``operand`` reads, in order (the keys of the dict)."""
    refs: dict = {}
    collect_refs(operand, "node", refs, alone=True)
    return refs


# ---- rebuilding ---------------------------------------------------------------------------------------
def weight_inputs(record: dict, state: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(the state_dict keys the graph reads and ``state`` lacks; stand-ins for those it lacks that no
    node reads). A checkpoint may leave out a buffer the model keeps but its forward never reads
    (BatchNorm's ``num_batches_tracked``): the graph still lifts it as an input, so it gets a stand-in of
    its recorded shape and dtype (one zero, broadcast: no memory), which nothing reads."""
    read = _node_refs([[_operands(r) for r in record["nodes"]], record["outputs"]["args"]])
    missing, stand_ins = [], {}
    for inp in record["inputs"]:
        key = inp["target"]
        if inp["kind"] not in ("PARAMETER", "BUFFER") or inp["persistent"] is False or key in state:
            continue
        if inp["name"] in read or not isinstance(inp["val"], dict):
            missing.append(key)
        else:
            dtype = allowed_ops.decode_dtype(inp["val"]["dtype"], "program record")
            stand_ins[key] = torch.zeros((), dtype=dtype).expand(inp["val"]["tensor"])
    return missing, stand_ins



@dataclasses.dataclass
class RecordedGraph:
    """What is read of a program's graph module: its graph. (An ``fx.GraphModule`` would generate and
    compile Python code for it, which nothing here runs.)"""

    graph: fx.Graph


@dataclasses.dataclass
class RecordedProgram:
    """A program rebuilt from a record: what :func:`refitcore.conversion.convert.convert`,
    :func:`refitcore.capture.lowering.graph_fingerprint` and the partitioner read of an
    ``ExportedProgram``. ``state_dict``: the new weights (the caller's mapping, not copied)."""

    graph_module: RecordedGraph
    graph_signature: ExportGraphSignature
    state_dict: Mapping[str, torch.Tensor]
    constants: dict[str, torch.Tensor]

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def _meta(v: Any) -> Any:
    if isinstance(v, dict):
        return torch.empty(v["tensor"], dtype=allowed_ops.decode_dtype(v["dtype"], "program record"), device="meta")
    if isinstance(v, list):
        return tuple(_meta(x) for x in v)
    return v


def _decode(operand: Any, env: Mapping[str, fx.Node]) -> Any:
    if isinstance(operand, list):
        return [_decode(v, env) for v in operand]
    if not isinstance(operand, dict):
        return operand
    (kind, value), = operand.items()
    if kind == "node":
        return env[value]
    if kind == "dtype":
        return allowed_ops.decode_dtype(value, "program record")
    if kind == "device":
        return torch.device(value)
    if kind == "layout":
        return LAYOUTS[value]
    if kind == "memory_format":
        return MEMORY_FORMATS[value]
    raise _fail("operand", f"{kind} operands are not part of a program record")


def _arg(a: dict):
    return TensorArgument(a["tensor"]) if "tensor" in a else ConstantArgument(a["constant"], a["value"])


def rebuild_program(record: dict, constants: Mapping[str, np.ndarray], state: Mapping[str, torch.Tensor]
                    ) -> RecordedProgram:
    """The program of a checked record (:func:`check_program`) with ``state`` as its weights."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    input_specs = []
    for inp in record["inputs"]:
        node = graph.placeholder(inp["name"])
        # fx renames a name that shadows a builtin ('input' -> 'input_1'); the exported graph kept it,
        # and layer names and the fingerprint read it.
        node.name = inp["name"]
        node.meta["val"] = _meta(inp["val"])
        env[inp["name"]] = node
        input_specs.append(InputSpec(_INPUT_KINDS[inp["kind"]], _arg(inp["arg"]), inp["target"], inp["persistent"]))
    for r in record["nodes"]:
        target = operator.getitem if r["op"] == "getitem" else allowed_ops.resolve(r["op"], f"node {r['name']!r}")
        node = graph.create_node("call_function", target, tuple(_decode(r["args"], env)),
                                 {k: _decode(v, env) for k, v in r["kwargs"]}, name=r["name"])
        node.meta["val"] = _meta(r["val"])
        if r["module"]:
            node.meta["nn_module_stack"] = {r["module"]: (r["module"], "")}
        env[r["name"]] = node
    (out,) = _decode(record["outputs"]["args"], env)
    graph.output(tuple(out) if isinstance(out, list) else out)
    output_specs = [OutputSpec(_OUTPUT_KINDS[s["kind"]], _arg(s["arg"]), s["target"])
                    for s in record["outputs"]["specs"]]
    return RecordedProgram(RecordedGraph(graph), ExportGraphSignature(input_specs, output_specs), state,
                           {k: dtypes.as_torch(v) for k, v in constants.items()})
