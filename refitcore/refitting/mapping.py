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

from refitcore import dtypes
from refitcore.conversion.recipes import apply_recipe, evaluate_operand
from refitcore.conversion.weight_map import WeightMap, operand_constants, operand_keys
from refitcore.engine.kinds import CompilerRefit
from refitcore.errors import WeightMappingError
from refitcore.progress import Silent, Ticker
from refitcore.refitting.prepare import ENGINE_DTYPE, Widened, prepare_weights
from refitcore.refitting.validate import FLUSH_ULPS, nonfinite_weight_problems, precision_problems

__all__ = ["cached_mapping", "fallback_mapping", "compiler_mapping", "constants_note"]

# ATen ops that move values without computing new ones: a copy recipe whose operands are made of
# these alone gives the same bits evaluated in the keys' own dtype as widened then rounded back.
_LAYOUT_OPS = frozenset(f"aten.{op}" for op in (
    "view.default", "reshape.default", "_unsafe_view.default", "alias.default", "clone.default",
    "contiguous.default", "permute.default", "t.default", "transpose.int", "unsqueeze.default",
    "squeeze.default", "squeeze.dim", "squeeze.dims", "flatten.using_ints", "unflatten.int",
    "expand.default", "slice.Tensor", "select.int", "narrow.default", "split.Tensor",
    "split_with_sizes.default", "chunk.default", "unbind.int", "cat.default", "stack.default"))


def _moves_values_only(operand: Any) -> bool:
    """Whether an operand tree reads keys and constants through layout ops only (:data:`_LAYOUT_OPS`)."""
    if isinstance(operand, list):
        return all(_moves_values_only(v) for v in operand)
    if not isinstance(operand, dict) or "op" not in operand:
        return True
    return (operand["op"] in _LAYOUT_OPS and _moves_values_only(operand.get("args", []))
            and _moves_values_only(list(operand.get("kwargs", {}).values())))


def _in_own_dtype(src, checked: Any, want: torch.dtype) -> bool:
    """Whether engine weight ``src`` is its keys' values unchanged, in the engine dtype ``want``:
    a copy recipe through layout ops of keys stored in ``want`` (a bfloat16 checkpoint refitted into a
    bfloat16 engine). Then the keys are read as they are (no widening, no rounding: the mapped bits)."""
    if src.recipe != "copy" or want == ENGINE_DTYPE or not want.is_floating_point:
        return False
    keys = [k for v in src.inputs.values() for k in operand_keys(v)]
    return (bool(keys) and all(checked[k].dtype == want for k in keys)
            and all(_moves_values_only(v) for v in src.inputs.values()))


def _whole_key(src) -> str | None:
    """The key an engine weight's recipe reads as it is (one operand, ``{"key": k}``), else None."""
    if src.recipe != "copy" or len(src.inputs) != 1:
        return None
    (operand,) = src.inputs.values()
    return operand["key"] if isinstance(operand, dict) and set(operand) == {"key"} else None


def _flush_problems(weight_map: WeightMap, name: str, value: torch.Tensor, state: Any,
                    known: tuple[float, float] | None = None) -> list[str]:
    """:func:`precision_problems` of a weight already in its engine dtype: it cannot overflow it; its
    values may be subnormal, which matters only when its largest value is tiny (FLUSH_ULPS): only then
    is it widened (one weight) for the check. ``known``: its smallest and largest value, when the key
    it is had them measured (:attr:`CheckedWeights.ranges`), else one pass over it finds them."""
    if not value.numel():
        return []
    info = torch.finfo(value.dtype)
    lo, hi = known if known is not None else (float(v) for v in torch.aminmax(value))
    if FLUSH_ULPS * info.eps * max(hi, -lo) >= info.tiny:
        return []
    return precision_problems(weight_map, name, value.to(ENGINE_DTYPE), value, state)


