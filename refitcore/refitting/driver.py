"""The Refitter driver: validate, set every weight, check none missing, refit, roll back on failure.

Works on any backend that implements :mod:`refitcore.backends.base` (an ``EngineImpl`` whose
refitter has TensorRT's contract: ``get_all_weights``, ``get_weights_prototype``,
``set_named_weights`` returning bool, ``get_missing_weights``, ``refit`` returning bool) and uses
nothing else. TensorRT does not report a standalone weight that was never set (it keeps its stale
value), so the driver sets *all* refittable weights every time.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch

from refitcore import dtypes
from refitcore.backends.base import EngineImpl, Refitter
from refitcore.errors import RefitError, WeightMappingError
from refitcore.refitting.validate import all_finite

__all__ = ["apply_mapping", "validate_mapping", "Snapshot", "snapshot"]


def _as_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.dtype == torch.bfloat16:
            value = value.to(torch.float32)
        arr = value.contiguous().numpy()
        arr.flags.writeable = False     # may be the caller's (a model's) memory: never handed over
        return arr
    return np.asarray(value)


def validate_mapping(refitter: Refitter, mapping: Mapping[str, Any], *, constant_weights: Collection[str] = (),
                     checked_finite: bool | Collection[str] = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """Check every weight against the engine's prototypes before anything is touched.

    Returns (arrays cast to the engine dtype, problems). Problems: unknown names, engine weights
    without a value, wrong count, non-float or overflowing values, NaN/Inf in a weight derived from
    the state_dict. ``constant_weights`` (:attr:`~refitcore.conversion.weight_map.WeightMap.constant_weights`)
    name the weights that read no state_dict key: constants of the graph, which may hold NaN/Inf
    (a ``masked_fill`` with ``-inf``) as the model does. ``checked_finite``: the caller checked every
    value finite already (:func:`refitcore.cached_mapping` does, for every weight it returns), or the
    names of the weights it checked (:func:`refitcore.refitting.validate.finite_views`: views of keys
    found finite): that pass over them is not repeated; every other check is."""
    problems: list[str] = []
    names = list(refitter.get_all_weights())
    known = set(names)
    for name in mapping:
        if name not in known:
            problems.append(f"{name!r}: the engine has no refittable weight of that name")
    out: dict[str, np.ndarray] = {}
    checked = (lambda name: checked_finite) if isinstance(checked_finite, bool) else checked_finite.__contains__
    for name in names:
        if name not in mapping:
            problems.append(f"{name!r}: no value given (every refittable weight must be set, or TensorRT "
                            f"silently keeps the stale one)")
            continue
        proto = refitter.get_weights_prototype(name)
        want = dtypes.numpy_dtype(proto.dtype)
        arr = _as_array(name, mapping[name])
        if want is None:
            problems.append(f"{name!r}: engine dtype {proto.dtype} is not supported by the driver")
            continue
        if arr.size != proto.count:
            problems.append(f"{name!r}: {arr.size} values {list(arr.shape)} where the engine has {proto.count} "
                            f"{list(getattr(proto, 'shape', ()) or ())}")
            continue
        if np.issubdtype(want, np.floating):
            if not np.issubdtype(arr.dtype, np.floating):
                problems.append(f"{name!r}: dtype {arr.dtype} where the engine needs {proto.dtype}")
                continue
            if name not in constant_weights and not checked(name) and not all_finite(arr):
                problems.append(_nonfinite_problem(name, arr, "weight"))
                continue
            if arr.dtype != want:
                with np.errstate(over="ignore"):
                    cast = arr.astype(want)
                if not all_finite(cast) and not np.isfinite(cast[np.isfinite(arr)]).all():
                    problems.append(f"{name!r}: values up to {float(np.abs(arr).max()):.3g} overflow {proto.dtype}")
                    continue
                arr = cast
        elif arr.dtype != want:
            problems.append(f"{name!r}: dtype {arr.dtype} where the engine needs {proto.dtype}")
            continue
        elif (proto.dtype == "BF16" and name not in constant_weights and not checked(name)
              and not all_finite(dtypes.as_torch(arr))):
            problems.append(_nonfinite_problem(name, dtypes.as_float(arr), "bfloat16 weight"))
            continue
        out[name] = np.ascontiguousarray(arr)
    return out, problems


def _nonfinite_problem(name: str, values: np.ndarray, what: str) -> str:
    """How many of a weight's values are NaN/Inf, and the first (index, value); ``values`` as numbers."""
    finite_in = np.isfinite(values)
    at = int(np.argmin(finite_in.reshape(-1)))
    first = [int(i) for i in np.unravel_index(at, values.shape)] if values.ndim else []
    return (f"{name!r}: {int((~finite_in).sum())} non-finite value(s) (first at {first}: {values.reshape(-1)[at]}) "
            f"in a {what} derived from the state_dict (only constants of the graph may hold NaN/Inf)")


