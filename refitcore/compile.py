"""``refitcore.compile``: model -> RefittableEngine."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch

from .backends import get_backend, resolve_backend
from .conversion.convert import convert
from .engine import IOSpec, RefittableEngine
from .lowering import export_model, graph_fingerprint, input_names, plan_fusions
from .shapes import export_example, resolve_dynamic_shapes
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
            verbose: bool = False, dynamic_shapes: Any = None,
            profiles: Sequence[Any] | None = None) -> RefittableEngine:
    """Export ``model`` (eval mode), convert it to a TensorRT network with the REFIT flag, record
    the weight map, and build it on ``backend`` ('auto', 'reference' or 'tensorrt').

    ``dynamic_shapes``: the input dimensions that vary at run time and their ranges, in
    torch.export's form (``{"x": {0: torch.export.Dim("batch", min=1, max=8)}}``) or per input
    (``{"x": {0: (1, 8)}}``, ``{0: ((1, 4, 8), 3, 64, 64)}``: (min, max) or (min, opt, max)); the
    example's size is ``opt`` unless given. ``profiles``: several optimization profiles inside those
    ranges (see :mod:`refitcore.shapes`). The engine accepts any shape inside a profile and refuses
    others with an error naming the input, the dimension and the range.

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
    export_ds, shape_profiles = resolve_dynamic_shapes(model, example_inputs, dynamic_shapes, profiles=profiles)
    ep = export_model(model, export_example(example_inputs, shape_profiles), dynamic_shapes=export_ds)
    fusion = plan_fusions(ep.graph_module)
    if shape_profiles is not None:   # the network's input names (the exporter may rename an argument)
        shape_profiles = dataclasses.replace(shape_profiles, input_names=tuple(input_names(ep)))
    result = convert(ep, fusion=fusion, profiles=shape_profiles)
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
    io = IOSpec(tuple(result.input_names), tuple(tuple(int(s) for s in t.shape) for t in example_inputs),
                tuple(str(t.dtype).replace("torch.", "") for t in example_inputs),
                tuple(result.output_names), tuple(result.output_shapes), shape_profiles)
    return RefittableEngine(impl, wm, io, digest, exported_program=ep, fusion=fusion, backend_reason=reason,
                            graph_entries=entries, model_factory=model_factory, state_keys=state_keys)
