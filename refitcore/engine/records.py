"""The values a :class:`refitcore.engine.refittable.RefittableEngine` is made of besides its kind
and backend engine: the IO spec, how it is called (pytree structure), and the record of what it was
built from (fingerprint, compile options, state_dict keys, partition, cache outcome)."""
from __future__ import annotations

import dataclasses
from typing import Any

from refitcore.capture.shapes import ShapeProfiles
from refitcore.engine.options import CompileOptions
from refitcore.partition.partitioner import PartitionPlan

__all__ = ["IOSpec", "CallSpec", "EngineRecord"]


@dataclasses.dataclass(frozen=True)
class IOSpec:
    """Inputs and outputs of a compiled model. ``input_shapes`` are the example's shapes (``opt`` of a
    dynamic dimension); ``output_shapes`` have -1 where a size varies; ``profiles`` (a
    :class:`refitcore.capture.shapes.ShapeProfiles`, None for static shapes) holds each input's
    (min, opt, max) ranges and the optimization profiles. A file without ``profiles`` reads as static."""

    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    profiles: ShapeProfiles | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {k: [list(v) if isinstance(v, tuple) else v for v in getattr(self, k)]
               for k in ("input_names", "input_shapes", "input_dtypes", "output_names", "output_shapes")}
        if self.profiles is not None:
            out["profiles"] = self.profiles.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> IOSpec:
        profiles = ShapeProfiles.from_json(d["profiles"]) if d.get("profiles") else None
        return cls(tuple(d["input_names"]), tuple(tuple(s) for s in d["input_shapes"]), tuple(d["input_dtypes"]),
                   tuple(d["output_names"]), tuple(tuple(s) for s in d["output_shapes"]), profiles)


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """How the engine is called like the model (:mod:`refitcore.capture.structured`).

    ``structure``: ``{"in": spec, "in_leaves": [leaf], "out": spec}`` as JSON data, None for an engine
    of flat tensors (saved before structured I/O existed); ``out_treespec``: the live output TreeSpec
    (eager's own output types; compile time only); ``output_types``/``trust_output_types``: how a
    loaded engine rebuilds output types its file only names."""

    structure: dict | None = None
    out_treespec: Any = None
    output_types: Any = None
    trust_output_types: bool = False


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    """What an engine was built from and how it came to be (saved as data but for the cache outcome).

    ``fingerprint`` and ``graph_entries``: the exported graph's digest and the entries it hashes
    (:func:`refitcore.capture.lowering.graph_fingerprint`); ``options``: the compile options;
    ``state_keys``: the model's full state_dict key list at compile time; ``partition``: the plan of
    a partitioned engine; ``eager_modules``: [(module path, why it runs eagerly)] of a hybrid one;
    ``cache_hit`` (True, False, or None without a cache) and ``cache_key``: what the engine cache did;
    ``program`` and ``program_constants``: the compiled graph as data, read from a saved engine
    (:mod:`refitcore.engine.program_record`; None for an engine compiled in this process, which holds
    its ExportedProgram, and for a file without one); ``program_note``: why a file holds no record."""

    fingerprint: str
    options: CompileOptions = dataclasses.field(default_factory=CompileOptions)
    graph_entries: list | None = None
    state_keys: list[str] = dataclasses.field(default_factory=list)
    backend_reason: str = ""
    partition: PartitionPlan | None = None
    eager_modules: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    cache_hit: bool | None = None
    cache_key: str | None = None
    program: dict | None = None
    program_constants: dict[str, Any] = dataclasses.field(default_factory=dict)
    program_note: str | None = None
