"""The PyTorch side of a partitioned engine: ATen graph nodes stored as JSON data and a small
interpreter that runs them.

A node record is ``{"name": n, "op": "aten.<op>.<overload>" | "getitem" | "cond", "args": [...],
"kwargs": {...}}``. Operands: ``{"node": name}`` (another node's value, or a graph input),
``{"param": key}`` (a state_dict entry: parameters and buffers, refitted with the engine),
``{"const": name}`` (a literal tensor stored with the program: lifted constants,
non-persistent buffers), ``{"zeros": [shape, dtype]}`` (a stand-in whose shape and dtype are all
an op reads: ``new_zeros``, ``zeros_like``...), ``{"dtype"|"device"|"layout"|"memory_format": ...}``,
``{"graph": {...}}`` (a ``torch.cond`` branch, itself a program), and JSON literals.

A program is data from a file: it names only ops of the allowlist
(:mod:`refitcore.conversion.allowed_ops`, as the weight map's operands do), a closed table of Python
operators on symbolic sizes (``operator.ge``...), ``getitem`` and ``cond``; nothing it names is ever
imported. :class:`TorchProgram` checks every record when it is built (at load): ops, operand kinds,
dtype, layout and memory-format names, literal sizes; at run time each op is first evaluated on the
``meta`` device and refused when it would make a tensor of more than ``MAX_TENSOR_ELEMENTS``.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from refitcore.capture.lowering import module_path
from refitcore.conversion import allowed_ops
from refitcore.errors import BundleContentError, UnsupportedOperatorError
from refitcore.options import MAX_TENSOR_ELEMENTS

__all__ = ["encode_nodes", "TorchProgram", "encode_value", "decode_dtype", "PY_OPS", "check_records", "collect_refs"]

aten = torch.ops.aten
SHAPE_ONLY_OPS = frozenset({aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                            aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                            aten.empty_like.default})


def decode_dtype(name: str, where: str = "PyTorch segment") -> torch.dtype:
    return allowed_ops.decode_dtype(name, where)


LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {f: getattr(torch, f) for f in ("contiguous_format", "preserve_format", "channels_last",
                                                  "channels_last_3d")}


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


def collect_refs(operand: Any, kind: str, into: dict, *, alone: bool = False) -> None:
    """Every ``operand[kind]`` of the ``{kind: ...}`` references in a record's operands, in order, as
    the keys of ``into`` (``alone``: only references that hold nothing else)."""
    if isinstance(operand, dict):
        if kind in operand and (not alone or len(operand) == 1):
            into[operand[kind]] = None
        for v in operand.values():
            collect_refs(v, kind, into, alone=alone)
    elif isinstance(operand, list):
        for v in operand:
            collect_refs(v, kind, into, alone=alone)


# Python arithmetic on symbolic sizes (data-dependent shapes): a closed table, never imported by name.
PY_OPS = {f"operator.{f.__name__}": f for f in (
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.pow,
    operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.not_)}
_PY_BY_FN = {f: name for name, f in PY_OPS.items()}
INT_LIMIT = 2 ** 64     # sizes are int64: a Python operator's int result beyond that is a crafted record


def _py_op(op: str, args: list, kwargs: dict, name: str) -> Any:
    where = f"PyTorch segment node {name!r}"
    if op == "operator.pow" and len(args) == 2 and all(isinstance(a, int) for a in args):
        base, exp = args
        if exp > 0 and abs(base) > 1 and exp * max(abs(base).bit_length() - 1, 1) > 64:
            raise BundleContentError(f"{where}: {op}{tuple(args)} is larger than any size")
    out = PY_OPS[op](*args, **kwargs)
    if isinstance(out, int) and abs(out) >= INT_LIMIT:
        raise BundleContentError(f"{where}: {op} gives {out.bit_length()}-bit int, larger than any size")
    return out


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    if node.target is torch.ops.higher_order.cond:
        return "cond"
    if node.target in _PY_BY_FN:
        return _PY_BY_FN[node.target]
    name = str(node.target)
    if not allowed_ops.is_allowed(name):
        reason = (f"{name} (would run in PyTorch, but an engine file may not name it: not in "
                  f"refitcore.conversion.allowed_ops)")
        raise UnsupportedOperatorError([(reason, module_path(node), node.name)])
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


_RECORD_FIELDS = {"name", "op", "args", "kwargs"}


def _signature(value: Any) -> Any:
    """What sizing an op on meta depends on: shapes and dtypes of tensors, the other arguments."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    return (type(value).__name__, value)


def _check_size(value: Any, where: str) -> None:
    """A literal size (a list of ints, e.g. ``full``'s ``size``): at most MAX_TENSOR_ELEMENTS elements."""
    if isinstance(value, list) and value and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        if any(d < -1 for d in value):
            raise BundleContentError(f"{where}: size {value[:8]} has a negative dimension")
        n = 1
        for d in value:
            n *= max(d, 1)
        if n > MAX_TENSOR_ELEMENTS:
            raise BundleContentError(f"{where}: size {value[:8]} has more than {MAX_TENSOR_ELEMENTS} elements")


