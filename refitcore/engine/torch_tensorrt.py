"""The Torch-TensorRT engine kind: the network Torch-TensorRT users deploy, built and refitted by
Torch-TensorRT's own code, run on a CPU.

Build (:meth:`TorchTensorRTKind.build`): Torch-TensorRT's lowering and partition of the exported
program (``_run_on_acc_N`` submodules for TensorRT, ``_run_on_gpu_N`` for PyTorch), then its
``TRTInterpreter`` converts every ``_run_on_acc_N`` submodule to a TensorRT network, which is read
with :func:`refitcore.conversion.network_reader.read_network` and run by the reference backend; the
``_run_on_gpu_N`` submodules run eagerly on the CPU; Torch-TensorRT's partitioned graph stitches
them (:class:`TorchTensorRTImpl`). Every private entry point is in
:mod:`refitcore.engine.torch_tensorrt_api`.

Weights are named ``<segment>:<name>``: a TensorRT weight as Torch-TensorRT names it
(``_run_on_acc_0:[CONVOLUTION]-[aten_ops.convolution.default]-[conv1/convolution] KERNEL``), a
PyTorch segment's parameter by its attribute (``_run_on_gpu_1:fc.weight``). The weight map records
where each comes from (:class:`WeightOrigin`: segment, FX node, module path and the state_dict keys
the node reads): its recipe is ``converted`` (Torch-TensorRT's converters compute the value; no
recipe of ours replays them) or ``copy`` (a PyTorch segment's parameter).

Refit paths (:meth:`TorchTensorRTKind.refit_mapping`, the :class:`refitcore.engine.kinds.CompilerRefit`
protocol): ``fallback`` is what ``torch_tensorrt.dynamo.refit_module_weights`` does: lower and
partition the new weights' program, then per engine ``_refit_single_trt_engine_with_gm`` (which
calls ``construct_refit_mapping``), unchanged, against a stand-in for ``trt.Refitter`` that records
every weight it sets (:class:`RecordingRefitter`); PyTorch segments take the new submodule's
``state_dict()``. Our refit driver then applies what it set (validated, all or nothing); a weight it
did not set keeps its old value, as TensorRT would. ``cached`` is its weight-name-map path, which
Torch-TensorRT removed in 2.13. The witness (:meth:`TorchTensorRTKind.fallback_mapping`) is a
fresh Torch-TensorRT conversion of the new weights whose weights are read back off the network's
layers (never through ``weight_refit_map``), and the state_dict for PyTorch segments.

``backend='tensorrt'`` on a CUDA device (:class:`TorchTensorRTGpuImpl`): the engine is Torch-TensorRT's
own, compiled through its public API (``torch_tensorrt.dynamo.compile``, :mod:`refitcore.engine.torch_tensorrt_api`);
the CPU harness's build gives the weight map and every weight's origin, and must list the same
weights as TensorRT's Refitter reads off the engines. Path ``fallback`` (and ``auto``) calls
``torch_tensorrt.dynamo.refit_module_weights`` on a copy of the compiled module and reads what it set
back off its engines with TensorRT's Refitter; our refit driver writes that into the engine through
TensorRT's Refitter (PyTorch segments: their state_dict), and the audit compares every weight read
back off the engines exactly with the same witness as on the reference backend.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore.backends.base import EngineImpl, WeightsPrototype, read_only_views, staged
from refitcore.backends.reference import ReferenceEngine
from refitcore.capture.lowering import graph_fingerprint
from refitcore.capture.shapes import ShapeProfiles
from refitcore.conversion.network_reader import network_weights, read_network
from refitcore.conversion.weight_map import WeightMap, WeightSource
from refitcore.engine.coverage import Coverage, spec_numel
from refitcore.engine.kinds import BuildInput, Built, check_map_covers, state_array, structure_of
from refitcore.engine.options import CompileOptions
from refitcore.engine.records import IOSpec
from refitcore.engine.reexport import conversion_params, exported_for
from refitcore.engine.segmented import SegmentedRefitter, torch_dtype_name
from refitcore.engine.torch_tensorrt_api import WEIGHT_MAP_CACHE_REMOVED, TorchTensorRT, load
from refitcore.errors import (
    ArchitectureMismatchError,
    BackendUnavailableError,
    BundleError,
    MapCannotServeError,
    WeightMappingError,
)

__all__ = ["TorchTensorRTKind", "TorchTensorRTImpl", "TorchTensorRTGpuImpl", "GpuRefitter", "read_weights",
           "WeightOrigin", "RecordingRefitter", "KIND", "NAME", "COMPILER",
           "ACC", "DEVICE", "cuda_available", "split_weight_name", "example_inputs", "settings_for"]

log = logging.getLogger("refitcore")

NAME = "torch_tensorrt"
COMPILER = "Torch-TensorRT"
ACC = "_run_on_acc"   # Torch-TensorRT's TensorRT submodules are _run_on_acc_N, its PyTorch ones _run_on_gpu_N
DEVICE = "cuda"       # the device Torch-TensorRT's own engines (backend='tensorrt') take their inputs on


def cuda_available() -> bool:
    """Whether Torch-TensorRT's own engines can be built here (a CUDA device)."""
    return torch.cuda.is_available()


