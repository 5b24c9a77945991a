"""``refitcore.compile``: model -> RefittableEngine."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, Sequence

import torch

from refitcore.backends import choose_backend, get_backend
from refitcore.cache.store import as_cache, lookup, store
from refitcore.conversion.convert import convert, dynamic_node_names
from refitcore.engine.refittable import IOSpec, RefittableEngine
from refitcore.errors import ExportError, RefitCoreError, ShapeRangeError, UnsupportedOperatorError
from refitcore.cache.key import CacheKey, cache_key
from refitcore.capture.lowering import export_model, graph_fingerprint, input_names, plan_fusions
from refitcore.refitting.mapping import exported_for
from refitcore.partition.partitioner import DEFAULT_MIN_BLOCK_SIZE, partition
from refitcore.refitting.refit import refit
from refitcore.capture.shapes import export_example, resolve_dynamic_shapes
from refitcore.capture.structured import leaf_names
from refitcore.conversion.weight_map import WeightMap

__all__ = ["compile", "tied_groups", "check_map_covers", "attach_exported_program", "compile_cache_key"]

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


def compile(model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
            args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
            backend: str = "auto", precision: str = "fp32", model_factory: str | None = None,
            verbose: bool = False, strict: bool = False, torch_executed_ops: Iterable[Any] = (),
            min_block_size: int = DEFAULT_MIN_BLOCK_SIZE, submodules: Sequence[str] | None = None,
            dynamic_shapes: Any = None, profiles: Sequence[Any] | None = None, cache: Any = None,
            verify_inputs: Sequence | None = None, keep_exported: bool = False) -> RefittableEngine:
    """Export ``model`` (eval mode), convert it to TensorRT networks with the REFIT flag, record
    the weight maps, and build them on ``backend`` ('auto', 'reference' or 'tensorrt').

    Inputs: ``example_inputs`` (a tensor or a tuple of positional inputs) or ``args=``/``kwargs=``;
    any pytree of tensors, Python scalars and None. The engine takes and returns the same
    structures as the model. Ops without a converter, and ops in ``torch_executed_ops``, run in
    PyTorch (partitioning: :mod:`refitcore.partition`), as do runs of fewer than
    ``min_block_size`` convertible ops; ``strict=True`` instead refuses a model that does not
    convert whole, listing every unsupported op. A model torch.export cannot export whole has its
    largest exporting submodules compiled and the rest run eagerly (:mod:`refitcore.engine.hybrid`;
    ``submodules=[paths]`` names them instead); ``engine.summary()`` says what runs where.

    ``dynamic_shapes``: the input dimensions that vary at run time and their ranges, in
    torch.export's form (``{"x": {0: torch.export.Dim("batch", min=1, max=8)}}``) or per input
    (``{"x": {0: (1, 8)}}``, ``{0: ((1, 4, 8), 3, 64, 64)}``: (min, max) or (min, opt, max)); the
    example's size is ``opt`` unless given. ``profiles``: several optimization profiles inside those
    ranges (see :mod:`refitcore.capture.shapes`). The engine accepts any shape inside a profile and refuses
    others with an error naming the input, the dimension and the range. Dynamic shapes need
    positional tensor inputs and a graph that converts whole (a partitioned or hybrid engine runs
    at the example's shapes).

    ``cache``: None, a directory or a :class:`refitcore.EngineCache` (or any object with
    ``save``/``load``/``evict``). On a hit (same architecture, inputs, compile options, backend,
    precision and toolchain: :func:`refitcore.cache.key.cache_key`) the stored engine is loaded
    and refitted with ``model``'s current weights through the cached map instead of exporting and
    building; with ``verify_inputs`` (a list of samples) that refit is checked against eager
    ``model``, and an entry that disagrees is evicted and rebuilt. ``keep_exported=True`` exports
    on a hit too, keeping the exported program that the fallback refit path converts (and checking
    that its graph is the cached engine's). The engine says what happened: ``engine.cache_hit``
    (True, False, or None without a cache) and ``engine.cache_key``.

    Example::

        engine = refitcore.compile(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64),
                                   backend="reference")
        engine(torch.randn(1, 3, 64, 64))
    """
    options = dict(backend=backend, precision=precision, model_factory=model_factory, verbose=verbose, strict=strict,
                   torch_executed_ops=torch_executed_ops, min_block_size=min_block_size, submodules=submodules,
                   dynamic_shapes=dynamic_shapes, profiles=profiles)
    store_to = as_cache(cache)
    if store_to is None:
        engine = _compile(model, example_inputs, args=args, kwargs=kwargs, **options)
        engine.cache_hit, engine.cache_key = None, None
        return engine
    if example_inputs is not None and args is not None:
        raise TypeError("give the example inputs either positionally or as args=, not both")
    call = args if args is not None else (() if example_inputs is None else example_inputs)
    if isinstance(call, torch.Tensor) or not isinstance(call, (tuple, list)):
        call = (call,)
    name, reason = choose_backend(backend)
    key = compile_cache_key(model, tuple(call), kwargs=kwargs, backend=name, precision=precision,
                            dynamic_shapes=dynamic_shapes, profiles=profiles, strict=strict,
                            torch_executed_ops=torch_executed_ops, min_block_size=min_block_size, submodules=submodules)
    engine = _from_cache(store_to, key, model, verify_inputs=verify_inputs, keep_exported=keep_exported,
                         model_factory=model_factory)
    if engine is not None:
        return engine
    engine = _compile(model, example_inputs, args=args, kwargs=kwargs, **dict(options, backend=name))
    engine.backend_reason = reason
    engine.cache_hit, engine.cache_key = False, key.digest
    if store(store_to, key, engine):
        log.info("refitcore: engine cache miss %s: compiled and stored", key.digest[:16])
    return engine


def compile_cache_key(model: torch.nn.Module, args: Sequence[Any], *, backend: str, precision: str = "fp32",
                      kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = None,
                      profiles: Sequence[Any] | None = None, strict: bool = False,
                      torch_executed_ops: Iterable[Any] = (), min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
                      submodules: Sequence[str] | None = None) -> CacheKey:
    """The engine-cache key :func:`compile` uses for these arguments (``backend`` resolved)."""
    return cache_key(model, tuple(args), kwargs=kwargs, backend=backend, precision=precision,
                     dynamic_shapes=dynamic_shapes,
                     options={"strict": strict, "torch_executed_ops": sorted(str(op) for op in torch_executed_ops),
                              "min_block_size": min_block_size, "submodules": submodules, "profiles": profiles})


def _from_cache(cache, key: CacheKey, model: torch.nn.Module, *, verify_inputs, keep_exported: bool,
                model_factory: str | None) -> RefittableEngine | None:
    """The cached engine refitted with ``model``'s weights, or None (a miss, or an entry that does
    not fit ``model``, which is then evicted)."""
    t0 = time.perf_counter()
    engine = lookup(cache, key)
    if engine is None:
        return None
    state_keys = list(model.state_dict().keys())
    was_training = model.training
    try:
        if engine.state_keys != state_keys:
            raise RefitCoreError(f"the cached engine was compiled from a state_dict with other keys "
                                 f"({len(engine.state_keys)} vs {len(state_keys)})")
        if keep_exported:
            attach_exported_program(engine, model)
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


def attach_exported_program(engine: RefittableEngine, model: torch.nn.Module, example_inputs: Any = None) -> None:
    """Export ``model`` as the engine was exported (its example shapes, dynamic ranges and input
    structure) and give ``engine`` (loaded from a file or the cache, so without one) the exported
    program that the fallback refit path converts again. Raises :class:`ArchitectureMismatchError`
    when the exported graph is not the engine's. ``example_inputs`` is accepted for callers that
    have them; the engine's recorded IO spec decides the export."""
    ep = exported_for(engine, model, model.state_dict())
    engine.exported_program, engine.fusion = ep, plan_fusions(ep.graph_module)


