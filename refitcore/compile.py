"""``refitcore.compile``: model -> RefittableEngine."""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from .backends import get_backend, resolve_backend
from .cache import as_cache, lookup, store
from .conversion.convert import convert
from .engine import IOSpec, RefittableEngine
from .errors import ArchitectureMismatchError, RefitCoreError
from .fingerprint import CacheKey, cache_key
from .lowering import export_model, graph_fingerprint, plan_fusions
from .refit import refit
from .weight_map import WeightMap

__all__ = ["compile", "tied_groups", "check_map_covers", "attach_exported_program"]

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
            verbose: bool = False, cache: Any = None, verify_inputs: Sequence | None = None,
            keep_exported: bool = False) -> RefittableEngine:
    """Export ``model`` (eval mode), convert it to a TensorRT network with the REFIT flag, record
    the weight map, and build it on ``backend`` ('auto', 'reference' or 'tensorrt').

    ``cache``: None, a directory or a :class:`refitcore.EngineCache` (or any object with
    ``save``/``load``/``evict``). On a hit (same architecture, inputs, backend, precision and
    toolchain: :func:`refitcore.fingerprint.cache_key`) the stored engine is loaded and refitted
    with ``model``'s current weights through the cached map instead of exporting and building;
    with ``verify_inputs`` (a list of samples) that refit is checked against eager ``model``, and
    an entry that disagrees is evicted and rebuilt. ``keep_exported=True`` exports on a hit too,
    keeping the exported program that the fallback refit path converts (and checking that its
    graph is the cached engine's). The engine says what happened: ``engine.cache_hit`` (True,
    False, or None without a cache) and ``engine.cache_key``.

    Example::

        engine = refitcore.compile(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64),
                                   backend="reference", cache="~/.cache/engines")
        engine(torch.randn(1, 3, 64, 64))
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    name, reason = resolve_backend(backend)
    if backend == "auto":
        log.warning("refitcore: backend 'auto' chose %r: %s", name, reason)
    store_to = as_cache(cache)
    key = None
    if store_to is not None:
        key = cache_key(model, example_inputs, backend=name, precision=precision)
        engine = _from_cache(store_to, key, model, example_inputs, verify_inputs=verify_inputs,
                             keep_exported=keep_exported, model_factory=model_factory)
        if engine is not None:
            return engine
    engine = _build(model, example_inputs, name, reason, precision=precision, model_factory=model_factory)
    engine.cache_hit, engine.cache_key = (None, None) if key is None else (False, key.digest)
    if store_to is not None:
        store(store_to, key, engine)
        log.info("refitcore: engine cache miss %s: compiled and stored", key.digest[:16])
    return engine


def _from_cache(cache, key: CacheKey, model: torch.nn.Module, example_inputs, *, verify_inputs, keep_exported: bool,
                model_factory: str | None) -> RefittableEngine | None:
    """The cached engine refitted with ``model``'s weights, or None (a miss, or an entry that does
    not fit ``model``, which is then evicted)."""
    t0 = time.perf_counter()
    engine = lookup(cache, key)
    if engine is None:
        return None
    state_keys = list(model.state_dict().keys())
    try:
        if engine.state_keys != state_keys:
            raise RefitCoreError(f"the cached engine was compiled from a state_dict with other keys "
                                 f"({len(engine.state_keys)} vs {len(state_keys)})")
        if keep_exported:
            attach_exported_program(engine, model, example_inputs)
        was_training = model.training
        try:
            result = refit(engine, model, path="cached", verify_inputs=verify_inputs, in_place=True)
        finally:
            model.train(was_training)
        if not result:
            raise RefitCoreError(f"the cached engine refitted with the model's weights disagrees with eager:\n{result}")
    except RefitCoreError as err:
        log.warning("refitcore: engine cache entry %s does not fit this model (%s); evicted, compiling instead",
                    key.digest[:16], str(err).splitlines()[0])
        cache.evict(key.digest)
        return None
    if model_factory:
        engine.model_factory = model_factory
    engine.cache_hit, engine.cache_key = True, key.digest
    log.info("refitcore: engine cache hit %s: loaded and refitted with the model's weights in %.2fs%s",
             key.digest[:16], time.perf_counter() - t0, " (verified against eager)" if verify_inputs else "")
    return engine


def attach_exported_program(engine: RefittableEngine, model: torch.nn.Module, example_inputs) -> None:
    """Export ``model`` and give ``engine`` (loaded from a file or the cache, so without one) the
    exported program that the fallback refit path converts again. Raises
    :class:`ArchitectureMismatchError` when the exported graph is not the engine's."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ep = export_model(model, example_inputs)
    digest, _ = graph_fingerprint(ep)
    if digest != engine.fingerprint:
        raise ArchitectureMismatchError([f"the model's exported graph ({digest[:12]}) is not the engine's "
                                         f"({engine.fingerprint[:12]}); recompile needed"])
    engine.exported_program, engine.fusion = ep, plan_fusions(ep.graph_module)


def _build(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], name: str, reason: str, *,
           precision: str, model_factory: str | None) -> RefittableEngine:
    """Export, plan fusions, convert (recording the weight map) and build on backend ``name``."""
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