def _set_all(refitter: Refitter, arrays: Mapping[str, np.ndarray]) -> list[str]:
    problems = []
    for name, arr in arrays.items():
        if not refitter.set_named_weights(name, arr):
            problems.append(f"{name!r}: the refitter rejected the value")
    missing = list(refitter.get_missing_weights())
    if missing:
        problems.append(f"the refitter still misses {len(missing)} weight(s): {missing[:10]}")
    return problems


def _errors(refitter: Refitter) -> list[str]:
    return list(refitter.errors or ())


def _roll_back(impl: EngineImpl, previous: Mapping[str, np.ndarray]) -> list[str]:
    """Re-apply ``previous``; the problems met (empty: the engine answers as before)."""
    rollback = impl.create_refitter()
    try:
        problems = _set_all(rollback, previous)
        if not problems and not rollback.refit():
            problems = ["refit() returned False"]
    except Exception as err:  # noqa: BLE001 - report it: the caller must learn that the engine is in an unknown state
        problems = [f"{type(err).__name__}: {err}"]
    return problems + (_errors(rollback) if problems else [])


def apply_mapping(engine, mapping: Mapping[str, Any], *, in_place: bool = False, hand_over: bool = False,
                  checked_finite: bool | Collection[str] = False):
    """Refit ``engine`` with an explicit ``{engine weight name: array}`` mapping; return the engine
    refitted (a copy unless ``in_place``). ``hand_over=True``: the caller gives the mapping's
    writeable numpy arrays to the engine and never writes them again (a mapping it just computed),
    so the engine may keep them instead of copying; read-only arrays (views of a model's memory, as
    :func:`refitcore.cached_mapping` marks them) and torch tensors are copied all the same.
    ``checked_finite=True``: every value was checked finite by the caller, as :func:`refitcore.cached_mapping`
    checks what it returns, or the names of those checked (see :func:`validate_mapping`).

    Nothing is touched unless every weight validates. Once the first weight is handed to the
    refitter, any failure (a refitter that rejects a value or returns False, or one that raises, e.g.
    a CUDA error in TensorRT after applying a subset) re-applies the previous weights and raises
    :class:`RefitError` saying so, so on any error the engine answers exactly as before. Errors list
    every problem found."""
    target = engine if in_place else engine.clone()
    impl: EngineImpl = target.impl
    refitter = impl.create_refitter(adopt=hand_over)
    arrays, problems = validate_mapping(refitter, mapping, constant_weights=target.weight_map.constant_weights,
                                        checked_finite=checked_finite)
    if problems:
        raise WeightMappingError(problems, header="refit refused before touching the engine")
    previous = impl.rollback_weights()
    cause: BaseException | None = None
    try:
        problems = _set_all(refitter, arrays)
        if not problems and refitter.refit():
            target.weightless = False     # every weight was set: a weightless engine now has them all
            return target
        problems = (problems or ["refit() returned False"]) + _errors(refitter)
    except BaseException as err:  # noqa: BLE001 - roll back on every error path, interrupts included (re-raised)
        cause = err
        problems = [f"the refitter raised {type(err).__name__}: {err}"] + _errors(refitter)
    # Roll back: the backend may have applied part of the new weights before failing.
    rb_problems = _roll_back(impl, previous)
    rolled_back = not rb_problems
    problems += [f"rollback: {p}" for p in rb_problems]
    if cause is not None and not isinstance(cause, Exception):
        raise cause   # KeyboardInterrupt and friends propagate as they are, after the rollback
    raise RefitError(problems, rolled_back=rolled_back) from cause


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What an engine answers with before a refit that may change it, to restore it bit for bit:
    the backend's rollback arrays (:meth:`~refitcore.backends.base.EngineImpl.rollback_weights`:
    the stored arrays themselves where a refit never writes one in place, so taking a snapshot
    copies nothing on the reference backend) and whether the engine was weightless."""

    engine: Any
    weights: dict[str, np.ndarray]
    weightless: bool

    def restore(self) -> None:
        """Set every weight back (a weightless engine gets its placeholders and is weightless
        again); :class:`RefitError` (``rolled_back=False``) when the backend refuses."""
        problems = _roll_back(self.engine.impl, self.weights)
        if problems:
            raise RefitError([f"rollback: {p}" for p in problems], rolled_back=False)
        self.engine.weightless = self.weightless


def snapshot(engine) -> Snapshot:
    """A :class:`Snapshot` of ``engine`` (a weightless one included: its placeholders)."""
    return Snapshot(engine, engine.impl.rollback_weights(), engine.weightless)
