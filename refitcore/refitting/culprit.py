"""The culprit finder: which engine weight is wrong, and why we think so.

Three witnesses of what an engine weight should hold: the cached mapping (the weight map's
recipes), the fallback mapping (conversion run again), and the weights the engine actually holds
after a failing path's refit. Pairs compared: cached map vs fallback map (a wrong recipe or map
entry), and engine-after-refit vs the mapping that was applied (a weight the driver did not set,
or set wrongly). The culprit is the first engine weight, in engine order, that any pair disagrees
on; its record names the weight map's recipe and every finding.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from refitcore.errors import RefitCoreError
from refitcore.options import AUDIT_ATOL, AUDIT_RTOL
from refitcore.refitting.audit import audit
from refitcore.refitting.mapping import cached_mapping, fallback_mapping

__all__ = ["Culprit", "find_culprit", "unavailable"]


@dataclasses.dataclass(frozen=True)
class Culprit:
    """The first engine weight where the witnesses disagree."""

    name: str
    position: int                        # in engine.weight_names
    total: int
    recipe: str                          # the weight map's recipe for it
    findings: tuple[str, ...]            # why: one line per pair of witnesses (and any unavailable one)

    def __str__(self) -> str:
        lines = [f"culprit: engine weight {self.name!r} (#{self.position + 1} of {self.total} in engine order)",
                 f"    weight map recipe: {self.recipe}"]
        lines += [f"    {f}" for f in self.findings]
        return "\n".join(lines)

    @property
    def why(self) -> str:
        """The first finding: the pair of witnesses that disagree and by how much."""
        return self.findings[0] if self.findings else ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"findings": list(self.findings)}


def unavailable(path: str, err: BaseException) -> str:
    """The finding that says a path's mapping could not be computed (a witness is missing)."""
    return f"the {path} mapping could not be computed: {str(err).splitlines()[0]}"


def find_culprit(engine, state: Any = None, *, mappings: Mapping[str, Mapping] | None = None,
                 held: Mapping[str, Mapping] | None = None, model: Any = None,
                 trust_factory: bool = False, errors: Sequence[str] = ()) -> Culprit | None:
    """The first engine weight (engine order) where the witnesses disagree; None when they agree.
    Every pair is compared exactly (:data:`refitcore.options.AUDIT_RTOL`): each witness holds
    the same float32 values when the map, the conversion and the driver are right.

    ``state``: the new weights (a state_dict or :class:`~refitcore.refitting.prepare.CheckedWeights`).
    ``mappings``: ``{'cached': ..., 'fallback': ...}`` already computed (either may be absent: it
    is computed from ``state`` then; ``model``/``trust_factory`` go to the fallback's re-export);
    any other key is one more witness (``'witness'``: the fresh conversion a compiler's refit is
    checked against).
    ``held``: ``{path: engine.current_weights() right after that path's refit}`` for failing paths.
    ``errors``: findings about witnesses the caller could not compute (:func:`unavailable`).

    Example::

        culprit = find_culprit(engine, new_state, held={"cached": refitted.current_weights()})
    """
    given = dict(mappings or {})
    witnesses: dict[str, Mapping] = {}
    errors = list(errors)
    for path in ("cached", "fallback"):
        if given.get(path) is not None:
            witnesses[f"{path} map"] = given[path]
            continue
        if state is None:
            continue
        try:
            witnesses[f"{path} map"] = (cached_mapping(engine.weight_map, state) if path == "cached" else
                                        fallback_mapping(engine, state, model=model, trust_factory=trust_factory))
        except RefitCoreError as err:
            errors.append(unavailable(path, err))
    for label, mapping in given.items():   # further witnesses (a compiler's refit is checked against one)
        if label not in ("cached", "fallback") and mapping is not None:
            witnesses[f"{label} map"] = mapping
    labels = list(witnesses)
    pairs = [(labels[0], labels[1])] if len(labels) == 2 else []
    for path, weights in (held or {}).items():
        if weights is not None and f"{path} map" in witnesses:
            label = f"engine after {path} refit"
            witnesses[label] = _shaped(weights, engine)
            pairs.append((label, f"{path} map"))
    bad: dict[str, list[str]] = {}
    agreeing: dict[str, list[str]] = {}
    for a, b in pairs:
        for d in audit(witnesses[a], witnesses[b], rtol=AUDIT_RTOL, atol=AUDIT_ATOL, a_label=a, b_label=b).diffs:
            if not d.ok:
                bad.setdefault(d.name, []).append(f"{a} vs {b}: {_diff_text(d, a, b)}")
            else:
                agreeing.setdefault(d.name, []).append(f"{a} and {b} agree")
    order = list(engine.weight_names)
    for pos, name in enumerate(order + sorted(set(bad) - set(order))):
        if name in bad:
            src = engine.weight_map.sources.get(name)
            recipe = src.describe() if src is not None else "(not in the weight map)"
            return Culprit(name, pos, len(order), recipe, tuple(bad[name] + agreeing.get(name, []) + errors))
    return None


def _shaped(held: Mapping[str, np.ndarray], engine) -> dict:
    """The engine's weights in the weight map's shapes (TensorRT hands kernels back flat)."""
    out = {}
    for name, arr in held.items():
        src = engine.weight_map.sources.get(name)
        out[name] = arr.reshape(src.shape) if src is not None and src.count == arr.size else arr
    return out


def _diff_text(d, a: str, b: str) -> str:
    if d.status == "value":
        return (f"max abs diff {d.max_abs:.4g} (rel {d.max_rel:.3g}) at {list(d.index)} "
                f"({a} {d.a_value:.6g} vs {b} {d.b_value:.6g})")
    return f"{d.status} ({d.detail})"
