"""Models torch.export cannot export whole (data-dependent control flow, e.g. detection
post-processing): compile the largest submodules that do export and run the rest eagerly.

The search tries the whole model, then each child, recursing into the children of a module that
does not export. Each candidate's example inputs are captured with forward hooks on one eager
run; a module called more than once, never called, or without weights is not compiled. The
caller may instead name the submodules (``submodules=[...]``).

The compiler finds the submodules (:func:`find_exportable`) and compiles each; the :class:`Hybrid`
kind assembles one engine (:class:`HybridImpl` behind :class:`refitcore.RefittableEngine`): the
model's own forward runs eagerly, its compiled submodules call their engines, and every weight
lives in one namespace: ``[<module path>] <engine weight name>`` for a compiled submodule's
weights and ``[eager] <state_dict key>`` for the model's parameters and buffers read by the
eager code (every key of the model: a compiled submodule that meets inputs of another shape than
it was compiled for, such as a detection head after a different number of proposals, runs that
call eagerly with the same weights). Refit is one transaction over all of them (the segment
refitter, :class:`refitcore.engine.segmented.SegmentedRefitter`).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore import dtypes
from refitcore.backends.base import read_only_views
from refitcore.capture.lowering import export_model
from refitcore.capture.structured import leaf_names, unflatten
from refitcore.conversion.weight_map import WeightMap, WeightSource, prefix_consts, rename_keys
from refitcore.engine.coverage import Coverage, spec_numel
from refitcore.engine.kinds import BuildInput, Built, state_array, structure_of
from refitcore.engine.options import CompileOptions
from refitcore.engine.records import IOSpec
from refitcore.engine.segmented import SegmentedRefitter
from refitcore.errors import BundleError, ExportError

__all__ = ["find_exportable", "HybridImpl", "Hybrid", "KIND", "NAME", "EAGER"]

NAME = "hybrid"
EAGER = "eager"


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, list], Any]:
    """{module path: [(args, kwargs) per call]} over one eager run, and the model's output."""
    calls: dict[str, list] = {}
    handles = []
    for path, module in model.named_modules():
        def hook(mod, a, k, out, path=path):
            calls.setdefault(path, []).append((a, k))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def find_exportable(model: torch.nn.Module, args: tuple, kwargs: dict, *, names: Sequence[str] | None = None,
                    ) -> tuple[dict[str, tuple[Any, tuple, dict]], list[tuple[str, str]], Any]:
    """({path: (ExportedProgram, args, kwargs)} of the largest submodules that export, [(path, why it runs
    eagerly)], eager output)."""
    calls, out = _capture(model, args, kwargs)
    found: dict[str, tuple[Any, tuple, dict]] = {}
    eager: list[tuple[str, str]] = []
    modules = dict(model.named_modules())

    def attempt(path: str) -> tuple[Any, str]:
        module = modules[path]
        seen = calls.get(path, [])
        if len(seen) != 1:
            return None, "never called" if not seen else f"called {len(seen)} times"
        a, k = seen[0]
        try:
            return export_model(module, a, k), ""
        except Exception as err:  # noqa: BLE001 - any export failure: say it and look inside
            return None, ExportError(path, err).cause_line

    if names is not None:
        for path in names:
            if path not in modules:
                raise ValueError(f"submodules: the model has no module {path!r}")
            ep, why = attempt(path)
            if ep is None:
                raise ExportError(path, RuntimeError(why))
            found[path] = (ep, *calls[path][0])
        return found, [("", "the model's own forward (submodules named by the caller are compiled)")], out

    def visit(path: str) -> None:
        module = modules[path]
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            if path:
                eager.append((path, "no weights"))
            return
        ep, why = attempt(path)
        if ep is not None:
            found[path] = (ep, *calls[path][0])
            return
        eager.append((path, f"does not export ({why})" if why.split(":")[0] not in ("never called",)
                      and not why.startswith("called") else why))
        for name, _child in module.named_children():
            visit(f"{path}.{name}" if path else name)

    visit("")
    return found, eager, out


class _EngineCall(torch.nn.Module):
    """Calls a compiled submodule's engine; inputs of another structure or shape than compiled run
    the original module eagerly (with the same weights)."""

    def __init__(self, engine, original: torch.nn.Module, counter: dict):
        super().__init__()
        self.engine = engine
        self.original = original
        self.counter = counter

    def forward(self, *args, **kwargs):
        try:
            flat = self.engine.flatten_inputs(args, kwargs)
        except (ValueError, TypeError):
            flat = None
        if flat is not None and [tuple(t.shape) for t in flat] == [tuple(s) for s in self.engine.io.input_shapes]:
            return self.engine.unflatten_outputs(self.engine.run(flat))
        self.counter["eager_calls"] = self.counter.get("eager_calls", 0) + 1
        return self.original(*args, **kwargs)


def _shell_key(key: str, compiled: Sequence[str]) -> str:
    """A model state_dict key as the shell names it (compiled modules keep theirs under ``.original``)."""
    for path in sorted(compiled, key=len, reverse=True):
        if key.startswith(path + "."):
            return f"{path}.original.{key[len(path) + 1:]}"
    return key