def _check_operand(operand: Any, where: str, depth: int = 0) -> None:
    if depth > 64:
        raise BundleContentError(f"{where}: operands nest too deep")
    if operand is None or isinstance(operand, (bool, int, float, str)):
        return
    if isinstance(operand, list):
        for v in operand:
            _check_operand(v, where, depth + 1)
        return
    if not isinstance(operand, dict) or len(operand) != 1:
        raise BundleContentError(f"{where}: unknown operand {str(operand)[:80]}")
    (kind, value), = operand.items()
    if kind in ("node", "param", "const", "device"):
        ok = isinstance(value, str)
    elif kind == "zeros":
        ok = isinstance(value, list) and len(value) == 2
        if ok:
            shape, dtype = value
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in shape)):
                raise BundleContentError(f"{where}: stand-in shape {str(shape)[:80]} is not a list of "
                                         f"non-negative ints")
            _check_size(shape, where)
            decode_dtype(dtype, where)
    elif kind == "dtype":
        decode_dtype(value, where)
        ok = True
    elif kind == "layout":
        ok = value in LAYOUTS
    elif kind == "memory_format":
        ok = value in MEMORY_FORMATS
    elif kind == "dict":
        ok = isinstance(value, dict)
        for v in (value.values() if ok else ()):
            _check_operand(v, where, depth + 1)
    elif kind == "graph":
        ok = (isinstance(value, dict) and isinstance(value.get("inputs"), list)
              and all(isinstance(n, str) for n in value["inputs"]) and isinstance(value.get("nodes"), list))
        if ok:
            check_records(value["nodes"], f"{where} (cond branch)", depth + 1)
            _check_operand(value.get("outputs"), where, depth + 1)
    else:
        ok = False
    if not ok:
        raise BundleContentError(f"{where}: unknown or malformed operand {str(operand)[:80]}")


def check_records(records: Any, where: str = "PyTorch segment", depth: int = 0) -> None:
    """Refuse (:class:`BundleContentError`) node records that a file may not hold: an op outside the
    allowlist, an unknown operand kind, a dtype, layout or memory format that is not one, a literal
    size of more than MAX_TENSOR_ELEMENTS elements. Nothing is evaluated."""
    if not isinstance(records, list):
        raise BundleContentError(f"{where}: the program is not a list of node records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not set(r) <= _RECORD_FIELDS or not isinstance(r.get("name"), str):
            raise BundleContentError(f"{where}: record {i} is not a node record")
        here = f"{where} node {r['name'][:80]!r}"
        op, args, kwargs = r.get("op"), r.get("args", []), r.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise BundleContentError(f"{here}: args must be a list and kwargs an object")
        if op not in ("getitem", "cond") and op not in PY_OPS:
            schema = allowed_ops.resolve(op, here)._schema
            # Literal sizes are bounded before anything runs (the meta check at run time sees the rest).
            for arg, value in zip(schema.arguments, args):
                if arg.name in ("size", "sizes"):
                    _check_size(value, here)
            for name in ("size", "sizes"):
                _check_size(kwargs.get(name), here)
        _check_operand(args, here, depth)
        _check_operand(list(kwargs.values()), here, depth)


class TorchProgram:
    """Runs node records against an environment of values. ``params``/``constants``: name -> tensor."""

    def __init__(self, records: list[dict], *, max_elements: int = MAX_TENSOR_ELEMENTS):
        check_records(records)
        self.records = {r["name"]: r for r in records}
        self.max_elements = max_elements
        self._sized: set = set()     # (node, argument signature) already sized on meta
        # Where the program runs: the graph was exported on the CPU, so a device it names (factory
        # ops such as arange/full, stand-ins) means "where the inputs are".
        self.device: torch.device | None = None

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
            return LAYOUTS[operand["layout"]]
        if "memory_format" in operand:
            return MEMORY_FORMATS[operand["memory_format"]]
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
            return _py_op(op, args, kwargs, record["name"])
        where = f"PyTorch segment node {record['name']!r}"
        fn = allowed_ops.resolve(op, where)
        signature = (record["name"], _signature(args), _signature(kwargs))
        if signature not in self._sized:    # sized on meta first, once per shape of its arguments
            allowed_ops.check_call(fn, args, kwargs, self.max_elements, where)
            if len(self._sized) > 4096:
                self._sized.clear()
            self._sized.add(signature)
        return fn(*args, **kwargs)

    def run_graph(self, graph: dict, inputs: list, params, constants) -> Any:
        sub = TorchProgram(graph["nodes"], max_elements=self.max_elements)
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
