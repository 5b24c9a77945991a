"""Build a partitioned engine: plan the segments, convert each TensorRT segment through the one
converter loop, build it on the backend, and collect the PyTorch segments' ops and parameters.

A segment whose conversion fails (a converter that declines at conversion time, or any other
error) has the offending nodes, or failing that the whole segment, moved to PyTorch and the plan
is made again, so a model compiles whatever the converter coverage; every move is recorded with
its reason in the plan's ``fallback`` table.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx
from torch.export.graph_signature import InputKind

from refitcore.backends import get_backend
from refitcore.conversion.convert import convert, dynamic_node_names
from refitcore.errors import BackendUnavailableError, UnsupportedOperatorError
from refitcore.conversion.network_reader import network_weights
from refitcore.partition.partitioner import DEFAULT_MIN_BLOCK_SIZE, PartitionPlan, Segment, partition, subprogram
from refitcore.engine.segmented import SegmentedImpl, split_name
from refitcore.partition.torch_program import SHAPE_ONLY_OPS, encode_nodes, encode_value
from refitcore.conversion.weight_map import WeightMap, WeightSource, prefix_consts

__all__ = ["compile_segments", "segmented_fallback_mapping", "prefixed_map", "SegmentedBuild"]

log = logging.getLogger("refitcore")


@dataclasses.dataclass
class SegmentedBuild:
    impl: SegmentedImpl
    weight_map: WeightMap
    plan: PartitionPlan


def prefixed_map(wm: WeightMap, prefix: str) -> WeightMap:
    """A copy of a segment's weight map with every engine weight and literal named ``prefix + name``."""
    sources = {prefix + n: dataclasses.replace(s, inputs={k: prefix_consts(v, prefix) for k, v in s.inputs.items()})
               for n, s in wm.sources.items()}
    return WeightMap(sources=sources, constants={prefix + k: v for k, v in wm.constants.items()})


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _collect(operand: Any, kind: str, into: dict, *, alone: bool = False) -> None:
    """Every ``operand[kind]`` of the ``{kind: ...}`` references in a program record, in order
    (``alone``: only references that hold nothing else)."""
    if isinstance(operand, dict):
        if kind in operand and (not alone or len(operand) == 1):
            into[operand[kind]] = None
        for v in operand.values():
            _collect(v, kind, into, alone=alone)
    elif isinstance(operand, list):
        for v in operand:
            _collect(v, kind, into, alone=alone)