def split_weight_name(name: str) -> tuple[str, str]:
    """'_run_on_acc_0:[CONVOLUTION]-[...]-[conv1/convolution] KERNEL' -> ('_run_on_acc_0', '[CONVOLUTION]-...')."""
    segment, sep, rest = name.partition(":")
    if not sep or not segment.startswith("_run_on_"):
        raise KeyError(f"{name!r} is not a Torch-TensorRT engine weight name '<segment>:<name>'")
    return segment, rest


@dataclasses.dataclass(frozen=True)
class WeightOrigin:
    """Where one engine weight comes from: its ``segment``, its ``name`` there (Torch-TensorRT's),
    the FX ``node`` whose converter recorded it, that node's ``module`` path, and the state_dict
    ``keys`` the node reads."""

    segment: str
    name: str
    node: str
    module: str
    keys: tuple[str, ...]

    def params(self) -> dict[str, Any]:
        return {"compiler": COMPILER, "name": self.name, "segment": self.segment, "node": self.node,
                "module": self.module or "<top level>"}


class RecordingRefitter:
    """The stand-in for ``trt.Refitter(engine, logger)`` that Torch-TensorRT's per-engine refit runs
    against: it lists the engine's weights and records what ``set_named_weights`` is given (a copy of
    the ``trt.Weights``' values); ``refit_cuda_engine`` applies nothing (our refit driver does)."""

    def __init__(self, engine: ReferenceEngine):
        self.engine = engine
        self.staged: dict[str, np.ndarray] = {}

    def get_all_weights(self) -> list[str]:
        return self.engine.weight_names()

    def set_named_weights(self, name: str, weights: Any, location: Any = None) -> bool:
        self.staged[name] = np.array(weights.numpy(), copy=True)
        return True

    def refit_cuda_engine(self) -> bool:
        return True


class _AccRunner(torch.nn.Module):
    """A ``_run_on_acc_N`` submodule replaced by its reference engine (one output, or a tuple)."""

    def __init__(self, engine: ReferenceEngine, as_tuple: bool):
        super().__init__()
        self.engine = engine
        self.as_tuple = as_tuple

    def forward(self, *inputs: torch.Tensor) -> Any:
        outs = self.engine.run([x.contiguous() for x in inputs])
        return tuple(outs) if self.as_tuple else outs[0]


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, _, leaf = target.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if isinstance(getattr(mod, leaf), torch.nn.Parameter):
        setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        setattr(mod, leaf, value)


