"""The PyTorch side of a partitioned engine: ATen graph nodes stored as JSON data and a small
interpreter that runs them.

A node record is ``{"name": n, "op": "aten.<op>.<overload>" | "getitem" | "cond", "args": [...],
"kwargs": {...}}``. Operands: ``{"node": name}`` (another node's value, or a graph input),
``{"param": key}`` (a state_dict entry: parameters and buffers, refitted with the engine),
``{"const": name}`` (a literal tensor stored with the program: lifted constants,
non-persistent buffers), ``{"zeros": [shape, dtype]}`` (a stand-in whose shape and dtype are all
an op reads: ``new_zeros``, ``zeros_like``...), ``{"dtype"|"device"|"layout"|"memory_format": ...}``,
``{"graph": {...}}`` (a ``torch.cond`` branch, itself a program), and JSON literals.

Ops are resolved only in the ``aten`` namespace (as the weight map's operands are), plus a closed
table of Python operators on symbolic sizes (``operator.ge``...); nothing a program names is ever
imported.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from refitcore.conversion.recipes import resolve_aten_op

__all__ = ["encode_nodes", "TorchProgram", "encode_value", "decode_dtype", "PY_OPS"]

aten = torch.ops.aten
SHAPE_ONLY_OPS = frozenset({aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                            aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                            aten.empty_like.default})


def decode_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def encode_value(value: Any, ref: Callable[[fx.Node], Any]) -> Any:
    """A node argument as JSON data; ``ref`` encodes a reference to another node."""
    if isinstance(value, fx.Node):
        return ref(value)
    if isinstance(value, (list, tuple)):
        return [encode_value(v, ref) for v in value]
    if isinstance(value, dict):
        return {"dict": {str(k): encode_value(v, ref) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).replace("torch.", "")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store an argument of type {type(value).__name__} in a PyTorch segment")


# Python arithmetic on symbolic sizes (data-dependent shapes): a closed table, never imported by name.
PY_OPS = {f"operator.{f.__name__}": f for f in (
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.pow,
    operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.not_)}
_PY_BY_FN = {f: name for name, f in PY_OPS.items()}


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    if node.target is torch.ops.higher_order.cond:
        return "cond"
    if node.target in _PY_BY_FN:
        return _PY_BY_FN[node.target]
    name = str(node.target)
    if not name.startswith("aten."):
        raise TypeError(f"node {node.name}: op {name} is not an ATen op; a PyTorch segment stores ATen ops only")
    return name


def encode_nodes(gm: fx.GraphModule, names: list[str], *, specs: Mapping[str, Any]) -> list[dict]:
    """Records for ``names`` (in graph order) of ``gm``; placeholders become ``param``/``const``/
    ``node`` operands (``specs``: placeholder name -> InputSpec)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return [_encode_node(gm, nodes[name], specs) for name in names]


def _placeholder_ref(node: fx.Node, specs: Mapping[str, Any]) -> dict:
    spec = specs.get(node.name)
    if spec is None or spec.kind == InputKind.USER_INPUT:
        return {"node": node.name}
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.persistent is not False:
        return {"param": spec.target}
    return {"const": spec.target}


def _encode_node(gm, node: fx.Node, specs) -> dict:
    def ref(a: fx.Node):
        if a.op == "placeholder":
            return _placeholder_ref(a, specs)
        if node.target in SHAPE_ONLY_OPS:
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                return {"zeros": [list(val.shape), _dtype_name(val.dtype)]}
        if a.op == "get_attr" and isinstance(a.target, str):   # a get_attr's target is the attribute path
            sub = getattr(gm, a.target)
            return {"graph": encode_graph(sub)}
        return {"node": a.name}

    return {"name": node.name, "op": _op_name(node), "args": encode_value(list(node.args), ref),
            "kwargs": {k: encode_value(v, ref) for k, v in node.kwargs.items()}}


def encode_graph(gm: fx.GraphModule) -> dict:
    """A whole (sub)graph, e.g. a ``torch.cond`` branch: inputs, node records, outputs."""
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    calls = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    records = encode_nodes(gm, calls, specs={})
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return {"inputs": inputs, "nodes": records,
            "outputs": encode_value(out.args[0], lambda a: {"node": a.name})}


class TorchProgram:
    """Runs node records against an environment of values. ``params``/``constants``: name -> tensor."""

    def __init__(self, records: list[dict]):
        self.records = {r["name"]: r for r in records}
        # Where the program runs: the graph was exported on the CPU, so a device it names (factory
        # ops such as arange/full, stand-ins) means "where the inputs are".
        self.device: torch.device | None = None
        for r in records:
            self._check_ops(r)

    def _check_ops(self, record: dict) -> None:
        op = record["op"]
        if op not in ("getitem", "cond") and op not in PY_OPS:
            resolve_aten_op(op)  # raises for anything outside the aten namespace

    def value(self, operand: Any, env: dict, params: Mapping[str, torch.Tensor],
              constants: Mapping[str, torch.Tensor]) -> Any:
        if isinstance(operand, list):
            return [self.value(v, env, params, constants) for v in operand]
        if not isinstance(operand, dict):
            return operand
        if "node" in operand:
            name = operand["node"]
            if name not in env:
                if name not in self.records:
                    raise KeyError(f"value {name!r} is neither computed yet nor part of the program")
                env[name] = self.run_node(self.records[name], env, params, constants)
            return env[name]
        if "param" in operand:
            return params[operand["param"]]
        if "const" in operand:
            return constants[operand["const"]]
        if "zeros" in operand:
            shape, dtype = operand["zeros"]
            return torch.zeros(shape, dtype=decode_dtype(dtype), device=self.device)
        if "dtype" in operand:
            return decode_dtype(operand["dtype"])
        if "device" in operand:
            return self.device if self.device is not None else torch.device(operand["device"])
        if "layout" in operand:
            return getattr(torch, operand["layout"])
        if "memory_format" in operand:
            return getattr(torch, operand["memory_format"])
        if "dict" in operand:
            return {k: self.value(v, env, params, constants) for k, v in operand["dict"].items()}
        if "graph" in operand:
            return operand["graph"]
        raise ValueError(f"unknown operand {operand!r}")

    def run_node(self, record: dict, env: dict, params, constants) -> Any:
        args = self.value(record["args"], env, params, constants)
        kwargs = {k: self.value(v, env, params, constants) for k, v in record["kwargs"].items()}
        op = record["op"]
        if op == "getitem":
            return args[0][args[1]]
        if op == "cond":
            pred, true_graph, false_graph, operands = args[:4]
            branch = true_graph if bool(pred) else false_graph
            return self.run_graph(branch, list(operands), params, constants)
        if op in PY_OPS:
            return PY_OPS[op](*args, **kwargs)
        return resolve_aten_op(op)(*args, **kwargs)

    def run_graph(self, graph: dict, inputs: list, params, constants) -> Any:
        sub = TorchProgram(graph["nodes"])
        sub.device = self.device
        env = dict(zip(graph["inputs"], inputs))
        for record in graph["nodes"]:
            env[record["name"]] = sub.run_node(record, env, params, constants)
        return sub.value(graph["outputs"], env, params, constants)

    def run(self, names: list[str], env: dict, params, constants) -> None:
        """Compute ``names`` in order into ``env`` (values already there are kept)."""
        for name in names:
            if name not in env:
                env[name] = self.run_node(self.records[name], env, params, constants)
