"""The whole-network engine kind: the exported graph converted into one TensorRT network.

The fallback path converts the exported program again with the new weights (the same
conv+BatchNorm fusions, planned on the same graph, and the same shape ranges) and reads every
refittable weight back off the new network's layers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore.backends import get_backend
from refitcore.backends.base import EngineImpl
from refitcore.capture.lowering import graph_fingerprint
from refitcore.conversion.convert import convert
from refitcore.conversion.network_reader import network_weights
from refitcore.engine.coverage import Coverage, all_in_tensorrt
from refitcore.engine.kinds import BuildInput, Built, check_map_covers, structure_of
from refitcore.engine.options import CompileOptions
from refitcore.engine.program_record import RecordedProgram
from refitcore.engine.records import IOSpec
from refitcore.engine.reexport import conversion_params, exported_for

__all__ = ["WholeNetwork", "KIND", "NAME"]

NAME = "whole"


class WholeNetwork:
    """One TensorRT network for the whole graph (:class:`refitcore.engine.kinds.EngineKind`).
    Saved engines of this kind carry no ``"kind"`` in their impl header (the backend's own)."""

    name = NAME

    def build(self, source: BuildInput, options: CompileOptions) -> Built:
        """Convert ``source.exported`` (with ``source.profiles``) and
        build it on the backend; raises :class:`refitcore.errors.UnsupportedOperatorError` when a
        converter declines a call."""
        ep = source.exported
        result = convert(ep, profiles=source.profiles, precision=options.precision)
        impl = get_backend(options.backend).build(result, precision=options.precision,
                                                   copy_weights=not options.strip_engine_weights)
        check_map_covers(result.weight_map, impl.weight_names())
        tensors = [v for v in pytree.tree_leaves((source.args, source.kwargs)) if isinstance(v, torch.Tensor)]
        io = IOSpec(tuple(result.input_names), tuple(tuple(int(s) for s in t.shape) for t in tensors),
                    tuple(str(t.dtype).replace("torch.", "") for t in tensors),
                    tuple(result.output_names), tuple(result.output_shapes), source.profiles)
        digest, entries = graph_fingerprint(ep)
        out_spec = ep.call_spec.out_spec
        return Built(impl, result.weight_map, io, structure_of(source.args, source.kwargs, out_spec), out_spec,
                     digest, entries)

    def fallback_mapping(self, engine: Any, state: Mapping[str, torch.Tensor], checked: Mapping[str, torch.Tensor],
                         source: Any, *, model: Any = None, trust_factory: bool = False,
                         owned: bool = False) -> dict[str, np.ndarray]:
        ep = exported_for(engine, source, state, model=model, trust_factory=trust_factory, owned=owned,
                          recorded=True)
        result = convert(ep, conversion_params(engine.weight_map, state, checked), profiles=engine.io.profiles,
                         precision=engine.options.precision, bounded=isinstance(ep, RecordedProgram))
        return network_weights(result.network, {n: s.shape for n, s in engine.weight_map.sources.items()},
                               host=result.weights, copy=not owned)

    def serialize(self, impl: EngineImpl, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        return impl.serialize(weights=weights)

    def deserialize(self, header: dict, arrays: Mapping[str, np.ndarray], *, backend: str) -> EngineImpl:
        return get_backend(backend).load_engine(header, arrays)

    def run(self, impl: EngineImpl, inputs: list[Any]) -> list[Any]:
        return impl.run(inputs)

    def coverage(self, engine: Any) -> Coverage:
        return all_in_tensorrt(engine)


KIND = WholeNetwork()