def _tied_aliases(shell: torch.nn.Module) -> frozenset[str]:
    """The shell's state_dict keys that name a tensor an earlier key already names (tied weights,
    e.g. a language model's head and its token embedding): ``functional_call`` takes one key per
    tensor and sets every name it has."""
    seen: set[int] = set()
    aliases = set()
    for key, t in shell.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases.add(key)
        seen.add(id(t))
    return frozenset(aliases)


class HybridImpl:
    """The model's forward, eager, with compiled submodules; see the module docstring."""

    def __init__(self, shell: torch.nn.Module, engines: Mapping[str, Any], params: Mapping[str, np.ndarray],
                 structure: dict, compiled: Sequence[str], counter: dict | None = None):
        self.shell = shell
        self.engines = dict(engines)
        self.trt = {path: e.impl for path, e in self.engines.items()}
        self.params = {EAGER: dict(params)}
        self.structure = structure
        self.compiled = list(compiled)
        self.counter = counter if counter is not None else {}
        self.tied_aliases = _tied_aliases(shell)
        first = next(iter(self.engines.values()), None)
        self.backend_name = first.backend if first is not None else "reference"
        self.note = ((first.note + "; ") if first is not None and first.note else "") + (
            f"compiled submodules {self.compiled}; the rest of the model runs eagerly")

    @staticmethod
    def split_name(name: str) -> tuple[str, str]:
        if not name.startswith("[") or "] " not in name:
            raise KeyError(f"{name!r} is not a '[<module path>] <weight>' name")
        part, rest = name[1:].split("] ", 1)
        return part, rest

    @staticmethod
    def part_name(part: str, name: str) -> str:
        return f"[{part}] {name}"

    def weight_names(self) -> list[str]:
        names = [self.part_name(p, n) for p, impl in self.trt.items() for n in impl.weight_names()]
        return names + [self.part_name(EAGER, k) for k in self.params[EAGER]]

    def current_weights(self) -> dict[str, np.ndarray]:
        out = {self.part_name(p, n): v for p, impl in self.trt.items() for n, v in impl.current_weights().items()}
        out.update({self.part_name(EAGER, k): v for k, v in read_only_views(self.params[EAGER]).items()})
        return out

    def prototype(self, name: str):
        return self.create_refitter().get_weights_prototype(name)

    def rollback_weights(self) -> dict[str, np.ndarray]:
        out = {self.part_name(p, n): v for p, impl in self.trt.items() for n, v in impl.rollback_weights().items()}
        out.update({self.part_name(EAGER, k): v for k, v in self.params[EAGER].items()})   # swapped, never written
        return out

    def run(self, inputs: Sequence[torch.Tensor]) -> list[Any]:
        it = iter(inputs)
        leaves = [next(it) if "tensor" in d else d["value"] for d in self.structure["in_leaves"]]
        args, kwargs = unflatten(leaves, self.structure["in"])
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        params = {key: dtypes.as_torch(v).to(device) for k, v in self.params[EAGER].items()
                  if (key := _shell_key(k, self.compiled)) not in self.tied_aliases}
        with torch.no_grad():
            out = torch.func.functional_call(self.shell, params, tuple(args), dict(kwargs), strict=False)
        return pytree.tree_leaves(out)

    def create_refitter(self, *, adopt: bool = False) -> SegmentedRefitter:
        return SegmentedRefitter(self, adopt=adopt)

    def commit_params(self, pending: Mapping[str, np.ndarray]) -> None:
        new = dict(self.params[EAGER])
        for name, arr in pending.items():
            new[self.split_name(name)[1]] = arr
        self.params = {EAGER: new}

    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """For cloning only: the eager part is code, so a hybrid engine is not saved to a file."""
        arrays = {self.part_name(EAGER, k): v for k, v in self.params[EAGER].items()}
        return {"kind": "hybrid", "live": self}, arrays

    @classmethod
    def deserialize(cls, header: dict, arrays: Mapping[str, np.ndarray]) -> HybridImpl:
        src: HybridImpl = header["live"]
        engines = {p: e.clone() for p, e in src.engines.items()}
        counter: dict = {}
        # The engines and the counter are replaced below: do not deep-copy them.
        memo = {id(e): e for e in src.engines.values()}
        memo[id(src.counter)] = counter
        shell = copy.deepcopy(src.shell, memo)
        for path, engine in engines.items():
            call = cast(_EngineCall, shell.get_submodule(path))   # the copy of what build() put at `path`
            call.engine, call.counter = engine, counter
        params = {cls.split_name(k)[1]: v for k, v in arrays.items()}
        return cls(shell, engines, params, src.structure, src.compiled, counter)