def _compile(model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
            args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
            backend: str = "auto", precision: str = "fp32", model_factory: str | None = None,
            verbose: bool = False, strict: bool = False, torch_executed_ops: Iterable[Any] = (),
            min_block_size: int = DEFAULT_MIN_BLOCK_SIZE, submodules: Sequence[str] | None = None,
            dynamic_shapes: Any = None, profiles: Sequence[Any] | None = None) -> RefittableEngine:
    """:func:`compile` without the engine cache."""
    import torch.utils._pytree as pytree

    from refitcore.capture.structured import describe_leaf, spec_to_json

    if example_inputs is not None and args is not None:
        raise TypeError("give the example inputs either positionally or as args=, not both")
    if args is None:
        args = () if example_inputs is None else example_inputs
    if isinstance(args, torch.Tensor) or not isinstance(args, (tuple, list)):
        args = (args,)
    args, kwargs = tuple(args), dict(kwargs or {})
    name, reason = choose_backend(backend)
    options = dict(backend=name, precision=precision, strict=strict, torch_executed_ops=torch_executed_ops,
                   min_block_size=min_block_size)
    export_ds = shape_profiles = None
    if dynamic_shapes is not None or profiles:
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args) or submodules is not None:
            raise ShapeRangeError("dynamic_shapes= needs the inputs as positional tensors (no keyword, "
                                  "structured or non-tensor inputs, no submodules=); give them as a tuple of tensors")
        export_ds, shape_profiles = resolve_dynamic_shapes(model, args, dynamic_shapes, profiles=profiles)
    try:
        ep = (export_model(model, export_example(args, shape_profiles), kwargs, dynamic_shapes=export_ds)
              if submodules is None else None)
    except Exception as err:  # noqa: BLE001 - any export failure: compile the submodules that export
        if strict or shape_profiles is not None:
            raise ExportError("", err) from err
        log.warning("refitcore: %s; compiling the submodules that export", ExportError("", err).cause_line)
        ep = None
    if ep is None:
        return _compile_hybrid(model, args, kwargs, submodules, reason, options)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    structure = {"in": spec_to_json(in_spec), "in_leaves": [describe_leaf(v) for v in leaves],
                 "out": spec_to_json(ep.call_spec.out_spec)}
    tensor_inputs = [v for v in leaves if isinstance(v, torch.Tensor)]
    plan = None
    if not strict and shape_profiles is None:
        # A graph that converts whole is one network, however few ops it has (min_block_size only
        # weighs TensorRT runs between PyTorch parts). With dynamic shapes the one network is the
        # only option: the converter loop computes sizes in the network, segments cannot yet.
        plan = partition(ep, torch_executed_ops=torch_executed_ops, min_block_size=1)
        if _whole_graph_converts(ep, plan):
            plan = None
    result = None
    if shape_profiles is not None:   # the network's input names (the exporter may rename an argument)
        shape_profiles = dataclasses.replace(shape_profiles, input_names=tuple(input_names(ep)))
    if plan is None:   # one TensorRT network for the whole graph (strict: or an error listing every op)
        fusion = plan_fusions(ep.graph_module)
        try:
            result = convert(ep, fusion=fusion, profiles=shape_profiles)
        except UnsupportedOperatorError:
            if strict or shape_profiles is not None:
                raise
            # A converter declined a call while converting: partition, that call runs in PyTorch.
            plan = partition(ep, torch_executed_ops=torch_executed_ops, min_block_size=min_block_size)
    if result is not None:
        wm = result.weight_map
        impl = get_backend(name).build(result, precision=precision)
        check_map_covers(wm, impl.weight_names())
        io = IOSpec(tuple(result.input_names), tuple(tuple(int(s) for s in t.shape) for t in tensor_inputs),
                    tuple(str(t.dtype).replace("torch.", "") for t in tensor_inputs),
                    tuple(result.output_names), tuple(result.output_shapes), shape_profiles)
        partition_plan = None
    else:
        from refitcore.engine.segmented_build import compile_segments

        fusion = None
        build = compile_segments(ep, backend_name=name, precision=precision, torch_executed_ops=torch_executed_ops,
                                 min_block_size=min_block_size)
        impl, wm, partition_plan = build.impl, build.weight_map, build.plan
        check_map_covers(wm, impl.weight_names())
        out_vals = [a.meta.get("val") if hasattr(a, "meta") else a
                    for a in pytree.tree_leaves(list(ep.graph_module.graph.find_nodes(op="output"))[0].args[0])]
        io = IOSpec(tuple(impl.user_inputs), tuple(tuple(t.shape) for t in tensor_inputs),
                    tuple(str(t.dtype).replace("torch.", "") for t in tensor_inputs),
                    tuple(leaf_names(structure["out"])),
                    tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else () for v in out_vals))
    _finish_map(wm, model)
    digest, entries = graph_fingerprint(ep)
    engine = RefittableEngine(impl, wm, io, digest, exported_program=ep, fusion=fusion, backend_reason=reason,
                              graph_entries=entries, model_factory=model_factory, state_keys=list(model.state_dict()),
                              structure=structure, output_treespec=ep.call_spec.out_spec, partition=partition_plan)
    return engine