def _closure(gm: fx.GraphModule, names: Iterable[str], dynamic: set[str], skip: set[str]) -> list[str]:
    """``names`` and the weight-only nodes they read, in graph order (never nodes in ``skip``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = set(names)
    want: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in want or name in skip:
            continue
        node = nodes[name]
        if node.op != "call_function":
            continue
        want.add(name)
        if node.target in SHAPE_ONLY_OPS:
            continue
        for a in node.all_input_nodes:
            if a.op == "call_function" and (a.name not in dynamic or a.name in names):
                stack.append(a.name)
    return [n.name for n in gm.graph.nodes if n.name in want]


def _state_array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu").numpy()).copy()


def compile_segments(ep, *, backend_name: str, precision: str = "fp32", torch_executed_ops: Iterable[Any] = (),
                     min_block_size: int = DEFAULT_MIN_BLOCK_SIZE) -> SegmentedBuild:
    """Partition ``ep`` and build every segment (see the module docstring)."""
    backend = get_backend(backend_name)
    forced: dict[str, str] = {}
    while True:
        plan = partition(ep, torch_executed_ops=torch_executed_ops, min_block_size=min_block_size, forced=forced)
        built, failed = {}, False
        for i, seg in enumerate(plan.segments):
            if seg.kind != "tensorrt":
                continue
            try:
                result = convert(subprogram(ep, seg))
                built[i] = (result, backend.build(result, precision=precision))
            except BackendUnavailableError:
                raise   # the backend cannot build or run here at all: not a segment's problem
            except UnsupportedOperatorError as err:
                names = [node for _t, _p, node in err.ops if node in seg.nodes]
                for target, _path, node in err.ops:
                    if node in seg.nodes:
                        forced[node] = f"converter declined: {target}"
                if not names:
                    forced.update({n: f"segment conversion failed: {_first_line(err)}" for n in seg.nodes})
                failed = True
            except Exception as err:  # noqa: BLE001 - any conversion/build failure runs in PyTorch
                node = getattr(err, "refitcore_node", None)   # set by convert() for a failing converter
                if node in seg.nodes:
                    log.warning("refitcore: the converter of node %s failed (%s); it runs in PyTorch", node,
                                _first_line(err))
                    forced[node] = f"converter failed: {_first_line(err)}"
                else:
                    log.warning("refitcore: converting segment %d failed (%s); it runs in PyTorch", i,
                                _first_line(err))
                    forced.update({n: f"segment conversion failed: {_first_line(err)}" for n in seg.nodes})
                failed = True
            if failed:
                break
        if not failed:
            break
    return _assemble(ep, plan, built, backend_name)


def _assemble(ep, plan: PartitionPlan, built: dict, backend_name: str) -> SegmentedBuild:
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    dynamic = dynamic_node_names(ep)
    state = dict(ep.state_dict)
    ep_constants = dict(getattr(ep, "constants", {}) or {})
    trt_nodes = {n for s in plan.segments if s.kind == "tensorrt" for n in s.nodes}
    wm = WeightMap()
    trt, params = {}, {}
    records: dict[str, dict] = {}
    constants: dict[str, np.ndarray] = {}
    nodes = {n.name: n for n in gm.graph.nodes}

    def add_records(names: list[str]) -> dict:
        keys: dict[str, None] = {}
        for rec in encode_nodes(gm, names, specs=specs):
            records.setdefault(rec["name"], rec)
            _collect(rec, "param", keys)
        return keys

    for i, seg in enumerate(plan.segments):
        if seg.kind == "tensorrt":
            result, impl = built[i]
            part = prefixed_map(result.weight_map, f"seg{i}:")
            wm.sources.update(part.sources)
            wm.constants.update(part.constants)
            trt[i] = impl
        else:
            keys = add_records(_closure(gm, seg.nodes, dynamic, trt_nodes))
            params[i] = {k: _state_array(state[k]) for k in keys}
            for k, arr in params[i].items():
                wm.sources[f"seg{i}:{k}"] = WeightSource("copy", {"x": {"key": k}}, {}, tuple(arr.shape),
                                                         str(arr.dtype))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_static = [a.name for a in out_node.all_input_nodes if a.op == "call_function" and a.name not in dynamic]
    out_keys = add_records(_closure(gm, out_static, dynamic, trt_nodes))

    def ref(a: fx.Node):
        if a.op == "placeholder":
            s = specs[a.name]
            if s.kind == InputKind.USER_INPUT:
                return {"node": a.name}
            if s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.persistent is not False:
                out_keys[s.target] = None
                return {"param": s.target}
            return {"const": s.target}
        return {"node": a.name}

    outputs = encode_value(list(out_node.args[0]), ref)
    if out_keys:   # weights the graph returns (or computes its outputs from) without any dynamic op
        extra = len(plan.segments)
        params[extra] = {k: _state_array(state[k]) for k in out_keys}
        for k, arr in params[extra].items():
            wm.sources[f"seg{extra}:{k}"] = WeightSource("copy", {"x": {"key": k}}, {}, tuple(arr.shape),
                                                         str(arr.dtype))
    for rec in records.values():
        consts: dict[str, None] = {}
        _collect(rec, "const", consts, alone=True)
        for c in consts:
            t = ep_constants[c] if c in ep_constants else state[c]
            constants[c] = _state_array(t)
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs
                   if s.kind == InputKind.USER_INPUT and isinstance(nodes[s.arg.name].meta.get("val"), torch.Tensor)]
    segments = list(plan.segments)
    if out_keys:
        segments.append(Segment("torch", [], [], []))
    impl = SegmentedImpl(segments, trt, params, list(records.values()), constants, user_inputs, outputs,
                         backend_name, note=getattr(next(iter(trt.values()), None), "note", ""))
    return SegmentedBuild(impl, wm, plan)



def segmented_fallback_mapping(engine, ep, params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The fallback path of a partitioned engine: convert every TensorRT segment again with the new
    weights and read its weights off the network; PyTorch segments take the state_dict's values."""
    out: dict[str, np.ndarray] = {}
    for i, seg in enumerate(engine.segments):
        prefix = f"seg{i}:"
        if seg.kind == "tensorrt":
            result = convert(subprogram(ep, seg), params)
            shapes = {n: s.shape for n, s in engine.weight_map.sources.items() if n.startswith(prefix)}
            out.update(network_weights(result.network, shapes, prefix=prefix))
    # A PyTorch segment's weights are named by the state_dict keys its ops read (not by the map: the
    # fallback stays a witness independent of the map's recipes).
    current = engine.current_weights()
    for name in engine.weight_names:
        index, key = split_name(name)
        if engine.segments[index].kind != "tensorrt":
            out[name] = _state_array(params[key].to(getattr(torch, str(current[name].dtype))))
    return out
