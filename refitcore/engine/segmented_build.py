"""The segmented engine kind: plan the segments, convert each TensorRT segment through the one
converter loop, build it on the backend, and collect the PyTorch segments' ops and parameters
(the engine itself, run and refitted as one, is :mod:`refitcore.engine.segmented`).

A segment whose conversion fails (a converter that declines at conversion time, or any other
error) has the offending nodes, or failing that the whole segment, moved to PyTorch and the plan
is made again, so a model compiles whatever the converter coverage; every move is recorded with
its reason in the plan's ``fallback`` table.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export.graph_signature import InputKind

from refitcore import dtypes
from refitcore.backends import get_backend
from refitcore.backends.base import EngineImpl
from refitcore.capture.lowering import graph_fingerprint
from refitcore.capture.shapes import ShapeProfiles
from refitcore.capture.structured import leaf_names
from refitcore.conversion.convert import convert, dynamic_node_names
from refitcore.conversion.network_reader import network_weights
from refitcore.conversion.shape_tensors import symbolic_dims
from refitcore.conversion.weight_map import WeightMap, WeightSource, prefix_consts
from refitcore.engine.coverage import Coverage, all_in_tensorrt, spec_numel
from refitcore.engine.kinds import BuildInput, Built, check_map_covers, state_array, structure_of
from refitcore.engine.options import CompileOptions
from refitcore.engine.program_record import RecordedProgram
from refitcore.engine.records import IOSpec
from refitcore.engine.reexport import conversion_params, exported_for
from refitcore.engine.segmented import KIND as NAME, SegmentedImpl, split_name
from refitcore.errors import BackendUnavailableError, UnsupportedOperatorError
from refitcore.partition.partitioner import PartitionPlan, Segment, SubProgram, partition, segment_profiles, subprogram
from refitcore.partition.torch_program import SHAPE_ONLY_OPS, collect_refs, encode_nodes, encode_value

__all__ = ["Segmented", "KIND", "NAME", "prefixed_map"]

log = logging.getLogger("refitcore")


def prefixed_map(wm: WeightMap, prefix: str) -> WeightMap:
    """A copy of a segment's weight map with every engine weight and literal named ``prefix + name``."""
    sources = {prefix + n: dataclasses.replace(s, inputs={k: prefix_consts(v, prefix) for k, v in s.inputs.items()})
               for n, s in wm.sources.items()}
    return WeightMap(sources=sources, constants={prefix + k: v for k, v in wm.constants.items()})


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


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


def _segment_program(ep, seg: Segment, profiles: ShapeProfiles | None) -> tuple[SubProgram, ShapeProfiles | None]:
    """A TensorRT segment's program and, for an engine with dynamic shapes, its inputs' ranges under
    the network's own input names (fx may rename a placeholder)."""
    sub = subprogram(ep, seg)
    ranges = segment_profiles(ep, seg, profiles)
    if ranges is not None:
        names = [s.arg.name for s in sub.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        ranges = dataclasses.replace(ranges, input_names=tuple(names))
    return sub, ranges


def _build_segments(ep, options: CompileOptions,
                    profiles: ShapeProfiles | None) -> tuple[SegmentedImpl, WeightMap, PartitionPlan]:
    """Partition ``ep`` and build every segment (see the module docstring); with ``profiles`` each
    TensorRT segment gets the ranges its inputs take (:func:`segment_profiles`)."""
    backend = get_backend(options.backend)
    forced: dict[str, str] = {}
    while True:
        plan = partition(ep, torch_executed_ops=options.torch_executed_ops, min_block_size=options.min_block_size,
                         forced=forced)
        built, failed = {}, False
        for i, seg in enumerate(plan.segments):
            if seg.kind != "tensorrt":
                continue
            try:
                sub, ranges = _segment_program(ep, seg, profiles)
                result = convert(sub, profiles=ranges, precision=options.precision)
                built[i] = (result, backend.build(result, precision=options.precision,
                                                    copy_weights=not options.strip_engine_weights))
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
                failing = getattr(err, "refitcore_node", None)   # set by convert() for a failing converter
                if failing in seg.nodes:
                    log.warning("refitcore: the converter of node %s failed (%s); it runs in PyTorch", failing,
                                _first_line(err))
                    forced[failing] = f"converter failed: {_first_line(err)}"
                else:
                    log.warning("refitcore: converting segment %d failed (%s); it runs in PyTorch", i,
                                _first_line(err))
                    forced.update({n: f"segment conversion failed: {_first_line(err)}" for n in seg.nodes})
                failed = True
            if failed:
                break
        if not failed:
            break
    return _assemble(ep, plan, built, options.backend)


def _assemble(ep, plan: PartitionPlan, built: dict,
              backend_name: str) -> tuple[SegmentedImpl, WeightMap, PartitionPlan]:
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
            collect_refs(rec, "param", keys)
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
            params[i] = {k: state_array(state[k]) for k in keys}
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
        params[extra] = {k: state_array(state[k]) for k in out_keys}
        for k, arr in params[extra].items():
            wm.sources[f"seg{extra}:{k}"] = WeightSource("copy", {"x": {"key": k}}, {}, tuple(arr.shape),
                                                         str(arr.dtype))
    for rec in records.values():
        consts: dict[str, None] = {}
        collect_refs(rec, "const", consts, alone=True)
        for c in consts:
            t = ep_constants[c] if c in ep_constants else state[c]
            constants[c] = state_array(t)
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs
                   if s.kind == InputKind.USER_INPUT and isinstance(nodes[s.arg.name].meta.get("val"), torch.Tensor)]
    segments = list(plan.segments)
    if out_keys:
        segments.append(Segment("torch", [], [], []))
    impl = SegmentedImpl(segments, trt, params, list(records.values()), constants, user_inputs, outputs,
                         backend_name, note=getattr(next(iter(trt.values()), None), "note", ""))
    return impl, wm, plan