def _compile_hybrid(model, args, kwargs, names, reason: str, options: dict) -> RefittableEngine:
    from refitcore.engine.hybrid import compile_submodules

    def compile_one(module, a, k, ep):
        return compile(module, args=a, kwargs=k, **options)

    impl, wm, eager, structure, out_spec = compile_submodules(model, args, kwargs, compile_one, names=names)
    _finish_map(wm, model)
    io = IOSpec(tuple(f"input_{i}" for i, d in enumerate(structure["in_leaves"]) if "tensor" in d),
                tuple(tuple(d["tensor"][0]) for d in structure["in_leaves"] if "tensor" in d),
                tuple(d["tensor"][1] for d in structure["in_leaves"] if "tensor" in d),
                tuple(leaf_names(structure["out"])), ())
    fingerprint = "+".join(e.fingerprint[:16] for e in impl.engines.values())
    engine = RefittableEngine(impl, wm, io, fingerprint, backend_reason=reason, state_keys=list(model.state_dict()),
                              structure=structure, output_treespec=out_spec, eager_modules=eager)
    return engine


def _whole_graph_converts(ep, plan) -> bool:
    """True when one TensorRT network takes the user's tensors and makes every output."""
    if not plan.fully_converted or len(plan.segments) > 1:
        return False
    dynamic = dynamic_node_names(ep)
    out = list(ep.graph_module.graph.find_nodes(op="output"))[0]
    for leaf in out.args[0]:
        if not (hasattr(leaf, "op") and leaf.name in dynamic and isinstance(leaf.meta.get("val"), torch.Tensor)):
            return False
    return True


def _finish_map(wm: WeightMap, model: torch.nn.Module) -> None:
    """Tied groups, key specs and unused keys of the model, on a freshly built map."""
    wm.tied = tied_groups(model)
    # torch.export lifts a tied parameter under one of its names (not necessarily the first);
    # the map reads the first key of each group, so that a checkpoint's tied keys are
    # checked for equality against one canonical key.
    alias = {k: g[0] for g in wm.tied for k in g[1:]}
    if alias:
        wm.sources = {n: s.with_keys_renamed(alias) for n, s in wm.sources.items()}
    used = set(wm.keys_used)
    model_state = model.state_dict()
    wm.key_specs = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model_state.items()}
    wm.unused_keys = [k for k in model_state if k not in used and not any(k in g[1:] for g in wm.tied)]
