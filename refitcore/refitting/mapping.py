"""The two ways of turning new weights into engine weights.

- :func:`cached_mapping`: the weight map's recipes applied to a state_dict (no export, no
  conversion): the fast path.
- :func:`fallback_mapping`: conversion run again with the new weights, then every refittable
  weight read back off the new network's layers by name: the slow, independent witness.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from refitcore.conversion.recipes import apply_recipe, evaluate_operand
from refitcore.conversion.weight_map import WeightMap
from refitcore.errors import ArchitectureMismatchError, WeightMappingError
from refitcore.refitting.prepare import ENGINE_DTYPE, prepare_weights
from refitcore.refitting.validate import nonfinite_weight_problems

__all__ = ["cached_mapping", "fallback_mapping", "constants_note"]


def cached_mapping(weight_map: WeightMap, weights: Any, *, constants_from: Any = None) -> dict[str, np.ndarray]:
    """``{engine weight name: float32 array}`` from new weights through the map's recipes.

    ``weights``: :class:`~refitcore.refitting.prepare.CheckedWeights`, or anything
    :func:`~refitcore.refitting.prepare.prepare_weights` takes (prepared here, once). Tensor
    constants that a state_dict does not hold (tensor attributes, non-persistent buffers) are read
    from the model when the weights came from an nn.Module or ExportedProgram, or from
    ``constants_from``; a bare state_dict keeps their compile-time values (:func:`constants_note`
    says so). Raises :class:`MapCannotServeError` when the model's constants do not fit the map.

    Example::

        mapping = refitcore.cached_mapping(engine.weight_map, new_model)
    """
    weights = prepare_weights(weight_map, weights)
    constants, _ = weight_map.constants_for(weights.source if weights.source is not None else constants_from)
    state = weights.checked
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
            # The keys are finite (prepare_weights checked them): a non-finite value here is a recipe
            # overflow, explained by the ranges of the keys behind it.
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
    re-exported, built by :func:`refitcore.capture.eager.eager_model` from ``model`` (the caller's) or
    the engine's recorded factory when ``trust_factory`` (never imported otherwise)."""
    from refitcore.capture.eager import EagerModelError, UntrustedFactoryError, eager_model
    from refitcore.capture.lowering import export_model, graph_fingerprint
    from refitcore.capture.shapes import export_example

    if isinstance(source, torch.nn.Module) and engine.io.profiles is not None:
        # The same export as at compile time: example shapes, and the recorded dynamic ranges.
        profiles = engine.io.profiles
        examples = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(engine.io.input_shapes, engine.io.input_dtypes)]
        ep = export_model(source, export_example(examples, profiles), dynamic_shapes=profiles.torch_dynamic_shapes())
    elif isinstance(source, torch.nn.Module) and engine.structure is not None:
        args, kwargs = engine.example_call()
        ep = export_model(source, args, kwargs)
    elif isinstance(source, torch.nn.Module):
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

    ``new_weights``: :class:`~refitcore.refitting.prepare.CheckedWeights`, or anything
    :func:`~refitcore.refitting.prepare.prepare_weights` takes (prepared here, once). When only
    the weights changed (a state_dict or checkpoint), the engine's exported program is reused
    instead of exporting again; an engine loaded from a file has none, and is re-exported
    from ``model`` (nn.Module, factory callable or 'module:callable') or, only with
    ``trust_factory=True``, from the factory the file records. A module or ExportedProgram whose
    graph differs from the compiled one raises :class:`ArchitectureMismatchError` naming the first
    difference."""
    from refitcore.conversion.convert import convert
    from refitcore.conversion.network_reader import network_weights

    weights = prepare_weights(engine, new_weights)
    state, source, checked = weights.state, weights.source, weights.checked
    if engine.submodule_impl is not None:   # compiled submodules in an eager model
        from refitcore.engine.hybrid import hybrid_fallback_mapping

        return hybrid_fallback_mapping(engine, state, source, fallback_mapping)
    ep = exported_for(engine, source, state, model=model, trust_factory=trust_factory)
    # Parameters are looked up by the exported program's own fully qualified names.
    params = {k: v for k, v in state.items()}
    params.update(checked)
    # Tied parameters are one tensor: every alias gets the canonical key's value (the exported
    # program may have lifted the tensor under any of its names).
    for group in engine.weight_map.tied:
        if group[0] in checked:
            params.update({k: checked[group[0]] for k in group[1:]})
    if engine.segments is not None:   # a partitioned engine: every segment, one namespace
        from refitcore.engine.segmented_build import segmented_fallback_mapping

        return segmented_fallback_mapping(engine, ep, params)
    result = convert(ep, params, fusion=engine.fusion, profiles=engine.io.profiles)
    return network_weights(result.network, {n: s.shape for n, s in engine.weight_map.sources.items()})
