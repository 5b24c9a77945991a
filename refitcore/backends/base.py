"""The backend interface: what :mod:`refitcore.engine` and :mod:`refitcore.refitting.driver` may ask of a
backend, as ``typing.Protocol`` s. Both backends (``reference``, ``tensorrt``) implement them;
``tests/backends/test_protocols.py`` checks that they do.

- :class:`Backend`: the backend module (``NAME``, ``NOTE``, ``usable``, ``build``, ``load_engine``).
- :class:`EngineImpl`: one built engine (run, weights, refitter, serialize).
- :class:`Refitter`: TensorRT's ``Refitter`` contract, which the driver relies on: names and
  prototypes, ``set_named_weights`` returning bool, ``get_missing_weights``, ``refit`` returning
  bool (False: "a subset of weights may have been refitted"), ``errors`` saying why.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from refitcore import dtypes

__all__ = ["WeightsPrototype", "Refitter", "EngineImpl", "Backend", "read_only_views", "staged", "HostWeights"]


@dataclasses.dataclass(frozen=True)
class WeightsPrototype:
    """What ``Refitter.get_weights_prototype`` tells: the dtype and element count a weight must have
    (and, beyond TensorRT's API, its shape)."""

    name: str
    dtype: str      # TensorRT DataType name, e.g. "FLOAT"
    count: int
    shape: tuple[int, ...]


def staged(value: np.ndarray, adopt: bool) -> np.ndarray:
    """The array a refitter keeps for ``value``: ``value`` itself when the caller handed its arrays
    over (``adopt``) and it is writeable (a fresh result nobody else holds), else a copy (read-only
    arrays are views of someone's memory, e.g. a model's parameters)."""
    return value if adopt and value.flags.writeable else np.array(value, copy=True)


def read_only_views(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Views of a weight store that cannot be written through (callers must not edit an engine)."""
    out = {}
    for k, v in weights.items():
        v = v.view()
        v.flags.writeable = False
        out[k] = v
    return out


class HostWeights:
    """The weight queries of an engine that keeps its current weights as host arrays in
    ``self._weights`` (both backends do: the reference store, TensorRT's host mirror)."""

    _weights: dict[str, np.ndarray]

    def prototype(self, name: str) -> WeightsPrototype:
        arr = self._weights[name]
        return WeightsPrototype(name, dtypes.trt_name(arr.dtype, str(arr.dtype)), int(arr.size), tuple(arr.shape))

    def current_weights(self) -> dict[str, np.ndarray]:
        """The weights the engine answers with now (read-only views)."""
        return read_only_views(self._weights)


@runtime_checkable
class Refitter(Protocol):
    """TensorRT's Refitter contract, as the driver uses it."""

    @property
    def errors(self) -> list[str]:
        """Why the last calls failed (an attribute or a property: the driver only reads it)."""
        ...

    def get_all_weights(self) -> list[str]: ...

    def get_weights_prototype(self, name: str) -> WeightsPrototype:
        """The prototype of a refittable weight; ``KeyError`` for an unknown name."""
        ...

    def set_named_weights(self, name: str, value: Any) -> bool:
        """Stage ``value`` (copied) for ``name``; False (reason in ``errors``) when it does not fit."""
        ...

    def get_missing_weights(self) -> list[str]: ...

    def refit(self) -> bool:
        """Apply everything staged; False (reason in ``errors``) on failure, which may leave a subset
        applied. May also raise (e.g. a CUDA error): the driver rolls back on both."""
        ...


@runtime_checkable
class EngineImpl(Protocol):
    """One built engine of a backend: what :class:`refitcore.engine.refittable.RefittableEngine` wraps."""

    backend_name: str
    note: str

    def weight_names(self) -> list[str]: ...

    def prototype(self, name: str) -> WeightsPrototype: ...

    def current_weights(self) -> dict[str, np.ndarray]:
        """The weights the engine answers with now (read-only views)."""
        ...

    def rollback_weights(self) -> dict[str, np.ndarray]:
        """Arrays to restore the current weights from after a failed refit: they must stay valid
        whatever a refit does (copies, or the current arrays themselves where the backend never
        writes a stored array in place)."""
        ...

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    def create_refitter(self, *, adopt: bool = False) -> Refitter:
        """A refitter. ``adopt=True``: the caller hands over the *writeable* arrays it will set (it
        never writes them afterwards), so the refitter may keep them instead of copying; read-only
        arrays (views of a model's memory) are always copied."""
        ...

    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able header, {weight name: array}); bytes go under ``header["blobs"]``. With
        ``weights=False`` a *weightless* engine: no refittable weight's value is kept (neither in
        the arrays nor inside a backend plan); whoever deserializes it must refit every weight
        before running it (TensorRT's weight-stripped plans, ``SerializationFlag.EXCLUDE_WEIGHTS``).
        Arrays that are not refittable weights (constants of a partitioned program) stay."""
        ...

    @classmethod
    def deserialize(cls, header: dict, arrays: dict[str, np.ndarray]) -> EngineImpl: ...


@runtime_checkable
class Backend(Protocol):
    """A backend module (``refitcore.backends.reference``, ``refitcore.backends.tensorrt``)."""

    NAME: str
    NOTE: str

    def usable(self) -> tuple[bool, str]: ...

    def build(self, result: Any, **options: Any) -> EngineImpl: ...

    def load_engine(self, header: dict, weights: dict[str, np.ndarray]) -> EngineImpl: ...
