"""The two ways of turning new weights into engine weights.

- :func:`cached_mapping`: the weight map's recipes applied to a state_dict (no export, no
  conversion): the fast path.
- :func:`fallback_mapping`: conversion run again with the new weights, then every refittable
  weight read back off the new network's layers by name: the slow, independent witness.
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from .errors import ArchitectureMismatchError, WeightMappingError
from .recipes import apply_recipe, evaluate_operand
from .weight_map import WeightMap

__all__ = ["cached_mapping", "fallback_mapping", "normalize_weights", "check_state_dict", "load_checkpoint"]

ENGINE_DTYPE = torch.float32


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a checkpoint file, never unpickling arbitrary objects."""
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise WeightMappingError([f"{path}: cannot be read as a weights-only checkpoint: {err}"],
                                 header="cannot load the checkpoint") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightMappingError([f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}"],
                                 header="cannot load the checkpoint")
    return obj


def _detached(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached tensors, keeping a state_dict's per-module version metadata (``_metadata``)."""
    out = collections.OrderedDict((k, v.detach()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def normalize_weights(new_weights: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(state_dict, source object) from an nn.Module, ExportedProgram, state_dict or checkpoint path."""
    if isinstance(new_weights, (str, os.PathLike)):
        return load_checkpoint(new_weights), None
    if isinstance(new_weights, torch.nn.Module):
        return _detached(new_weights.state_dict()), new_weights
    if isinstance(new_weights, torch.export.ExportedProgram):
        return {k: v.detach() for k, v in new_weights.state_dict.items()}, new_weights
    if isinstance(new_weights, Mapping):
        bad = [k for k, v in new_weights.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightMappingError([f"{k!r}: expected a torch.Tensor, got {type(new_weights[k]).__name__}"
                                      for k in bad])
        return _detached(new_weights), None
    raise TypeError(f"new weights must be an nn.Module, ExportedProgram, state_dict or checkpoint path; "
                    f"got {type(new_weights).__name__}")


def check_state_dict(weight_map: WeightMap, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a state_dict against the map and return it with floats cast to the engine dtype.

    Raises :class:`ArchitectureMismatchError` for missing keys or wrong shapes (every one listed,
    with the engine weights that need it) and :class:`WeightMappingError` for dtype problems,
    overflow on cast, or tied parameters with different values."""
    arch, other = [], []
    used = weight_map.keys_used
    specs = weight_map.key_specs
    # A checkpoint may store a tied tensor once, under any of its names (safetensors drops aliases).
    for group in weight_map.tied:
        if group[0] not in state:
            alias = next((k for k in group[1:] if k in state), None)
            if alias is not None:
                state = dict(state)
                state[group[0]] = state[alias]

    def shown(key: str) -> str:
        # Only on the error path: finding a key's consumers scans the whole map.
        consumers = weight_map.consumers(key)
        return ", ".join(consumers[:3]) + (f" (+{len(consumers) - 3} more)" if len(consumers) > 3 else "")

    for key in used:
        if key not in state:
            arch.append(f"state_dict has no key {key!r} (needed by engine weight(s) {shown(key)})")
            continue
        spec = specs.get(key)
        t = state[key]
        if spec is not None and tuple(t.shape) != tuple(spec[0]):
            arch.append(f"{key!r}: shape {list(t.shape)} where the compiled model has {list(spec[0])} "
                        f"(engine weight(s) {shown(key)})")
            continue
        want_float = spec is None or spec[1] in ("float32", "float16", "bfloat16", "float64")
        if want_float and not t.is_floating_point():
            other.append(f"{key!r}: dtype {t.dtype} where a floating-point tensor is needed "
                         f"(engine weight(s) {shown(key)})")
    for group in weight_map.tied:
        present = [k for k in group if k in state]
        for k in present[1:]:
            a, b = state[present[0]], state[k]
            if a.shape != b.shape or not torch.equal(a, b):
                other.append(f"tied parameters {present[0]!r} and {k!r} are one tensor in the model but differ in "
                             f"the new weights; give them equal values (load_state_dict would keep only one)")
    if arch:
        raise ArchitectureMismatchError(arch + other)
    if other:
        raise WeightMappingError(other)
    out: dict[str, torch.Tensor] = {}
    overflow = []
    for key in used:
        t = state[key]
        if t.is_floating_point() and t.dtype != ENGINE_DTYPE:
            c = t.to(ENGINE_DTYPE)
            if not bool(torch.isfinite(c).all()) and bool(torch.isfinite(t).all()):
                big = t.abs().max().item()
                overflow.append(f"{key!r}: values up to {big:.3g} overflow {ENGINE_DTYPE} (engine weight(s) "
                                f"{', '.join(weight_map.consumers(key)[:3])})")
            t = c
        out[key] = t
    if overflow:
        raise WeightMappingError(overflow)
    return out


def cached_mapping(weight_map: WeightMap, state_dict: Any, *, constants_from: Any = None) -> dict[str, np.ndarray]:
    """``{engine weight name: float32 array}`` from new weights through the map's recipes.

    Tensor constants that a state_dict does not hold (tensor attributes, non-persistent buffers)
    are read from the model when ``state_dict`` is an nn.Module or ExportedProgram, or from
    ``constants_from``; a bare state_dict keeps their compile-time values (:func:`constants_note`
    says so). Raises :class:`MapCannotServeError` when the model's constants do not fit the map.

    Example::

        mapping = refitcore.cached_mapping(engine.weight_map, new_model)
    """
    state, source = normalize_weights(state_dict)
    constants, _ = weight_map.constants_for(source if source is not None else constants_from)
    state = check_state_dict(weight_map, state)
    memo: dict = {}
    out: dict[str, np.ndarray] = {}
    # Copy recipes hand the state_dict's memory through without copying (the refitter copies at
    # set time, as TensorRT does). Such arrays, and any that alias the map's constants or another
    # entry, are returned read-only: editing a mapping can never write into the caller's
    # state_dict, the map, or another engine weight; `.copy()` gives an editable array.
    taken = {t.untyped_storage().data_ptr() for t in state.values()}
    taken.update(a.ctypes.data for a in constants.values())
    with torch.no_grad():
        for name, src in weight_map.sources.items():
            inputs = {k: evaluate_operand(v, state, constants, memo) for k, v in src.inputs.items()}
            value = apply_recipe(src.recipe, inputs, src.params)
            if value.dtype != ENGINE_DTYPE:
                value = value.to(ENGINE_DTYPE)
            if value.numel() != src.count:
                raise WeightMappingError([f"engine weight {name!r}: recipe {src.describe()} gave {value.numel()} "
                                          f"values, the engine needs {src.count}"])
            value = value.reshape(src.shape).contiguous()
            ptr = value.untyped_storage().data_ptr()
            arr = value.numpy()
            if ptr in taken:
                arr = arr.view()
                arr.flags.writeable = False
            taken.add(ptr)
            out[name] = arr
    return out


def constants_note(weight_map: WeightMap, source: Any) -> list[str]:
    """What a refit from ``source`` (None: a bare state_dict or checkpoint) cannot take from it:
    the tensor constants outside any state_dict keep their compile-time values. Each note is also
    issued as a warning; an empty list when there is nothing to say."""
    if source is not None:
        return []
    _, notes = weight_map.constants_for(None)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    return notes


def _describe_entry(e: list) -> str:
    """A graph_fingerprint entry in words: 'op aten.relu.default (node relu, module layer1.0)'."""
    kind = e[0] if e else "?"
    if kind == "op":
        return f"op {e[1]} (node {e[2]}, module {e[3] or '<top level>'}, args {e[4]})"
    if kind in ("weight", "input"):
        return f"{kind} {e[1]} of shape {e[2]} ({e[3]})"
    if kind == "output":
        return f"the graph output {e[1]}"
    return str(e)


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at graph entry {i}: compiled {_describe_entry(x)}, new {_describe_entry(y)}"
    if len(a) != len(b):
        longer, which = (a, "compiled") if len(a) > len(b) else (b, "new")
        return (f"the {which} graph has {abs(len(a) - len(b))} more entries, first "
                f"{_describe_entry(longer[min(len(a), len(b))])}")
    return "no difference found"


def exported_for(engine, source: Any, state: dict[str, torch.Tensor], *, model: Any = None,
                 trust_factory: bool = False):
    """The ExportedProgram to convert for the fallback path, checked against the compiled graph.

    ``source``: the new weights' own module or ExportedProgram, if any. Without one the engine's
    exported program is reused; a loaded engine has none, so the eager model holding ``state`` is
    re-exported, built by :func:`refitcore.eager.eager_model` from ``model`` (the caller's) or
    the engine's recorded factory when ``trust_factory`` (never imported otherwise)."""
    from .eager import EagerModelError, UntrustedFactoryError, eager_model
    from .lowering import export_model, graph_fingerprint

    if isinstance(source, torch.nn.Module):
        ep = export_model(source, [torch.zeros(s, dtype=getattr(torch, d))
                                   for s, d in zip(engine.io.input_shapes, engine.io.input_dtypes)])
    elif isinstance(source, torch.export.ExportedProgram):
        ep = source.run_decompositions({}) if not _is_lowered(source) else source
    else:
        ep = engine.exported_program
        if ep is None:
            if model is None and not engine.model_factory:
                raise ArchitectureMismatchError([
                    "this engine has no exported program (it was loaded from a file) and no recorded model "
                    "factory; pass the new weights as an nn.Module (or model=) to use the fallback path"])
            try:
                module = eager_model(state, model=model, engine=engine, trust_factory=trust_factory,
                                     keep_missing=True)
            except UntrustedFactoryError:
                raise
            except EagerModelError as err:
                raise ArchitectureMismatchError([f"the fallback path cannot rebuild the model: {err}"]) from err
            return exported_for(engine, module, state)
        return ep
    digest, entries = graph_fingerprint(ep)
    if digest != engine.fingerprint:
        where = _first_difference(engine.graph_entries or [], entries) if engine.graph_entries else "unknown"
        raise ArchitectureMismatchError([f"the new model's graph differs from the compiled one ({where}); "
                                         f"recompile needed"])
    return ep


def _is_lowered(ep) -> bool:
    return not any(getattr(n.target, "__name__", "") == "batch_norm.default" for n in ep.graph.nodes)


def fallback_mapping(engine, new_weights: Any, *, model: Any = None, trust_factory: bool = False
                     ) -> dict[str, np.ndarray]:
    """Convert again with ``new_weights`` and read every refittable weight back off the new network.

    When only the weights changed (a state_dict or checkpoint), the engine's exported program is
    reused instead of exporting again; an engine loaded from a file has none, and is re-exported
    from ``model`` (nn.Module, factory callable or 'module:callable') or, only with
    ``trust_factory=True``, from the factory the file records. A module or ExportedProgram whose
    graph differs from the compiled one raises :class:`ArchitectureMismatchError` naming the first
    difference."""
    from .network_reader import WEIGHT_ROLES, read_network
    from .conversion.convert import convert

    state, source = normalize_weights(new_weights)
    checked = check_state_dict(engine.weight_map, state)
    ep = exported_for(engine, source, state, model=model, trust_factory=trust_factory)
    # Parameters are looked up by the exported program's own fully qualified names.
    params = {k: v for k, v in state.items()}
    params.update(checked)
    # Tied parameters are one tensor: every alias gets the canonical key's value (the exported
    # program may have lifted the tensor under any of its names).
    for group in engine.weight_map.tied:
        if group[0] in checked:
            params.update({k: checked[group[0]] for k in group[1:]})
    result = convert(ep, params, fusion=engine.fusion)
    plan = read_network(result.network)
    out: dict[str, np.ndarray] = {}
    for layer in plan["layers"]:
        for role in WEIGHT_ROLES.get(layer["type"], ()):
            arr = layer["weights"].get(role)
            if arr is None:
                continue
            name = f"{layer['name']} {role}"
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            src = engine.weight_map.sources.get(name)
            if src is not None and src.count == arr.size:
                arr = arr.reshape(src.shape)  # TensorRT hands kernels back flat
            out[name] = arr
    return out
