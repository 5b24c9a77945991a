"""The two ways of turning new weights into engine weights.

- :func:`cached_mapping`: the weight map's recipes applied to a state_dict (no export, no
  conversion): the fast path.
- :func:`fallback_mapping`: conversion run again with the new weights, then every refittable
  weight read back off the new network's layers by name: the slow, independent witness.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from refitcore.refitting import checkpoints
from refitcore.errors import ArchitectureMismatchError, WeightMappingError
from refitcore.conversion.recipes import apply_recipe, evaluate_operand
from refitcore.refitting.validate import nonfinite_key_problems, nonfinite_weight_problems, variance_problems
from refitcore.conversion.weight_map import WeightMap

__all__ = ["cached_mapping", "fallback_mapping", "normalize_weights", "check_state_dict", "load_checkpoint"]

ENGINE_DTYPE = torch.float32
log = logging.getLogger("refitcore")


def load_checkpoint(path: str | os.PathLike, *, weight_map: WeightMap | None = None,
                    state_keys: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """A state_dict from a checkpoint file, never running code it holds (see
    :func:`refitcore.refitting.checkpoints.load_checkpoint`, which also returns what was unwrapped or stripped)."""
    loaded = checkpoints.load_checkpoint(path, weight_map=weight_map, state_keys=state_keys)
    for note in loaded.notes:
        log.info("refitcore: %s: %s", loaded.path, note)
    return loaded.state_dict


def normalize_weights(new_weights: Any, weight_map: WeightMap | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """(state_dict, source object) from an nn.Module, ExportedProgram, state_dict or checkpoint path.

    With ``weight_map``, containers are unwrapped and wrapper prefixes stripped to fit it (see
    :func:`refitcore.refitting.checkpoints.load_weights`, which also returns the notes saying so)."""
    loaded = checkpoints.load_weights(new_weights, weight_map=weight_map)
    for note in loaded.notes:
        log.debug("refitcore: %s", note)
    return loaded.state_dict, loaded.source


def check_state_dict(weight_map: WeightMap, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a state_dict against the map and return it with floats cast to the engine dtype.

    Raises :class:`ArchitectureMismatchError` for missing keys or wrong shapes (every one listed,
    with the engine weights that need it, and the likely cause when it is recognisable, e.g. a
    wrapper prefix) and :class:`WeightMappingError` for dtype problems, overflow on cast, tied
    parameters with different values, or a BatchNorm running variance <= -eps (the fold would be
    NaN; NaN/Inf in the weights themselves are found by the mappings, named by key). Keys the
    engine never reads are not checked: they may be missing or extra."""
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
        raise ArchitectureMismatchError(arch + other + checkpoints.explain_missing(weight_map, state))
    other += variance_problems(weight_map, state)
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
    state, source = normalize_weights(state_dict, weight_map)
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
            want = getattr(torch, src.dtype, ENGINE_DTYPE)   # float32 but for PyTorch segments' buffers
            if value.dtype != want:
                value = value.to(want)
            # NaN/Inf are found here, on the values the engine would get (one pass), and traced back
            # to the state_dict keys behind them.
            problems = nonfinite_weight_problems(weight_map, name, value, state)
            if problems:
                raise WeightMappingError(problems)
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


def fallback_mapping(engine, new_weights: Any, *, model: Any = None, trust_factory: bool = False
                     ) -> dict[str, np.ndarray]:
    """Convert again with ``new_weights`` and read every refittable weight back off the new network.

    When only the weights changed (a state_dict or checkpoint), the engine's exported program is
    reused instead of exporting again; an engine loaded from a file has none, and is re-exported
    from ``model`` (nn.Module, factory callable or 'module:callable') or, only with
    ``trust_factory=True``, from the factory the file records. A module or ExportedProgram whose
    graph differs from the compiled one raises :class:`ArchitectureMismatchError` naming the first
    difference."""
    state, source = normalize_weights(new_weights, engine.weight_map)
    checked = check_state_dict(engine.weight_map, state)
    problems = nonfinite_key_problems(engine.weight_map, checked)
    if problems:
        raise WeightMappingError(problems)
    return engine.kind.fallback_mapping(engine, state, checked, source, model=model, trust_factory=trust_factory)