class Segmented:
    """TensorRT segments and PyTorch segments in graph order (:class:`refitcore.engine.kinds.EngineKind`)."""

    name = NAME

    def build(self, source: BuildInput, options: CompileOptions) -> Built:
        """Partition ``source.exported`` and build every TensorRT segment on the backend."""
        ep = source.exported
        impl, wm, plan = _build_segments(ep, options, source.profiles)
        check_map_covers(wm, impl.weight_names())
        out_spec = ep.call_spec.out_spec
        structure = structure_of(source.args, source.kwargs, out_spec)
        tensors = [v for v in pytree.tree_leaves((source.args, source.kwargs)) if isinstance(v, torch.Tensor)]
        out_vals = [a.meta.get("val") if hasattr(a, "meta") else a
                    for a in pytree.tree_leaves(list(ep.graph_module.graph.find_nodes(op="output"))[0].args[0])]
        io = IOSpec(tuple(impl.user_inputs), tuple(tuple(t.shape) for t in tensors),
                    tuple(str(t.dtype).replace("torch.", "") for t in tensors),
                    tuple(leaf_names(structure["out"])),
                    tuple(tuple(symbolic_dims(v)) if isinstance(v, torch.Tensor) else () for v in out_vals),
                    source.profiles)
        digest, entries = graph_fingerprint(ep)
        return Built(impl, wm, io, structure, out_spec, digest, entries, partition=plan)

    def fallback_mapping(self, engine: Any, state: Mapping[str, torch.Tensor], checked: Mapping[str, torch.Tensor],
                         source: Any, *, model: Any = None, trust_factory: bool = False,
                         owned: bool = False) -> dict[str, np.ndarray]:
        """Convert every TensorRT segment again with the new weights and read its weights off the
        network; PyTorch segments take the state_dict's values."""
        ep = exported_for(engine, source, state, model=model, trust_factory=trust_factory, owned=owned,
                          recorded=True)
        params = conversion_params(engine.weight_map, state, checked)
        segments = engine.impl.segments
        out: dict[str, np.ndarray] = {}
        for i, seg in enumerate(segments):
            prefix = f"seg{i}:"
            if seg.kind == "tensorrt":
                result = convert(subprogram(ep, seg), params, precision=engine.options.precision,
                                 bounded=isinstance(ep, RecordedProgram))
                shapes = {n: s.shape for n, s in engine.weight_map.sources.items() if n.startswith(prefix)}
                out.update(network_weights(result.network, shapes, prefix=prefix, host=result.weights,
                                           copy=not owned))
        # A PyTorch segment's weights are named by the state_dict keys its ops read (not by the map: the
        # fallback stays a witness independent of the map's recipes).
        current = engine.impl.current_weights()   # their dtypes (a weightless engine's placeholders have them)
        for name in engine.weight_names:
            index, key = split_name(name)
            if segments[index].kind != "tensorrt":
                out[name] = state_array(params[key].to(dtypes.as_torch(current[name]).dtype))
        return out

    def serialize(self, impl: EngineImpl, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        return impl.serialize(weights=weights)

    def deserialize(self, header: dict, arrays: Mapping[str, np.ndarray], *, backend: str) -> EngineImpl:
        return SegmentedImpl.deserialize(header, arrays)

    def run(self, impl: EngineImpl, inputs: list[Any]) -> list[Any]:
        return impl.run(inputs)

    def coverage(self, engine: Any) -> Coverage:
        """Ops and weights per segment, and each op that runs in PyTorch with its reason."""
        wm, plan = engine.weight_map, engine.partition
        if plan is None:   # a file that does not record its plan
            return all_in_tensorrt(engine)
        kinds = [s.kind for s in engine.impl.segments]
        trt_keys: set[str] = set()
        for name, src in wm.sources.items():
            seg = int(name[3:name.index(":")]) if name.startswith("seg") and ":" in name else 0
            if seg < len(kinds) and kinds[seg] == "tensorrt":
                trt_keys.update(src.keys)
        n_ops = len(plan.counted)
        n_trt = sum(1 for s in plan.segments if s.kind == "tensorrt" for n in s.nodes if n in plan.counted)
        segs = [(s.kind, sum(1 for n in s.nodes if n in plan.counted)) for s in plan.segments]
        fallback = [(node, op, path, reason) for node, (op, path, reason) in plan.fallback.items()]
        return Coverage(engine.backend, n_ops, n_trt, sum(spec_numel(wm.key_specs.get(k)) for k in set(wm.keys_used)),
                        sum(spec_numel(wm.key_specs.get(k)) for k in trt_keys), segs, fallback)


KIND = Segmented()