class TorchTensorRTImpl:
    """Torch-TensorRT's partitioned graph with every ``_run_on_acc_N`` run by a reference engine
    (``trt``: {segment: engine}) and every ``_run_on_gpu_N`` run eagerly (``params``: {segment:
    {attribute: array}}, its state_dict). ``origins``: {engine weight: :class:`WeightOrigin`};
    ``ops``: {segment: its FX op count}."""

    backend_name = "reference"

    def __init__(self, module: torch.fx.GraphModule, trt: Mapping[str, ReferenceEngine],
                 params: Mapping[str, Mapping[str, np.ndarray]], version: str, *,
                 origins: Mapping[str, WeightOrigin], ops: Mapping[str, int]):
        self.module = module
        self.origins = dict(origins)
        self.ops = dict(ops)
        self.trt = dict(trt)
        self.params = {k: dict(v) for k, v in params.items()}
        self.version = version
        self.note = (f"Torch-TensorRT {version}'s network, run by the reference backend: {len(self.trt)} TensorRT "
                     f"engine(s), {len(self.params)} PyTorch segment(s)")
        self._load_params(self.params)

    def _load_params(self, params: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for segment, arrays in params.items():
            sub = self.module.get_submodule(segment)
            for target, arr in arrays.items():
                _set_attr(sub, target, torch.from_numpy(np.array(arr, copy=True)))

    def weight_names(self) -> list[str]:
        names = []
        for segment, _ in self.module.named_children():
            if segment in self.trt:
                names += [f"{segment}:{n}" for n in self.trt[segment].weight_names()]
            elif segment in self.params:
                names += [f"{segment}:{k}" for k in self.params[segment]]
        return names

    def current_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for segment, engine in self.trt.items():
            out.update({f"{segment}:{n}": v for n, v in engine.current_weights().items()})
        for segment, arrays in self.params.items():
            out.update({f"{segment}:{k}": v for k, v in read_only_views(arrays).items()})
        return out

    def prototype(self, name: str) -> WeightsPrototype:
        return self.create_refitter().get_weights_prototype(name)

    def rollback_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for segment, engine in self.trt.items():
            out.update({f"{segment}:{n}": v for n, v in engine.rollback_weights().items()})
        for segment, arrays in self.params.items():
            out.update({f"{segment}:{k}": v for k, v in arrays.items()})
        return out

    @staticmethod
    def split_name(name: str) -> tuple[str, str]:
        return split_weight_name(name)

    @staticmethod
    def part_name(part: str, name: str) -> str:
        return f"{part}:{name}"

    def run(self, inputs: Sequence[torch.Tensor]) -> list[Any]:
        with torch.no_grad():
            out = self.module(*inputs)
        return list(pytree.tree_leaves(out))

    def create_refitter(self, *, adopt: bool = False) -> SegmentedRefitter:
        return SegmentedRefitter(self, adopt=adopt)

    def commit_params(self, pending: Mapping[str, np.ndarray]) -> None:
        new = {k: dict(v) for k, v in self.params.items()}
        for name, arr in pending.items():
            segment, key = self.split_name(name)
            new[segment][key] = arr
        self._load_params(new)
        self.params = new

    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        raise BundleError("an engine of Torch-TensorRT's network run by the reference backend cannot be saved: its "
                          "PyTorch segments are Torch-TensorRT's GraphModules, which are code, not data; compile "
                          "it again (with backend='tensorrt', torch_tensorrt.save saves Torch-TensorRT's own module)")

    @classmethod
    def deserialize(cls, header: dict, arrays: dict[str, np.ndarray]) -> EngineImpl:
        raise BundleError("engine file content is invalid: Torch-TensorRT engines are never saved as refitcore files")


def read_weights(api: TorchTensorRT, module: torch.nn.Module, shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """Every weight of a compiled Torch-TensorRT module, ``{<segment>:<name>: array}``: each
    ``_run_on_acc_N`` engine's as TensorRT's Refitter reads it back (shaped as the weight map says),
    each PyTorch segment's from its state_dict."""
    out: dict[str, np.ndarray] = {}
    for segment, sub in module.named_children():
        if segment.startswith(ACC):
            for name, flat in api.read_engine(api.cuda_engine(segment, sub)).items():
                full = f"{segment}:{name}"
                shape = shapes.get(full)
                out[full] = flat.reshape(shape) if shape is not None and flat.size == math.prod(shape) else flat
        else:
            out.update({f"{segment}:{k}": state_array(v) for k, v in sub.state_dict().items()})
    return out


class TorchTensorRTGpuImpl:
    """Torch-TensorRT's own compiled module on a CUDA device (``backend='tensorrt'``; see the module
    docstring): ``module`` as ``torch_tensorrt.dynamo.compile`` returned it, ``inputs`` the example
    inputs it was compiled for, ``shapes`` {engine weight: shape} from the weight map; ``origins`` and
    ``ops`` as :class:`TorchTensorRTImpl`'s. ``trt``: {segment: TensorRT submodule}."""

    backend_name = "tensorrt"

    def __init__(self, module: torch.fx.GraphModule, api: TorchTensorRT, inputs: Sequence[torch.Tensor], *,
                 shapes: Mapping[str, tuple], origins: Mapping[str, WeightOrigin], ops: Mapping[str, int]):
        self.module = module
        self.api = api
        self.inputs = tuple(inputs)
        self.shapes = dict(shapes)
        self.origins = dict(origins)
        self.ops = dict(ops)
        self.version = api.version
        self.trt = {s: sub for s, sub in module.named_children() if s.startswith(ACC)}
        self.note = (f"Torch-TensorRT {api.version}'s own engines on {DEVICE}: {len(self.trt)} TensorRT engine(s), "
                     f"{len(self.ops) - len(self.trt)} PyTorch segment(s)")

    def weight_names(self) -> list[str]:
        return list(self.current_weights())

    def current_weights(self) -> dict[str, np.ndarray]:
        out = read_weights(self.api, self.module, self.shapes)
        for v in out.values():
            v.flags.writeable = False
        return out

    def prototype(self, name: str) -> WeightsPrototype:
        return self.create_refitter().get_weights_prototype(name)

    def rollback_weights(self) -> dict[str, np.ndarray]:
        return read_weights(self.api, self.module, self.shapes)

    @staticmethod
    def split_name(name: str) -> tuple[str, str]:
        return split_weight_name(name)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[Any]:
        with torch.no_grad():
            out = self.module(*[x.to(DEVICE) for x in inputs])
        return [o.to("cpu") if isinstance(o, torch.Tensor) else o for o in pytree.tree_leaves(out)]

    def create_refitter(self, *, adopt: bool = False) -> GpuRefitter:
        return GpuRefitter(self, adopt=adopt)

    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        raise BundleError("Torch-TensorRT's own engines are not saved as refitcore files; save the compiled "
                          "module with torch_tensorrt.save (engine.impl.module)")

    @classmethod
    def deserialize(cls, header: dict, arrays: dict[str, np.ndarray]) -> EngineImpl:
        raise BundleError("engine file content is invalid: Torch-TensorRT engines are never saved as refitcore files")


class GpuRefitter:
    """The refit driver's Refitter over a :class:`TorchTensorRTGpuImpl`: it validates and stages every
    weight, then :meth:`refit` writes each engine's through TensorRT's Refitter and each PyTorch
    segment's into its parameters."""

    def __init__(self, impl: TorchTensorRTGpuImpl, *, adopt: bool = False):
        self.impl = impl
        self.adopt = adopt
        self.current = impl.current_weights()
        self.errors: list[str] = []
        self._pending: dict[str, np.ndarray] = {}

    def get_all_weights(self) -> list[str]:
        return list(self.current)

    def get_weights_prototype(self, name: str) -> WeightsPrototype:
        arr = self.current[name]
        return WeightsPrototype(name, torch_dtype_name(arr), int(arr.size), tuple(arr.shape))

    def set_named_weights(self, name: str, value: Any) -> bool:
        if name not in self.current:
            self.errors.append(f"{name!r}: no such refittable weight")
            return False
        arr, now = np.asarray(value), self.current[name]
        if arr.dtype != now.dtype or arr.size != now.size:
            self.errors.append(f"{name!r}: {arr.dtype}[{arr.size}] where the engine has {now.dtype}[{now.size}]")
            return False
        self._pending[name] = np.ascontiguousarray(staged(arr, self.adopt).reshape(now.shape))
        return True

    def get_missing_weights(self) -> list[str]:
        return []

    def refit(self) -> bool:
        by_segment: dict[str, dict[str, np.ndarray]] = {}
        for name, arr in self._pending.items():
            segment, key = split_weight_name(name)
            by_segment.setdefault(segment, {})[key] = arr
        for segment, arrays in by_segment.items():
            if segment in self.impl.trt:
                api = self.impl.api
                problems = api.write_engine(api.cuda_engine(segment, self.impl.trt[segment]), arrays)
                self.errors += [f"{segment}: {p}" for p in problems]
                if problems:
                    return False   # the driver rolls every segment back
            else:
                sub = self.impl.module.get_submodule(segment)
                for key, arr in arrays.items():
                    old = sub.get_parameter(key) if key in dict(sub.named_parameters()) else sub.get_buffer(key)
                    with torch.no_grad():
                        old.copy_(torch.from_numpy(np.array(arr, copy=True)).to(old.dtype))
        self._pending = {}
        return True


def _with_state(ep: torch.export.ExportedProgram, params: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """A copy of ``ep`` (Torch-TensorRT's lowering edits programs in place) holding ``params`` for
    the state_dict entries they name."""
    out = copy.deepcopy(ep)
    state = out.state_dict   # the program's own dict: entries replaced in place
    for k, v in list(state.items()):
        if k in params:
            new = params[k].detach().to(v.dtype)
            state[k] = torch.nn.Parameter(new, requires_grad=False) if isinstance(v, torch.nn.Parameter) else new
    return out


def _executed_ops(names: Iterable[str]) -> set[Any]:
    """``torch_executed_ops`` names (:func:`refitcore.partition.partitioner.executed_op_names`) as
    the op overloads Torch-TensorRT compares node targets with."""
    out: set[Any] = set()
    for name in names:
        obj: Any = torch.ops
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch._ops.OpOverloadPacket):
            out.update(getattr(obj, o) for o in obj.overloads())
        else:
            out.add(obj)
    return out


def example_inputs(args: tuple, dynamic_shapes: Any) -> tuple[tuple, Any]:
    """``args`` with every ``torch_tensorrt.Input`` replaced by a tensor of its ``opt_shape`` (and its
    dtype), and the dynamic shapes they give added as ``{input index: (dim or (min, opt, max), ...)}``
    (:func:`refitcore.capture.shapes.resolve_dynamic_shapes`' per-input form); ``dynamic_shapes``
    is returned as it is when no input is an ``Input``. Mixing both is a :class:`ValueError`."""
    specs = {i: a for i, a in enumerate(args) if type(a).__module__.startswith("torch_tensorrt")
             and hasattr(a, "shape_mode")}
    if not specs:
        return args, dynamic_shapes
    if dynamic_shapes is not None:
        raise ValueError("give the dynamic shapes either as torch_tensorrt.Input(min_shape=, opt_shape=, max_shape=) "
                         "or as dynamic_shapes=, not both")
    out = list(args)
    ranges: dict[int, tuple] = {}
    for i, spec in specs.items():
        with_cpu = spec.example_tensor("opt_shape") if isinstance(spec.shape, dict) else spec.example_tensor()
        out[i] = torch.zeros(tuple(with_cpu.shape), dtype=with_cpu.dtype)
        if isinstance(spec.shape, dict):
            ranges[i] = tuple(lo if lo == hi else (lo, opt, hi) for lo, opt, hi in
                              zip(spec.shape["min_shape"], spec.shape["opt_shape"], spec.shape["max_shape"]))
    return tuple(out), (ranges or None)


def settings_for(options: CompileOptions) -> Any:
    """Torch-TensorRT's ``CompilationSettings`` of an engine's compile options."""
    api = load()
    return api.settings(**{"min_block_size": options.min_block_size,
                           "torch_executed_ops": _executed_ops(options.torch_executed_ops),
                           **dict(options.compiler_settings or {})})


def _partition(exported: torch.export.ExportedProgram, settings: Any) -> torch.fx.GraphModule:
    api = load()
    return api.partition(api.lower(exported, settings), settings)


def _segment_profiles(plan: dict, inputs: Sequence[Any]) -> dict | None:
    """The reference plan's shape ranges from Torch-TensorRT's ``Input`` list, None when static."""
    ranges = []
    for spec in inputs:
        shape = spec.shape
        if not isinstance(shape, dict):
            ranges.append(tuple((int(d), int(d), int(d)) for d in shape))
            continue
        ranges.append(tuple((int(lo), int(opt), int(hi)) for lo, opt, hi in
                            zip(shape["min_shape"], shape["opt_shape"], shape["max_shape"])))
    if all(lo == hi for r in ranges for lo, _, hi in r):
        return None
    names = tuple(t["name"] for t in plan["inputs"])
    dims = tuple(tuple(None for _ in r) for r in ranges)
    return ShapeProfiles(names, tuple(ranges), (tuple(ranges),), dims).to_json()


def _keys_read(node: Any, state_keys: set[str]) -> tuple[str, ...]:
    """The state_dict keys an FX node reads: its ``get_attr`` inputs, directly or through nodes
    that read no graph input (weight-only arithmetic)."""
    if node is None:
        return ()
    data: dict[Any, bool] = {}

    def reads_input(n: Any) -> bool:   # does ``n`` depend on a graph input (placeholder)?
        if n not in data:
            data[n] = n.op == "placeholder" or any(reads_input(a) for a in n.all_input_nodes)
        return data[n]

    keys: dict[str, None] = {}
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen or reads_input(n):
            continue
        seen.add(n)
        if n.op == "get_attr" and n.target in state_keys:
            keys[n.target] = None
        stack.extend(n.all_input_nodes)
    return tuple(sorted(keys))


def _graph(module: torch.nn.Module) -> torch.fx.Graph:
    """The FX graph of one of Torch-TensorRT's partition submodules (always GraphModules)."""
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"internal error: a Torch-TensorRT partition submodule of type {type(module).__name__}")
    return module.graph


def _check_segments(engine: Any, partitioned: torch.fx.GraphModule) -> None:
    new = [n for n, _ in partitioned.named_children()]
    old = [n for n, _ in engine.impl.module.named_children()]
    if new != old:
        raise ArchitectureMismatchError([f"Torch-TensorRT partitions the new weights' program into {new}, the "
                                         f"compiled engine has {old}: the two are not the same model; recompile"])


class TorchTensorRTKind:
    """Torch-TensorRT's partitioned network (:class:`refitcore.engine.kinds.EngineKind` and
    :class:`refitcore.engine.kinds.CompilerRefit`; see the module docstring)."""

    name = NAME
    compiler = COMPILER

    def build(self, source: BuildInput, options: CompileOptions) -> Built:
        if options.backend not in ("reference", "tensorrt") or (options.backend == "tensorrt"
                                                                and not cuda_available()):
            why = ("Torch-TensorRT's own engines need a CUDA GPU and torch.cuda.is_available() is False here"
                   if not cuda_available() else
                   "Torch-TensorRT's own engines are built with backend='tensorrt'")
            raise BackendUnavailableError(f"compiler='torch_tensorrt' with backend={options.backend!r}: {why}; "
                                          f"use backend='reference' (Torch-TensorRT's network run on the CPU)")
        built = self._build_reference(source, options)
        if options.backend == "reference":
            return built
        return dataclasses.replace(built, impl=self._build_gpu(source, options, built))

    def _build_gpu(self, source: BuildInput, options: CompileOptions, built: Built) -> TorchTensorRTGpuImpl:
        """Torch-TensorRT's own engines (public API), checked to hold the weights the CPU harness's
        network has (its map and origins serve the audit)."""
        api = load()
        settings = {"min_block_size": options.min_block_size,
                    "torch_executed_ops": _executed_ops(options.torch_executed_ops),
                    **dict(options.compiler_settings or {})}
        inputs = [t.to(DEVICE) for t in source.args]
        compiled = api.compile_engine(_with_state(source.exported, {}), inputs, settings)
        cpu = built.impl
        assert isinstance(cpu, TorchTensorRTImpl)
        shapes = {n: s.shape for n, s in built.weight_map.sources.items()}
        impl = TorchTensorRTGpuImpl(compiled, api, inputs, shapes=shapes, origins=cpu.origins, ops=cpu.ops)
        names, mapped = set(impl.weight_names()), set(built.weight_map.sources)
        if names != mapped:
            raise WeightMappingError(
                [f"engine weight {n!r} is not in the network Torch-TensorRT builds on the CPU"
                 for n in sorted(names - mapped)]
                + [f"weight {_describe(cpu, *split_weight_name(n))} is not refittable in the engine TensorRT built"
                   for n in sorted(mapped - names)],
                header=f"{COMPILER} {api.version}'s engines and its network (the audit's witness) list different "
                       f"weights; the audit cannot check this engine")
        return impl

    def _build_reference(self, source: BuildInput, options: CompileOptions) -> Built:
        if source.kwargs or not all(isinstance(a, torch.Tensor) for a in source.args):
            raise ValueError("compiler='torch_tensorrt' takes the example inputs as positional tensors (or "
                             "torch_tensorrt.Input); give keyword and non-tensor inputs a default in the model")
        api = load()
        ep = source.exported
        settings = settings_for(options)
        partitioned = _partition(_with_state(ep, {}), settings)
        state = ep.state_dict
        state_keys = set(state)
        trt: dict[str, ReferenceEngine] = {}
        params: dict[str, dict[str, np.ndarray]] = {}
        wm = WeightMap()
        origins: dict[str, WeightOrigin] = {}
        ops = {}
        for segment, sub in list(partitioned.named_children()):
            ops[segment] = sum(1 for n in _graph(sub).nodes if n.op == "call_function")
            if segment.startswith(ACC):
                inputs = api.submodule_inputs(sub)
                net = api.build_network(sub, inputs, settings)
                plan = read_network(net.network)
                profiles = _segment_profiles(plan, inputs)
                if profiles is not None:
                    plan["profiles"] = profiles
                engine = ReferenceEngine(plan)
                out_node = next(iter(_graph(sub).find_nodes(op="output")))
                setattr(partitioned, segment, _AccRunner(engine, isinstance(out_node.args[0], (tuple, list))))
                trt[segment] = engine
                for name, arr in engine.current_weights().items():
                    node = net.nodes.get(name)
                    module, _, node_name = net.node_names.get(name, "").rpartition("/")
                    origin = WeightOrigin(segment, name, node.name if node is not None else node_name, module,
                                          _keys_read(node, state_keys))
                    origins[f"{segment}:{name}"] = origin
                    wm.sources[f"{segment}:{name}"] = WeightSource(
                        "converted", {"keys": [{"key": k} for k in origin.keys]}, origin.params(), tuple(arr.shape),
                        str(arr.dtype))
            else:
                params[segment] = {k: state_array(v) for k, v in sub.state_dict().items()}
                for k, arr in params[segment].items():
                    operand = {"key": k} if k in state_keys else None
                    origins[f"{segment}:{k}"] = WeightOrigin(segment, k, "", k.rpartition(".")[0],
                                                             (k,) if operand else ())
                    wm.sources[f"{segment}:{k}"] = (
                        WeightSource("copy", {"x": operand}, {}, tuple(arr.shape), str(arr.dtype)) if operand else
                        WeightSource("converted", {"keys": []}, WeightOrigin(segment, k, "", "", ()).params(),
                                     tuple(arr.shape), str(arr.dtype)))
        impl = TorchTensorRTImpl(partitioned, trt, params, api.version, origins=origins, ops=ops)
        check_map_covers(wm, impl.weight_names())
        out_spec = ep.call_spec.out_spec
        structure = structure_of(source.args, source.kwargs, out_spec)
        tensors = [v for v in pytree.tree_leaves((source.args, source.kwargs)) if isinstance(v, torch.Tensor)]
        placeholders = [n.name for n in partitioned.graph.find_nodes(op="placeholder")]
        with torch.no_grad():
            example_out = impl.run(tensors)
        io = IOSpec(tuple(placeholders), tuple(tuple(t.shape) for t in tensors),
                    tuple(str(t.dtype).replace("torch.", "") for t in tensors),
                    tuple(f"output_{i}" for i in range(len(example_out))),
                    tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else () for o in example_out),
                    source.profiles)
        digest, entries = graph_fingerprint(ep)
        return Built(impl, wm, io, structure, out_spec, digest, entries)

    # ---- refit ---------------------------------------------------------------------------
    def _new_program(self, engine: Any, state: Mapping[str, torch.Tensor], checked: Mapping[str, torch.Tensor],
                     source: Any, model: Any, trust_factory: bool) -> torch.export.ExportedProgram:
        ep = exported_for(engine, source, state, model=model, trust_factory=trust_factory)
        return _with_state(ep, conversion_params(engine.weight_map, state, checked))

    def auto_path(self, engine: Any) -> str:
        """The path Torch-TensorRT refits through by default: 2.13 on have only the fallback."""
        return "fallback"

    def refit_mapping(self, engine: Any, path: str, state: Mapping[str, torch.Tensor],
                      checked: Mapping[str, torch.Tensor], source: Any, *, model: Any = None,
                      trust_factory: bool = False) -> dict[str, np.ndarray]:
        """What Torch-TensorRT's refit sets, ``{engine weight: array}`` (see the module docstring)."""
        api = load()
        if path == "cached":
            raise MapCannotServeError([WEIGHT_MAP_CACHE_REMOVED.format(version=api.version)])
        if isinstance(engine.impl, TorchTensorRTGpuImpl):   # Torch-TensorRT's own refit on its own engines
            gpu: TorchTensorRTGpuImpl = engine.impl
            new_program = self._new_program(engine, state, checked, source, model, trust_factory)
            refitted = api.refit_module(gpu.module, new_program, gpu.inputs)
            return read_weights(api, refitted, gpu.shapes)
        settings = settings_for(engine.options)
        partitioned = _partition(self._new_program(engine, state, checked, source, model, trust_factory), settings)
        _check_segments(engine, partitioned)
        impl: TorchTensorRTImpl = engine.impl
        out: dict[str, np.ndarray] = {}
        current = impl.current_weights()
        for segment, sub in partitioned.named_children():
            if segment not in impl.trt:   # a PyTorch segment: refit_module_weights loads its new state_dict
                out.update({f"{segment}:{k}": state_array(v) for k, v in sub.state_dict().items()})
                continue
            recorder = RecordingRefitter(impl.trt[segment])

            def stand_in(_engine: Any, recorder: RecordingRefitter = recorder) -> RecordingRefitter:
                return recorder

            try:
                api.refit_engine(sub, impl.trt[segment], api.submodule_inputs(sub), settings, stand_in)
            except AssertionError as err:
                missing = [n for n in recorder.get_all_weights() if n not in recorder.staged]
                raise WeightMappingError(
                    [f"Torch-TensorRT's refit failed on engine weight {_describe(impl, segment, n)}: {err}"
                     for n in missing[:1]] or [f"Torch-TensorRT's refit of {segment} failed: {err}"],
                    header=f"{COMPILER} {api.version}'s refit (_refit_single_trt_engine_with_gm) failed") from err
            stale = [n for n in recorder.get_all_weights() if n not in recorder.staged]
            if stale:   # it keeps its old value, as in TensorRT; the witness names it when that is wrong
                log.warning("refitcore: %s's refit did not set %d weight(s) of %s, which keep their old values: %s",
                            COMPILER, len(stale), segment, ", ".join(_describe(impl, segment, n) for n in stale[:3]))
            for name in recorder.get_all_weights():
                full = f"{segment}:{name}"
                value = recorder.staged[name] if name in recorder.staged else np.array(current[full], copy=True)
                shape = engine.weight_map[full].shape   # trt.Weights are flat
                out[full] = value.reshape(shape) if value.size == math.prod(shape) else value
        return out

    def fallback_mapping(self, engine: Any, state: Mapping[str, torch.Tensor], checked: Mapping[str, torch.Tensor],
                         source: Any, *, model: Any = None, trust_factory: bool = False,
                         owned: bool = False) -> dict[str, np.ndarray]:
        """The witness: a fresh Torch-TensorRT conversion of the new weights, every TensorRT weight read
        back off the network's layers; a PyTorch segment's parameters from the state_dict key they hold."""
        api = load()
        settings = settings_for(engine.options)
        partitioned = _partition(self._new_program(engine, state, checked, source, model, trust_factory), settings)
        _check_segments(engine, partitioned)
        impl: TorchTensorRTImpl = engine.impl
        shapes = {n: s.shape for n, s in engine.weight_map.sources.items()}
        out: dict[str, np.ndarray] = {}
        params = conversion_params(engine.weight_map, state, checked)
        current = impl.current_weights()
        for segment, sub in partitioned.named_children():
            if segment in impl.trt:
                # The build holds the tensors the network's weights point into: read while it lives.
                built = api.build_network(sub, api.submodule_inputs(sub), settings)
                out.update(network_weights(built.network, shapes, prefix=f"{segment}:"))
                del built
                continue
            for key, value in sub.state_dict().items():
                name = f"{segment}:{key}"
                src = engine.weight_map.sources.get(name)
                if src is not None and src.recipe == "copy":   # the state_dict key it holds
                    value = params[src.keys[0]].to(getattr(torch, str(current[name].dtype)))
                out[name] = state_array(value)   # else a tensor of Torch-TensorRT's lowering (a folded constant)
        return out

    def clone_impl(self, impl: EngineImpl) -> EngineImpl:
        """A deep copy: the graph, the engines and every weight (Torch-TensorRT's package is shared)."""
        shared = {id(impl.api): impl.api} if isinstance(impl, TorchTensorRTGpuImpl) else {}
        return copy.deepcopy(impl, shared)

    # ---- the rest of the kind protocol ----------------------------------------------------------
    def serialize(self, impl: EngineImpl, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        return impl.serialize(weights=weights)

    def deserialize(self, header: dict, arrays: Mapping[str, np.ndarray], *, backend: str) -> EngineImpl:
        return TorchTensorRTImpl.deserialize(header, dict(arrays))

    def run(self, impl: EngineImpl, inputs: list[Any]) -> list[Any]:
        return impl.run(inputs)

    def coverage(self, engine: Any) -> Coverage:
        """Ops per Torch-TensorRT segment (TensorRT or PyTorch) and the state_dict elements each reads."""
        impl: TorchTensorRTImpl = engine.impl
        wm = engine.weight_map
        segments: list[tuple[str, int]] = []
        trt_keys: set[str] = set()
        fallback: list[tuple[str, str, str, str]] = []
        n_ops = n_trt = 0
        for segment, sub in impl.module.named_children():
            if segment in impl.trt:
                n_trt += impl.ops[segment]
                segments.append(("tensorrt", impl.ops[segment]))
                trt_keys.update(k for n, s in wm.sources.items() if n.startswith(segment + ":") for k in s.keys)
            else:
                nodes = [n for n in _graph(sub).nodes if n.op == "call_function"]
                segments.append(("torch", impl.ops[segment]))
                fallback += [(n.name, str(n.target), "", f"{COMPILER} runs it in PyTorch ({segment})") for n in nodes]
            n_ops += segments[-1][1]
        return Coverage(engine.backend, n_ops, n_trt, sum(spec_numel(wm.key_specs.get(k)) for k in set(wm.keys_used)),
                        sum(spec_numel(wm.key_specs.get(k)) for k in trt_keys), segments, fallback)


def _describe(impl: TorchTensorRTImpl, segment: str, name: str) -> str:
    origin = impl.origins.get(f"{segment}:{name}")
    if origin is None:
        return f"{name!r} (segment {segment})"
    return (f"{name!r} (segment {segment}, FX node {origin.node}, module {origin.module or '<top level>'}, "
            f"state_dict keys {list(origin.keys)})")


KIND = TorchTensorRTKind()
