"""RefittableEngine: an engine plus everything needed to refit and check it."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from .weight_map import WeightMap

__all__ = ["RefittableEngine", "IOSpec"]


@dataclasses.dataclass(frozen=True)
class IOSpec:
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict:
        return {k: [list(v) if isinstance(v, tuple) else v for v in getattr(self, k)]
                for k in ("input_names", "input_shapes", "input_dtypes", "output_names", "output_shapes")}

    @classmethod
    def from_json(cls, d: dict) -> "IOSpec":
        return cls(tuple(d["input_names"]), tuple(tuple(s) for s in d["input_shapes"]), tuple(d["input_dtypes"]),
                   tuple(d["output_names"]), tuple(tuple(s) for s in d["output_shapes"]))


class RefittableEngine:
    """A compiled model that can be refitted: callable like the model.

    Attributes: ``backend`` ('reference' or 'tensorrt'), ``weight_map``, ``weight_names`` (the
    engine's refittable weights), ``io``, ``fingerprint`` (of the exported graph),
    ``exported_program`` (None after :func:`refitcore.load`), ``backend_reason``.
    """

    def __init__(self, impl: Any, weight_map: WeightMap, io: IOSpec, fingerprint: str, *,
                 exported_program=None, fusion=None, backend_reason: str = "", graph_entries=None,
                 model_factory: str | None = None, state_keys: Sequence[str] = ()):
        self._impl = impl
        self.weight_map = weight_map
        self.io = io
        self.fingerprint = fingerprint
        self.exported_program = exported_program
        self.fusion = fusion
        self.backend_reason = backend_reason
        self.graph_entries = graph_entries
        self.model_factory = model_factory
        self.state_keys = list(state_keys)   # the model's full state_dict key list at compile time

    @property
    def backend(self) -> str:
        return self._impl.backend_name

    @property
    def note(self) -> str:
        return getattr(self._impl, "note", "")

    @property
    def weight_names(self) -> list[str]:
        return self._impl.weight_names()

    def current_weights(self) -> dict[str, np.ndarray]:
        return self._impl.current_weights()

    def __call__(self, *inputs: torch.Tensor):
        outs = self._impl.run(list(inputs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._impl.run(list(inputs))

    def save(self, path) -> None:
        from .bundle import save

        save(self, path)

    def clone(self) -> "RefittableEngine":
        """An independent copy (same plan, its own weight store)."""
        header, arrays = self._impl.serialize()
        impl = type(self._impl).deserialize(header, {k: np.array(v, copy=True) for k, v in arrays.items()})
        return RefittableEngine(impl, self.weight_map, self.io, self.fingerprint,
                                exported_program=self.exported_program, fusion=self.fusion,
                                backend_reason=self.backend_reason, graph_entries=self.graph_entries,
                                model_factory=self.model_factory, state_keys=self.state_keys)

    def __repr__(self) -> str:
        return (f"RefittableEngine(backend={self.backend!r}, weights={len(self.weight_names)}, "
                f"inputs={[list(s) for s in self.io.input_shapes]})")
