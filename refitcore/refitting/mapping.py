"""The two ways of turning new weights into engine weights.

- :func:`cached_mapping`: the weight map's recipes applied to a state_dict (no export, no
  conversion): the fast path.
- :func:`fallback_mapping`: conversion run again with the new weights, then every refittable
  weight read back off the new network's layers by name: the slow, independent witness.
- :func:`compiler_mapping`: for an engine whose compiler refits it (:class:`refitcore.engine.kinds.CompilerRefit`,
  Torch-TensorRT's), what that compiler's own refit code sets; :func:`fallback_mapping` (the kind's
  fresh conversion read off the network) is its witness.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from refitcore.conversion.recipes import apply_recipe, evaluate_operand
from refitcore.conversion.weight_map import WeightMap
from refitcore.engine.kinds import CompilerRefit
from refitcore.errors import WeightMappingError
from refitcore.refitting.prepare import ENGINE_DTYPE, prepare_weights
from refitcore.refitting.validate import nonfinite_weight_problems, precision_problems

__all__ = ["cached_mapping", "fallback_mapping", "compiler_mapping", "constants_note"]


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
            exact = apply_recipe(src.recipe, inputs, src.params)
            want = getattr(torch, src.dtype, ENGINE_DTYPE)   # the engine dtype (float32, float16, bfloat16, ...)
            value = exact if exact.dtype == want else exact.to(want)
            # The keys are finite (prepare_weights checked them): a non-finite value derived from them
            # is a recipe overflow or a non-finite constant in their arithmetic, said as such; a finite
            # one the engine dtype cannot hold (overflow, flush, all bits lost) is refused too. A value
            # that reads no key (a literal such as masked_fill's -inf) is structure, never refused.
            problems = (nonfinite_weight_problems(weight_map, name, exact, state, constants)
                        or precision_problems(weight_map, name, exact, value, state))
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


def constants_note(weight_map: WeightMap, source: Any, *, model: Any = None) -> list[str]:
    """What a refit from ``source`` (None: a bare state_dict or checkpoint) cannot take from it:
    the tensor constants outside any state_dict keep their compile-time values. ``model``: a module
    the new weights are for (the reference verification compares with); then only the constants it
    holds other values of are news. Each note is also issued as a warning; an empty list when
    there is nothing to say."""
    if source is not None:
        return []
    _, notes = weight_map.constants_for(None, model=model)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    return notes


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
    weights = prepare_weights(engine, new_weights)
    return engine.kind.fallback_mapping(engine, weights.state, weights.checked, weights.source, model=model,
                                        trust_factory=trust_factory)



def compiler_mapping(engine, path: str, new_weights: Any, *, model: Any = None, trust_factory: bool = False
                     ) -> dict[str, np.ndarray]:
    """What the refit of an engine of a :class:`~refitcore.engine.kinds.CompilerRefit` kind (Torch-TensorRT's)
    through ``path`` ('cached' or 'fallback') sets: that compiler's own refit code; an error when the
    path cannot run. :func:`fallback_mapping` of the same engine is the witness it is checked against."""
    weights = prepare_weights(engine, new_weights)
    if not isinstance(engine.kind, CompilerRefit):
        raise TypeError(f"engines of kind {engine.kind.name!r} are refitted by refitcore's own paths "
                        f"(cached_mapping, fallback_mapping), not by a compiler's")
    return engine.kind.refit_mapping(engine, path, weights.state, weights.checked, weights.source, model=model,
                                     trust_factory=trust_factory)
