"""``refitcore.compile``: model -> RefittableEngine."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .backends import get_backend, resolve_backend
from .conversion.convert import convert
from .engine import IOSpec, RefittableEngine
from .lowering import export_model, graph_fingerprint, plan_fusions
from .weight_map import WeightMap

__all__ = ["compile", "tied_groups", "check_map_covers"]

log = logging.getLogger("refitcore")


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state_dict keys that are one tensor (tied parameters), in state_dict order."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def check_map_covers(weight_map: WeightMap, engine_names: Sequence[str]) -> None:
    """The map covers exactly the network's refittable weights: no gaps, no extras."""
    names = set(engine_names)
    gaps = sorted(names - set(weight_map.sources))
    extra = sorted(set(weight_map.sources) - names)
    if gaps or extra:
        raise RuntimeError(f"internal error: weight map does not match the network's weights; "
                           f"unmapped engine weights {gaps[:10]}, map entries without engine weight {extra[:10]}")


def compile(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
            backend: str = "auto", precision: str = "fp32", model_factory: str | None = None,
            verbose: bool = False) -> RefittableEngine:
    """Export ``model`` (eval mode), convert it to a TensorRT network with the REFIT flag, record
    the weight map, and build it on ``backend`` ('auto', 'reference' or 'tensorrt').

    Example::

        engine = refitcore.compile(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64),
                                   backend="reference")
        engine(torch.randn(1, 3, 64, 64))
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    name, reason = resolve_backend(backend)
    if backend == "auto":
        log.warning("refitcore: backend 'auto' chose %r: %s", name, reason)
    ep = export_model(model, example_inputs)
    fusion = plan_fusions(ep.graph_module)
    result = convert(ep, fusion=fusion)
    wm = result.weight_map
    wm.tied = tied_groups(model)
    # torch.export lifts a tied parameter under one of its names (not necessarily the first);
    # the map reads the first key of each group, so that a checkpoint's tied keys are
    # checked for equality against one canonical key.
    alias = {k: g[0] for g in wm.tied for k in g[1:]}
    if alias:
        wm.sources = {n: s.with_keys_renamed(alias) for n, s in wm.sources.items()}
    used = set(wm.keys_used)
    model_state = model.state_dict()
    state_keys = list(model_state.keys())
    wm.key_specs = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model_state.items()}
    wm.unused_keys = [k for k in state_keys if k not in used and not any(k in g[1:] for g in wm.tied)]
    impl = get_backend(name).build(result, precision=precision)
    check_map_covers(wm, impl.weight_names())
    digest, entries = graph_fingerprint(ep)
    io = IOSpec(tuple(result.input_names), tuple(result.input_shapes),
                tuple(str(t.dtype).replace("torch.", "") for t in example_inputs),
                tuple(result.output_names), tuple(result.output_shapes))
    return RefittableEngine(impl, wm, io, digest, exported_program=ep, fusion=fusion, backend_reason=reason,
                            graph_entries=entries, model_factory=model_factory, state_keys=state_keys)
