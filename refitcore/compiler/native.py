"""``refitcore.compile``: model -> RefittableEngine.

The compile options are one :class:`refitcore.engine.options.CompileOptions`, built once from
:func:`compile`'s keywords: they choose and build the engine's kind (:mod:`refitcore.engine.kinds`:
one whole network, segments, or compiled submodules of a model that does not export whole), make
the engine-cache key (:func:`refitcore.cache.key.compile_key`) and are stored with the engine.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from refitcore.backends import choose_backend
from refitcore.cache.key import CacheKey, compile_key
from refitcore.cache.store import as_cache, lookup, store
from refitcore.capture.lowering import DETAIL_HINT, DETAIL_LOG, export_model, packed_sequence_users, tensor_inputs
from refitcore.capture.shapes import ShapeProfiles, export_call, resolve_dynamic_shapes
from refitcore.capture.structured import register_cache_pytrees, spec_to_json, unresolved_types
from refitcore.conversion.convert import dynamic_node_names
from refitcore.conversion.weight_map import WeightMap
from refitcore.dtypes import model_precision, precision_dtype
from refitcore.engine import hybrid, segmented_build, torch_tensorrt, whole
from refitcore.engine.kinds import BuildInput, EngineKind
from refitcore.engine.options import DEFAULT_COMPILER, CompileOptions
from refitcore.engine.records import CallSpec, EngineRecord
from refitcore.engine.reexport import exported_for
from refitcore.engine.refittable import RefittableEngine
from refitcore.errors import (
    ExportError,
    MutationError,
    PackedSequenceError,
    RefitCoreError,
    ShapeRangeError,
    UnsupportedOperatorError,
)
from refitcore.partition.partitioner import DEFAULT_MIN_BLOCK_SIZE, executed_op_nodes, partition
from refitcore.progress import reporting
from refitcore.refitting.refit import refit, verification_samples

__all__ = ["compile", "tied_groups", "attach_exported_program", "compile_cache_key", "call_inputs"]

log = logging.getLogger("refitcore")


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state_dict keys that are one tensor (tied parameters), in state_dict order."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def compile(model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
            args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
            backend: str = "auto", precision: str | None = None, model_factory: str | None = None,
            verbose: bool = False, strict: bool = False, torch_executed_ops: Iterable[Any] = (),
            min_block_size: int = DEFAULT_MIN_BLOCK_SIZE, submodules: Sequence[str] | None = None,
            dynamic_shapes: Any = None, profiles: Sequence[Any] | None = None, cache: Any = None,
            verify_inputs: Sequence | None = None, keep_exported: bool = False, compiler: str = DEFAULT_COMPILER,
            strip_engine_weights: bool = False, progress: Any = None, **settings: Any) -> RefittableEngine:
    """Export ``model`` (eval mode), convert it to TensorRT networks with the REFIT flag, record
    the weight maps, and build them on ``backend`` ('auto', 'reference' or 'tensorrt').

    Inputs: ``example_inputs`` (a tensor or a tuple of positional inputs) or ``args=``/``kwargs=``;
    any pytree of tensors, Python scalars and None. The engine takes and returns the same
    structures as the model. Ops without a converter, and ops in ``torch_executed_ops`` (op overloads,
    packets, or their names, ``'aten.convolution.default'``, with or without ``'torch.ops.'``; a name
    that is no operator is a :class:`ValueError`), run in PyTorch (partitioning:
    :mod:`refitcore.partition`), as do runs of fewer than
    ``min_block_size`` convertible ops; ``strict=True`` instead refuses a model that does not
    convert whole, listing every unsupported op. A model torch.export cannot export whole has its
    largest exporting submodules compiled and the rest run eagerly (:mod:`refitcore.engine.hybrid`;
    ``submodules=[paths]`` names them instead); ``engine.summary()`` says what runs where.

    ``dynamic_shapes``: the input dimensions that vary at run time and their ranges, in
    torch.export's form (``{"x": {0: torch.export.Dim("batch", min=1, max=8)}}``) or per input
    (``{"x": {0: (1, 8)}}``, ``{0: ((1, 4, 8), 3, 64, 64)}``: (min, max) or (min, opt, max)); the
    example's size is ``opt`` unless given. ``profiles``: several optimization profiles inside those
    ranges (see :mod:`refitcore.capture.shapes`). The engine accepts any shape inside a profile and refuses
    others with an error naming the input, the dimension and the range. Keyword and nested inputs
    take a spec of their structure (``{"d": {"bias": {0: (1, 8)}}}``); dimensions the graph ties need
    no common name. A hybrid engine (``submodules=``) runs at the example's shapes.

    ``cache``: None, a directory or a :class:`refitcore.EngineCache` (or any object with
    ``save``/``load``/``evict``). On a hit (same architecture, inputs, compile options, backend,
    precision and toolchain: :func:`refitcore.cache.key.cache_key`) the stored engine is loaded
    and refitted with ``model``'s current weights through the cached map instead of exporting and
    building; with ``verify_inputs`` (a list of samples) that refit is checked against eager
    ``model``, and an entry that disagrees is evicted and rebuilt. A key that cannot see everything
    ``forward`` reads (``key.complete`` False: an attribute holding an object without fields...) is
    served only with ``verify_inputs``; without, the model is compiled (and the reason logged).
    ``keep_exported=True`` exports on a hit too, keeping the exported program that the fallback
    refit path converts (and checking that its graph is the cached engine's). The engine says what
    happened: ``engine.cache_hit`` (True, False, or None without a cache) and ``engine.cache_key``.

    ``compiler="torch_tensorrt"``: Torch-TensorRT's own lowering, partition and converters build the
    network (:mod:`refitcore.engine.torch_tensorrt`; ``backend='reference'`` runs it on the CPU), and
    refits go through Torch-TensorRT's refit code. ``settings``: its ``CompilationSettings`` fields
    (``truncate_double=True``...), passed through with ``min_block_size`` and ``torch_executed_ops``;
    inputs may be ``torch_tensorrt.Input(min_shape=, opt_shape=, max_shape=)`` (dynamic) or tensors
    with ``dynamic_shapes=`` (torch.export ``Dim`` objects). No ``cache``, ``submodules`` or ``profiles``.

    ``precision``: 'fp32', 'fp16' or 'bf16': the type of the network's floating tensors and
    refittable weights (a strongly typed network; weights rounded once from float32 or wider).
    None (default): the model's own (:func:`refitcore.dtypes.model_precision`: 'fp16'/'bf16' when every
    floating parameter is float16/bfloat16, else 'fp32'; such a model is compiled at its own precision
    only). Inputs and outputs keep the model's types (docs/precision.md). Another value is a
    :class:`ValueError`.

    ``strip_engine_weights=True`` (TensorRT's weight-stripped plan; Torch-TensorRT's setting of that
    name): the engine is built from the model's weights without copying them and returned
    weightless (placeholders: :meth:`RefittableEngine.strip_weights`): it refuses to run until a refit
    sets every weight (``refitcore.refit(engine, model, path="cached", in_place=True)``, or
    ``trtrefit gate``, which refits every weight anyway) and ``engine.save`` writes it without them.
    Compile then holds one copy of the weights, the model's (a 7B-parameter checkpoint compiles
    where two copies do not fit: docs/memory.md).

    ``progress``: a reporter (``info(message)``, ``step(what)``; :mod:`refitcore.progress`) told how
    far a long conversion got (graph nodes converted, every 3 s once it runs that long).

    Example::

        engine = refitcore.compile(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64),
                                   backend="reference")
        engine(torch.randn(1, 3, 64, 64))
    """
    args, kwargs = call_inputs(example_inputs, args, kwargs)
    own = model_precision(model)
    precision = own if precision is None else precision
    precision_dtype(precision)   # an unknown precision is refused before anything is exported
    if own != "fp32" and precision != own:
        # Its weights would be stored in the engine's type next to activations in the model's own: the
        # strongly typed network would mix them in one layer, which it refuses.
        raise ValueError(f"precision={precision!r} for a model whose floating parameters are all "
                         f"{precision_dtype(own)}: compile it at {own!r} (the default, precision=None), or cast "
                         f"the model first (model.float() for an fp32 engine)")
    if compiler != DEFAULT_COMPILER:
        if cache is not None or submodules is not None or profiles:
            raise ValueError(f"compiler={compiler!r} takes no cache=, submodules= or profiles= (its engines are not "
                             f"saved, and Torch-TensorRT exports the whole model)")
        if precision != "fp32":
            raise ValueError(f"compiler={compiler!r} with precision={precision!r}: Torch-TensorRT engines are checked "
                             f"in fp32 only; reduced precision is checked with refitcore's own compiler "
                             f"(compiler='refitcore')")
        if strip_engine_weights:
            raise ValueError(f"compiler={compiler!r} with strip_engine_weights=True: Torch-TensorRT engines keep "
                             f"their weights (their refit runs Torch-TensorRT's own code)")
        args, dynamic_shapes = torch_tensorrt.example_inputs(args, dynamic_shapes)
    if strip_engine_weights and submodules is not None:
        raise ValueError("submodules= with strip_engine_weights=True: an engine of compiled submodules inside the "
                         "eager model keeps them in that model; compile without one of them")
    name, reason = choose_backend(backend)
    options = CompileOptions(backend=name, precision=precision, strict=strict, torch_executed_ops=torch_executed_ops,
                             min_block_size=min_block_size, submodules=submodules, dynamic_shapes=dynamic_shapes,
                             profiles=profiles, model_factory=model_factory, verbose=verbose, compiler=compiler,
                             compiler_settings=settings, strip_engine_weights=bool(strip_engine_weights))
    with reporting(progress):
        engine = _compile_or_hit(model, args, kwargs, options, reason, cache, verify_inputs, keep_exported)
    if engine.options.strip_engine_weights != options.strip_engine_weights:   # a cache entry of the other kind
        engine.record = dataclasses.replace(engine.record, options=dataclasses.replace(
            engine.options, strip_engine_weights=options.strip_engine_weights))
    if strip_engine_weights and not engine.weightless:
        engine.strip_weights()
    return engine


def _compile_or_hit(model: torch.nn.Module, args: tuple, kwargs: dict, options: CompileOptions, reason: str,
                    cache: Any, verify_inputs: Sequence | None, keep_exported: bool) -> RefittableEngine:
    """The engine from the cache (a hit, refitted with the model's weights) or compiled (and stored)."""
    store_to = as_cache(cache)
    if store_to is None:
        return _compile(model, args, kwargs, options, reason)
    key = compile_key(model, args, options, kwargs=kwargs)
    if key.complete or verify_inputs is not None:
        engine = _from_cache(store_to, key, model, (args, kwargs), verify_inputs=verify_inputs,
                             keep_exported=keep_exported, model_factory=options.model_factory)
        if engine is not None:
            return engine
    else:
        log.warning("refitcore: engine cache: the key of this model is incomplete (%s%s); compiling instead of "
                    "serving a hit that cannot be verified (give verify_inputs= to use the cache)",
                    key.incomplete_reasons[0], f"; and {len(key.incomplete_reasons) - 1} more"
                    if len(key.incomplete_reasons) > 1 else "")
    engine = _compile(model, args, kwargs, options, reason)
    engine.record_cache(False, key.digest)
    if store(store_to, key, engine):
        log.info("refitcore: engine cache miss %s: compiled and stored", key.digest[:16])
    return engine


def call_inputs(example_inputs: Sequence[Any] | torch.Tensor | None, args: Sequence[Any] | None,
                kwargs: dict[str, Any] | None) -> tuple[tuple, dict]:
    """(args, kwargs) of one call from :func:`compile`'s input arguments: ``example_inputs`` (a tensor
    or a tuple of positional inputs) or ``args=`` (a sequence, or one input), and ``kwargs=``."""
    if example_inputs is not None and args is not None:
        raise TypeError("give the example inputs either positionally or as args=, not both")
    if args is None:
        args = () if example_inputs is None else (
            (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs)
    if isinstance(args, torch.Tensor) or not isinstance(args, (tuple, list)):
        args = (args,)
    return tuple(args), dict(kwargs or {})


def compile_cache_key(model: torch.nn.Module, args: Sequence[Any], *, kwargs: dict[str, Any] | None = None,
                      **options: Any) -> CacheKey:
    """The engine-cache key :func:`compile` uses for these arguments (``options``: its keywords, with
    ``backend`` resolved: 'reference' or 'tensorrt')."""
    return compile_key(model, tuple(args), CompileOptions(**options), kwargs=kwargs)


def _from_cache(cache, key: CacheKey, model: torch.nn.Module, example: tuple[tuple, dict], *, verify_inputs,
                keep_exported: bool, model_factory: str | None) -> RefittableEngine | None:
    """The cached engine refitted with ``model``'s weights, or None (a miss, or an entry that does
    not fit ``model``, which is then evicted)."""
    t0 = time.perf_counter()
    engine = lookup(cache, key)
    if engine is None:
        return None
    if verify_inputs is not None:
        # The caller's samples are checked first, outside the miss handling below: samples that do not
        # fit the model's inputs are the caller's error (as without a cache), not a fault of the entry.
        verification_samples(engine, verify_inputs)
    state_keys = list(model.state_dict().keys())
    was_training = model.training
    try:
        if engine.state_keys != state_keys:
            raise RefitCoreError(f"the cached engine was compiled from a state_dict with other keys "
                                 f"({len(engine.state_keys)} vs {len(state_keys)})")
        if keep_exported:
            attach_exported_program(engine, model)
        try:
            if engine.structure is not None and unresolved_types(engine.structure["out"]):
                _model_output_types(engine, model, example)
            result = refit(engine, model, path="cached", verify_inputs=verify_inputs, in_place=True)
        finally:
            model.train(was_training)
        if not result:
            raise RefitCoreError(f"the cached engine refitted with the model's weights disagrees with eager:\n{result}")
    except Exception as err:  # noqa: BLE001 - whatever a cached entry does wrong on a hit, it is a miss
        log.warning("refitcore: engine cache entry %s does not fit this model (%s: %s); evicted, compiling instead",
                    key.digest[:16], type(err).__name__, (str(err).splitlines() or [""])[0])
        cache.evict(key.digest)
        return None
    if model_factory:
        engine.model_factory = model_factory
    engine.record_cache(True, key.digest)
    log.info("refitcore: engine cache hit %s: loaded and refitted with the model's weights in %.2fs%s",
             key.digest[:16], time.perf_counter() - t0, " (verified against eager)" if verify_inputs else "")
    return engine


def _model_output_types(engine: RefittableEngine, model: torch.nn.Module, example: tuple[tuple, dict]) -> None:
    """Give a cached engine the model's own output types (a ``ModelOutput``...): its entry only names
    them and nothing an entry names is imported, but the model they came from is at hand. One eager
    call on the example gives its output structure, which must be the entry's."""
    args, kwargs = example
    model.eval()
    with torch.no_grad():
        out = model(*args, **kwargs)
    register_cache_pytrees()   # a decoder's cache, as at export
    _, spec = pytree.tree_flatten(out)
    if spec_to_json(spec) != (engine.structure or {}).get("out"):
        raise RefitCoreError("the cached engine's outputs are structured differently from the model's")
    engine.calls = dataclasses.replace(engine.calls, out_treespec=spec)


def attach_exported_program(engine: RefittableEngine, model: torch.nn.Module) -> None:
    """Export ``model`` as the engine was exported (its example shapes, dynamic ranges and input
    structure) and give ``engine`` (loaded from a file or the cache, so without one) the exported
    program that the fallback refit path converts again. Raises :class:`ArchitectureMismatchError`
    when the exported graph is not the engine's."""
    engine.exported_program = exported_for(engine, model, model.state_dict())


def _compile(model: torch.nn.Module, args: tuple, kwargs: dict, options: CompileOptions,
             reason: str) -> RefittableEngine:
    """:func:`compile` without the engine cache: export, then build the engine's kind."""
    export_ds = shape_profiles = None
    if options.dynamic_shapes is not None or options.profiles:
        if options.submodules is not None:
            raise ShapeRangeError("dynamic_shapes= and submodules= do not go together (compiled submodules run at "
                                  "the example's shapes); compile without one of them")
        export_ds, shape_profiles = resolve_dynamic_shapes(model, args, options.dynamic_shapes, kwargs=kwargs,
                                                           profiles=options.profiles)
    export_error: Exception | None = None
    try:
        ep = (export_model(model, *export_call(args, kwargs, shape_profiles), dynamic_shapes=export_ds)
              if options.submodules is None else None)
    except Exception as err:
        export_error = err
        packed = packed_sequence_users(model, args, kwargs)
        if packed:   # a hybrid would run the recurrence eagerly for a reason no log line explains
            raise PackedSequenceError(packed, err) from err
        if options.strict or shape_profiles is not None:
            if isinstance(err, MutationError):   # exported, but no engine can do what it does
                raise
            raise ExportError("", err) from err
        DETAIL_LOG.debug("torch.export of the model failed", exc_info=err)
        log.warning("refitcore: torch.export cannot export the model (%s); compiling the submodules that export "
                    "(%s)", ExportError("", err).cause_line, DETAIL_HINT)
        ep = None
    if export_error is not None and options.compiler != DEFAULT_COMPILER:   # Torch-TensorRT exports the whole model
        raise ExportError("", export_error) from export_error
    if ep is None:
        return _compile_hybrid(model, args, kwargs, options, reason, export_error)
    if options.compiler != DEFAULT_COMPILER:
        source = BuildInput(model, args, kwargs, exported=ep, profiles=shape_profiles)
        return _engine(torch_tensorrt.KIND, torch_tensorrt.KIND.build(source, options), model, options, reason,
                       exported_program=ep)
    _check_executed_ops(ep, options)
    if shape_profiles is not None:   # the network's input names and the dimensions the graph ties
        shape_profiles = shape_profiles.tied_by(tensor_inputs(ep))
    return _compile_exported(model, ep, args, kwargs, options, reason, shape_profiles)


def _check_executed_ops(ep, options: CompileOptions) -> None:
    """``torch_executed_ops`` are never ignored silently: a name that matches no op of the exported
    graph is logged with the ops it has."""
    if not options.torch_executed_ops:
        return
    _nodes, unmatched = executed_op_nodes(ep, options.torch_executed_ops)
    if unmatched:
        ops = sorted({str(n.target) for n in ep.graph_module.graph.nodes if n.op == "call_function"})
        log.warning("refitcore: torch_executed_ops %s match no op of the exported graph, so they change nothing; "
                    "its ops: %s%s", unmatched, ", ".join(ops[:12]), f" (+{len(ops) - 12} more)" if len(ops) > 12
                    else "")


def _compile_exported(model: torch.nn.Module, ep, args: tuple, kwargs: dict, options: CompileOptions, reason: str,
                      shape_profiles: ShapeProfiles | None = None) -> RefittableEngine:
    """The engine of an exported program: one TensorRT network when the whole graph converts
    (strict: or an error listing every op), else segments."""
    kind: EngineKind = whole.KIND
    # A graph that converts whole is one network, however few ops it has (min_block_size only
    # weighs TensorRT runs between PyTorch parts). With dynamic shapes each TensorRT segment gets
    # the ranges its inputs take over the export ranges (segmented_build).
    if not options.strict and not _whole_graph_converts(
            ep, partition(ep, torch_executed_ops=options.torch_executed_ops, min_block_size=1)):
        kind = segmented_build.KIND
    source = BuildInput(model, args, kwargs, exported=ep, profiles=shape_profiles)
    try:
        built = kind.build(source, options)
    except UnsupportedOperatorError:
        if kind is not whole.KIND or options.strict:
            raise
        # A converter declined a call while converting: partition, that call runs in PyTorch.
        kind = segmented_build.KIND
        built = kind.build(source, options)
    return _engine(kind, built, model, options, reason, exported_program=ep)


def _compile_hybrid(model: torch.nn.Module, args: tuple, kwargs: dict, options: CompileOptions,
                    reason: str, export_error: Exception | None = None) -> RefittableEngine:
    """Compile the largest submodules that export, each as its own engine, inside the eager model.
    ``export_error``: why the whole model did not export; a mutation is the reason given when no
    submodule exports either (not a guess at data-dependent control flow)."""
    found, eager, out = hybrid.find_exportable(model, args, kwargs, names=options.submodules)
    if not found:
        if isinstance(export_error, MutationError):
            raise export_error
        raise ExportError("", RuntimeError("no submodule with weights exports: " +
                                           "; ".join(f"{p or '<top>'}: {w}" for p, w in eager[:5])))
    part_options = dataclasses.replace(options, submodules=None, dynamic_shapes=None, profiles=None,
                                       model_factory=None)
    parts = {path: _compile_exported(model.get_submodule(path), ep, a, k, part_options, reason)
             for path, (ep, a, k) in found.items()}
    built = hybrid.KIND.build(BuildInput(model, args, kwargs, parts=parts, eager=eager, eager_output=out), options)
    return _engine(hybrid.KIND, built, model, options, reason)


def _engine(kind: EngineKind, built, model: torch.nn.Module, options: CompileOptions, reason: str, *,
            exported_program=None) -> RefittableEngine:
    """The RefittableEngine of a kind's build, its map completed with the model's tied groups and keys."""
    _finish_map(built.weight_map, model)
    record = EngineRecord(built.fingerprint, options, graph_entries=built.graph_entries,
                          state_keys=list(model.state_dict()), backend_reason=reason, partition=built.partition,
                          eager_modules=list(built.eager_modules))
    return RefittableEngine(kind, built.impl, built.weight_map, built.io, record,
                            calls=CallSpec(built.structure, built.out_treespec), exported_program=exported_program)


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
