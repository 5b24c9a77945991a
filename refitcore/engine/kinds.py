"""Engine kinds: what differs between a whole TensorRT network, a partitioned (segmented) engine
and compiled submodules inside an eager model, behind one small protocol.

A :class:`refitcore.engine.refittable.RefittableEngine` holds its kind (an :class:`EngineKind`) and
its backend engine (``impl``, a :class:`refitcore.backends.base.EngineImpl`: weights, refitter,
run) and never asks which kind it is: building, the fallback refit path, saving, loading, running
and the coverage summary each call the kind.

Adding a kind (an engine built by another compiler, say) is one new module plus one line in
:mod:`refitcore.engine.registry`:

1. Write ``refitcore/engine/<kind>.py`` with an object that has the members of :class:`EngineKind`:
   a unique ``name`` (the value of ``"kind"`` in the impl header of a saved engine), ``build``
   (from what its compiler hands it: a :class:`BuildInput`, the :class:`CompileOptions`) returning
   a :class:`Built`, ``fallback_mapping`` (the new weights converted again, read back as
   ``{engine weight name: array}``; an independent witness of the weight map), ``serialize`` and
   ``deserialize`` (impl <-> the bundle's impl header and arrays; raise
   :class:`refitcore.errors.BundleError` in ``serialize`` when the kind cannot be saved as data),
   ``run`` and ``coverage``. Its impl implements :class:`refitcore.backends.base.EngineImpl`, so
   that the refit driver, the cached map, the audit and the culprit search need no change.
2. Add ``<module>.KIND`` to :data:`refitcore.engine.registry.KINDS`.
3. The compiler that makes such engines calls ``KIND.build`` and wraps the result in a
   ``RefittableEngine`` (see :mod:`refitcore.compiler.native`).

A kind whose own compiler has refit paths (Torch-TensorRT's, :mod:`refitcore.engine.torch_tensorrt`)
also implements :class:`CompilerRefit`: the refit pipeline (:func:`refitcore.refitting.pipeline.run_refit`)
then maps the 'cached' and 'fallback' paths through that compiler's code, and checks what they set
against the kind's ``fallback_mapping``, the independent witness, exactly.

Kind modules import this module, never :mod:`refitcore.engine.refittable` (which imports them
through the registry): they receive engines as arguments.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore import dtypes
from refitcore.backends.base import EngineImpl
from refitcore.capture.shapes import ShapeProfiles
from refitcore.capture.structured import describe_leaf, spec_to_json
from refitcore.conversion.weight_map import WeightMap
from refitcore.engine.coverage import Coverage
from refitcore.engine.options import CompileOptions
from refitcore.engine.records import IOSpec
from refitcore.partition.partitioner import PartitionPlan

__all__ = ["EngineKind", "CompilerRefit", "BuildInput", "Built", "state_array", "structure_of", "check_map_covers"]


@dataclasses.dataclass(frozen=True)
class BuildInput:
    """What a compiler hands a kind's ``build``: the model and its example call, and per kind
    ``exported`` (the ExportedProgram a whole or segmented engine converts), ``profiles`` (the
    resolved shape ranges of a dynamic whole network), or ``parts`` ({module path: compiled engine}),
    ``eager`` ([(module path, why it runs eagerly)]) and ``eager_output`` (one eager run's output)
    of compiled submodules in an eager model."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict
    exported: Any = None
    profiles: ShapeProfiles | None = None
    parts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eager: Sequence[tuple[str, str]] = ()
    eager_output: Any = None


@dataclasses.dataclass
class Built:
    """A kind's build: the backend engine, its weight map (the compiler adds the model's tied groups
    and key specs), the IO spec and structure, the graph's fingerprint, and what the kind decided
    (``partition``, ``eager_modules``)."""

    impl: EngineImpl
    weight_map: WeightMap
    io: IOSpec
    structure: dict
    out_treespec: Any
    fingerprint: str
    graph_entries: list | None = None
    partition: PartitionPlan | None = None
    eager_modules: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class EngineKind(Protocol):
    """One kind of engine (see the module docstring for how to add one)."""

    name: str

    def build(self, source: BuildInput, options: CompileOptions) -> Built:
        """Build the engine from what the compiler hands over."""

    def fallback_mapping(self, engine: Any, state: Mapping[str, torch.Tensor], checked: Mapping[str, torch.Tensor],
                         source: Any, *, model: Any = None, trust_factory: bool = False,
                         owned: bool = False) -> dict[str, np.ndarray]:
        """``{engine weight name: array}`` of new weights converted again and read back. ``state``: the
        new state_dict as given; ``checked``: its keys the map reads, validated and cast
        (:func:`refitcore.refitting.prepare.check_state_dict`); ``source``: the new weights' module
        or ExportedProgram, if any; ``model``/``trust_factory``: how to rebuild a loaded engine's model;
        ``owned``: the weights are the refit's own (:attr:`refitcore.refitting.prepare.CheckedWeights.owned`):
        the model rebuilt to export holds them as they are, and arrays read back may be views of them
        (the engine may keep those: one copy of the weights, docs/memory.md)."""

    def serialize(self, impl: EngineImpl, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(impl header, arrays) of a saved engine; bytes go under the header's ``"blobs"``."""

    def deserialize(self, header: dict, arrays: Mapping[str, np.ndarray], *, backend: str) -> EngineImpl:
        """The impl of :meth:`serialize`'s parts (``backend``: the saved engine's backend name)."""

    def run(self, impl: EngineImpl, inputs: list[Any]) -> list[Any]:
        """The engine's flat outputs for its flat inputs."""

    def coverage(self, engine: Any) -> Coverage:
        """What runs in TensorRT and what in PyTorch (``engine.summary()``)."""


@runtime_checkable
class CompilerRefit(Protocol):
    """A kind refitted by its own compiler's refit code (see the module docstring)."""

    compiler: str   # the compiler's name, as reports say it

    def auto_path(self, engine: Any) -> str:
        """The path the compiler refits through by default ('cached' or 'fallback')."""

    def refit_mapping(self, engine: Any, path: str, state: Mapping[str, torch.Tensor],
                      checked: Mapping[str, torch.Tensor], source: Any, *, model: Any = None,
                      trust_factory: bool = False) -> dict[str, np.ndarray]:
        """``{engine weight name: array}``: what the compiler's refit through ``path`` sets
        (arguments as for :meth:`EngineKind.fallback_mapping`); raises a
        :class:`refitcore.errors.RefitCoreError` when the path cannot run."""

    def clone_impl(self, impl: EngineImpl) -> EngineImpl:
        """An independent copy of ``impl`` (its own weights): an impl that is not data (code of the
        compiler's, such as PyTorch submodules) is copied here, not through ``serialize``."""


def state_array(t: torch.Tensor) -> np.ndarray:
    """A state_dict tensor as an array the engine owns (a copy: the model can change afterwards;
    bfloat16 as its bit patterns, :func:`refitcore.dtypes.to_numpy`)."""
    return np.ascontiguousarray(dtypes.to_numpy(t.detach().to("cpu"))).copy()


def structure_of(args: tuple, kwargs: dict, out_spec: Any) -> dict:
    """The engine's structure (:class:`refitcore.engine.records.CallSpec` ``structure``) for a call
    ``(args, kwargs)`` whose outputs have the TreeSpec ``out_spec``."""
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    return {"in": spec_to_json(in_spec), "in_leaves": [describe_leaf(v) for v in leaves],
            "out": spec_to_json(out_spec)}


def check_map_covers(weight_map: WeightMap, engine_names: Sequence[str]) -> None:
    """The map covers exactly the network's refittable weights: no gaps, no extras."""
    names = set(engine_names)
    gaps = sorted(names - set(weight_map.sources))
    extra = sorted(set(weight_map.sources) - names)
    if gaps or extra:
        raise RuntimeError(f"internal error: weight map does not match the network's weights; "
                           f"unmapped engine weights {gaps[:10]}, map entries without engine weight {extra[:10]}")