class Hybrid:
    """Compiled submodules inside the model's eager forward (:class:`refitcore.engine.kinds.EngineKind`)."""

    name = NAME

    def build(self, source: BuildInput, options: CompileOptions) -> Built:
        """Assemble the engine from ``source.parts`` ({module path: compiled engine}): the model's
        shell calls them, and every weight of the model lives in one namespace."""
        model, engines = source.model, dict(source.parts)
        shell = copy.deepcopy(model).eval()
        counter: dict = {}
        for path, engine in engines.items():
            parent_path, _, leaf = path.rpartition(".")
            parent = shell.get_submodule(parent_path) if parent_path else shell
            setattr(parent, leaf, _EngineCall(engine, getattr(parent, leaf), counter))
        wm = WeightMap()
        for path, engine in engines.items():
            rename = {k: f"{path}.{k}" for k in engine.weight_map.key_specs}
            for name, src in engine.weight_map.sources.items():
                inputs = {k: prefix_consts(rename_keys(v, rename), f"[{path}] ") for k, v in src.inputs.items()}
                wm.sources[HybridImpl.part_name(path, name)] = dataclasses.replace(src, inputs=inputs)
            wm.constants.update({f"[{path}] {k}": v for k, v in engine.weight_map.constants.items()})
        params = {k: state_array(v) for k, v in model.state_dict().items()}
        for k, arr in params.items():
            wm.sources[HybridImpl.part_name(EAGER, k)] = WeightSource("copy", {"x": {"key": k}}, {}, tuple(arr.shape),
                                                                     str(arr.dtype))
        out_spec = pytree.tree_flatten(source.eager_output)[1]
        structure = structure_of(source.args, source.kwargs, out_spec)
        impl = HybridImpl(shell, engines, params, structure, list(engines), counter)
        tensors = [d["tensor"] for d in structure["in_leaves"] if "tensor" in d]
        io = IOSpec(tuple(f"input_{i}" for i in range(len(tensors))), tuple(tuple(t[0]) for t in tensors),
                    tuple(t[1] for t in tensors), tuple(leaf_names(structure["out"])), ())
        fingerprint = "+".join(e.fingerprint[:16] for e in engines.values())
        return Built(impl, wm, io, structure, out_spec, fingerprint, eager_modules=list(source.eager))

    def fallback_mapping(self, engine: Any, state: Mapping[str, torch.Tensor], checked: Mapping[str, torch.Tensor],
                         source: Any, *, model: Any = None, trust_factory: bool = False,
                         owned: bool = False) -> dict[str, np.ndarray]:
        """Each compiled submodule through its own kind's fallback (converting again with the
        submodule's slice of the new weights), the eager weights straight from the state_dict."""
        impl: HybridImpl = engine.impl
        out: dict[str, np.ndarray] = {}
        for path, sub in impl.engines.items():
            def part(d: Mapping[str, torch.Tensor], path: str = path) -> dict[str, torch.Tensor]:
                return {k[len(path) + 1:]: v for k, v in d.items() if k.startswith(path + ".")}

            sub_state = part(state)
            sub_source = source.get_submodule(path) if isinstance(source, torch.nn.Module) else None
            mapping = sub.kind.fallback_mapping(sub, sub_state, part(checked), sub_source)
            out.update({HybridImpl.part_name(path, n): v for n, v in mapping.items()})
        for k, arr in impl.params[EAGER].items():
            out[HybridImpl.part_name(EAGER, k)] = state_array(state[k].to(dtypes.as_torch(arr).dtype))
        return out

    def serialize(self, impl: Any, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        raise BundleError("an engine whose model runs partly eagerly (compiled submodules) cannot be saved as "
                          "data: its eager part is code; save each compiled submodule's engine "
                          "(engine.impl.engines[path].save(...)) and rebuild the model around them")

    def deserialize(self, header: dict, arrays: Mapping[str, np.ndarray], *, backend: str) -> Any:
        raise BundleError("an engine of compiled submodules is never saved; this file cannot hold one")

    def run(self, impl: Any, inputs: list[Any]) -> list[Any]:
        return impl.run(inputs)

    def coverage(self, engine: Any) -> Coverage:
        """The compiled submodules' ops and weights against every weight of the model."""
        impl: HybridImpl = engine.impl
        parts = {path: sub.summary() for path, sub in impl.engines.items()}
        fallback = [(node, op, f"{path}.{p}" if p else path, reason)
                    for path, c in parts.items() for node, op, p, reason in c.fallback]
        total = sum(spec_numel(v) for v in engine.weight_map.key_specs.values())
        trt = sum(c.weights_tensorrt for c in parts.values())
        eager = list(engine.eager_modules)
        calls = impl.counter.get("eager_calls", 0)
        if calls:
            eager.append(("(compiled submodules)", f"{calls} call(s) met inputs of another shape and ran eagerly"))
        return Coverage(engine.backend, sum(c.ops_total for c in parts.values()),
                        sum(c.ops_tensorrt for c in parts.values()), total, trt,
                        [(f"{p}: {k}", n) for p, c in parts.items()
                         for k, n in (c.segments or [("tensorrt", c.ops_total)])],
                        fallback, eager)


KIND = Hybrid()
