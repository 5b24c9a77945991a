"""New weights prepared once per refit: loaded, unwrapped, keys fitted to the compiled model, and
validated against its weight map before anything is mapped or touched.

:func:`prepare_weights` returns a :class:`CheckedWeights`; the cached and the fallback mappings,
the eager reference model and the culprit finder all read that one value, so a refit loads and
checks its weights once (:mod:`refitcore.refitting.pipeline`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from refitcore.conversion.weight_map import WeightMap
from refitcore.errors import ArchitectureMismatchError, WeightMappingError
from refitcore.refitting.checkpoints import LoadedCheckpoint, explain_missing, load_weights
from refitcore.refitting.validate import nonfinite_key_problems, variance_problems

__all__ = ["CheckedWeights", "prepare_weights", "load_for", "check_state_dict", "Widened", "ENGINE_DTYPE"]

ENGINE_DTYPE = torch.float32


@dataclasses.dataclass(frozen=True)
class CheckedWeights:
    """New weights, validated against one weight map.

    ``checked``: ``{key: tensor}`` for every key the map reads, the tensors of ``state`` (float64
    ones cast to the engine dtype, checked for overflow; float16/bfloat16 ones kept in their dtype:
    widening them is exact, and :class:`Widened` does it per tensor when a recipe reads one, so no
    float32 copy of the whole state_dict is made); ``state``: the weights as loaded (the eager
    model and the fallback's conversion read them); ``source``: the ``nn.Module`` or
    ``ExportedProgram`` they came from (None for a state_dict or a file); ``notes``: what was
    unwrapped, stripped or ignored; ``owned``: nobody but the refit holds these tensors (they were
    read from a file for it): the engine and the eager model may keep them instead of copies;
    ``ranges``: the smallest and largest value of each float16/bfloat16 key the map reads (found by
    the finiteness check; the flush check of an engine weight that is one such key as stored reads
    them instead of the weight again)."""

    weight_map: WeightMap
    checked: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    source: Any = None
    notes: tuple[str, ...] = ()
    owned: bool = False
    ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    @property
    def origin(self) -> Any:
        """The richest form of the weights: the source model when there is one, else the state_dict."""
        return self.source if self.source is not None else self.state


class Widened(Mapping[str, torch.Tensor]):
    """A read-only view of a state_dict whose floating-point tensors read as the engine dtype: a
    float16/bfloat16 tensor is widened (exactly) each time it is read, so a pass over the weights
    holds one widened tensor at a time, never a float32 copy of the whole state_dict."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.state[key]
        return t.to(ENGINE_DTYPE) if t.is_floating_point() and t.dtype != ENGINE_DTYPE else t

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _weight_map(target) -> WeightMap:
    return target if isinstance(target, WeightMap) else target.weight_map


def load_for(target, new_weights: Any) -> LoadedCheckpoint:
    """New weights in any accepted form (``nn.Module``, ``ExportedProgram``, state_dict, a dict
    holding one, a checkpoint path) loaded and fitted to ``target`` (an engine or a
    :class:`WeightMap`), not yet validated; a :class:`LoadedCheckpoint` is returned as it is.
    Raises ``TypeError`` or :class:`WeightMappingError` only for weights that cannot be read."""
    if isinstance(new_weights, LoadedCheckpoint):
        return new_weights
    keys = () if isinstance(target, WeightMap) else target.state_keys
    return load_weights(new_weights, weight_map=_weight_map(target), state_keys=keys)


def prepare_weights(target, new_weights: Any, *, every_key_finite: bool = False,
                    owned: bool = False) -> CheckedWeights:
    """``new_weights`` loaded (:func:`load_for`) and validated against ``target``'s weight map.

    ``owned``: the caller hands the tensors over (it read them from a file for this refit, never
    writes them, and the file is not rewritten while the engine lives): see
    :attr:`CheckedWeights.owned` and docs/memory.md.

    Raises what :func:`check_state_dict` raises, then :class:`WeightMappingError` naming every key
    the engine reads that holds NaN/Inf (``every_key_finite``: every floating-point key, read or
    not: a checkpoint with a damaged tensor anywhere is refused whole). Weights already checked
    against this map are returned as they are (against another map: prepared again from them).

    Example::

        weights = prepare_weights(engine, "finetuned.pt")
        mapping = cached_mapping(engine.weight_map, weights)
    """
    weight_map = _weight_map(target)
    if isinstance(new_weights, CheckedWeights):
        if new_weights.weight_map is weight_map:
            return new_weights
        new_weights = new_weights.origin
    loaded = load_for(target, new_weights)
    checked = check_state_dict(weight_map, loaded.state_dict)
    ranges: dict[str, tuple[float, float]] = {}
    problems = nonfinite_key_problems(weight_map, loaded.state_dict if every_key_finite else checked,
                                      every_key=every_key_finite, ranges=ranges)
    if problems:
        raise WeightMappingError(problems, header="refusing weights with NaN/Inf values")
    ranges = {k: r for k, r in ranges.items() if k in checked and checked[k] is loaded.state_dict.get(k, checked[k])}
    return CheckedWeights(weight_map, checked, loaded.state_dict, loaded.source, tuple(loaded.notes), owned, ranges)


def check_state_dict(weight_map: WeightMap, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a state_dict against the map and return the keys it reads, float64 tensors cast to
    the engine dtype (float16/bfloat16 ones are kept: :class:`Widened` widens them when read).

    Raises :class:`ArchitectureMismatchError` for missing keys or wrong shapes (every one listed,
    with the engine weights that need it, and the likely cause when it is recognisable, e.g. a
    wrapper prefix) and :class:`WeightMappingError` for dtype problems, overflow on cast, tied
    parameters with different values, or a BatchNorm running variance <= -eps (the fold would be
    NaN). Keys the engine never reads are not checked: they may be missing or extra."""
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
        raise ArchitectureMismatchError(arch + other + explain_missing(weight_map, state))
    other += variance_problems(weight_map, state)
    if other:
        raise WeightMappingError(other)
    out: dict[str, torch.Tensor] = {}
    overflow = []
    for key in used:
        t = state[key]
        if t.is_floating_point() and t.dtype.itemsize > ENGINE_DTYPE.itemsize:   # may overflow: cast now
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