def cached_mapping(weight_map: WeightMap, weights: Any, *, constants_from: Any = None,
                   progress: Any = None) -> dict[str, np.ndarray]:
    """``{engine weight name: array in its engine dtype}`` from new weights through the map's recipes
    (computed in float32 or wider, rounded once: :func:`refitcore.dtypes.round_to`; bfloat16 weights
    as their ``uint16`` bit patterns). A copy of keys already stored in the engine dtype (a
    bfloat16 checkpoint into a bfloat16 engine) is the keys' memory itself, as for float32.

    ``weights``: :class:`~refitcore.refitting.prepare.CheckedWeights`, or anything
    :func:`~refitcore.refitting.prepare.prepare_weights` takes (prepared here, once). Tensor
    constants that a state_dict does not hold (tensor attributes, non-persistent buffers) are read
    from the model when the weights came from an nn.Module or ExportedProgram, or from
    ``constants_from``; a bare state_dict keeps their compile-time values (:func:`constants_note`
    says so). Raises :class:`MapCannotServeError` when the model's constants do not fit the map.
    ``progress``: told how many engine weights are mapped when it takes long (:class:`Ticker`).

    Example::

        mapping = refitcore.cached_mapping(engine.weight_map, new_model)
    """
    weights = prepare_weights(weight_map, weights)
    constants, _ = weight_map.constants_for(weights.source if weights.source is not None else constants_from)
    state = Widened(weights.checked)   # float16/bfloat16 keys widened one at a time, as read
    memo: dict = {}
    own_memo: dict = {}   # operands evaluated on the keys as stored (never mixed with the widened ones)
    out: dict[str, np.ndarray] = {}
    # Copy recipes hand the state_dict's memory through without copying (the refitter copies at
    # set time, as TensorRT does). Such arrays, and any that alias the map's constants or another
    # entry, are returned read-only: editing a mapping can never write into the caller's
    # state_dict, the map, or another engine weight; `.copy()` gives an editable array. Weights
    # the refit owns (read from a file for it: ``weights.owned``) are the exception: an array that
    # is the first to alias one is writeable, so the engine keeps it instead of a copy
    # (``apply_mapping(hand_over=True)``): one copy of the weights, the mapped file's.
    taken = set() if weights.owned else {t.untyped_storage().data_ptr() for t in weights.checked.values()}
    taken.update(a.ctypes.data for a in constants.values())
    tick = Ticker(progress or Silent(), "engine weights mapped", len(weight_map.sources))
    with torch.no_grad():
        for name, src in weight_map.sources.items():
            want = getattr(torch, src.dtype, ENGINE_DTYPE)   # the engine dtype (float32, float16, bfloat16, ...)
            own = _in_own_dtype(src, weights.checked, want)
            inputs = {k: evaluate_operand(v, weights.checked if own else state, constants, own_memo if own else memo)
                      for k, v in src.inputs.items()}
            exact = apply_recipe(src.recipe, inputs, src.params)
            del inputs
            value = exact if exact.dtype == want else dtypes.round_to(exact, want)
            # The keys are finite (prepare_weights checked them): a non-finite value derived from them
            # is a recipe overflow or a non-finite constant in their arithmetic, said as such; a finite
            # one the engine dtype cannot hold (overflow, flush, all bits lost) is refused too. A value
            # that reads no key (a literal such as masked_fill's -inf) is structure, never refused.
            # A weight that is its keys' values moved (``own``, no constant among them) is finite: the
            # keys are; only the flush check reads it.
            moved = own and not any(True for v in src.inputs.values() for _ in operand_constants(v))
            whole = _whole_key(src)
            known = weights.ranges.get(whole) if whole is not None and own else None
            problems = (([] if moved else nonfinite_weight_problems(weight_map, name, exact, state, constants))
                        or (_flush_problems(weight_map, name, value, state, known) if own
                            else precision_problems(weight_map, name, exact, value, state)))
            if problems:
                raise WeightMappingError(problems)
            if value.numel() != src.count:
                raise WeightMappingError([f"engine weight {name!r}: recipe {src.describe()} gave {value.numel()} "
                                          f"values, the engine needs {src.count}"])
            value = value.reshape(src.shape).contiguous()
            ptr = value.untyped_storage().data_ptr()
            arr = dtypes.to_numpy(value)
            if ptr in taken:
                arr = arr.view()
                arr.flags.writeable = False
            taken.add(ptr)
            out[name] = arr
            tick()
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
    instead of exporting again; an engine loaded from a file converts the graph the file records
    (:mod:`refitcore.engine.program_record`: no model, no export), and one without that record
    (dynamic shapes, an older file) is re-exported from ``model`` (nn.Module, factory callable or
    'module:callable') or, only with ``trust_factory=True``, from the factory the file records. A
    module or ExportedProgram whose
    graph differs from the compiled one raises :class:`ArchitectureMismatchError` naming the first
    difference."""
    weights = prepare_weights(engine, new_weights)
    # float16/bfloat16 keys are handed over as they are: the conversion widens each as it reads it
    # (refitcore.conversion.context.StaticValue), never the whole state_dict.
    return engine.kind.fallback_mapping(engine, weights.state, weights.checked, weights.source, model=model,
                                        trust_factory=trust_factory, owned=weights.owned)



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
