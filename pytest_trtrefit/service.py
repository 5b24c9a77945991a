"""The session object behind the ``trt_refit`` fixture: resolved options, the compile cache, the checks
and the records the reports are made of.

One :class:`RefitSession` per pytest process (each pytest-xdist worker has its own), built in
``pytest_configure`` and kept in ``config.stash``. Engines are compiled once per session per
(architecture fingerprint, input spec, backend) and refitted in place for every check, so a
worker builds each architecture at most once. Across sessions (and between workers), engines
persist in refitcore's engine cache (pytest's cache directory by default): a later session loads
an engine and refits it with the model's weights instead of compiling it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Sequence

from .checks import (CheckOutcome, as_samples, call_of, describe_weights, failing_outputs, model_label, output_label,
                     run_check, run_sequence, sample_tensors)
from .config import RefitConfig

__all__ = ["RefitSession", "CacheEntry", "architecture_key", "input_spec", "compile_kwargs", "COMPILE_OPTIONS"]


@dataclasses.dataclass
class CacheEntry:
    key: str
    name: str
    engine: Any                   # refitcore.RefittableEngine, refitted in place by every check
    eager: Any                    # a private copy of the model, loaded with each check's weights
    compile_seconds: float
    sample: Any = None            # the example inputs it was compiled for (a tuple or refitcore.Inputs)
    options: dict = dataclasses.field(default_factory=dict)   # the other refitcore.compile arguments


def architecture_key(model) -> str:
    """A fingerprint of a model's architecture that needs no export and is equal in every process
    and pytest-xdist worker (:func:`refitcore.cache.key.architecture_fingerprint`): module classes
    and their code, configuration attributes, the state_dict's names, shapes and dtypes, tied
    parameters. Two instances of one architecture share it whatever their weights."""
    from refitcore.cache.key import architecture_fingerprint

    return architecture_fingerprint(model)


def input_spec(sample: Any) -> tuple:
    """A cache key for one sample: each tensor's shape and dtype, and for a sample with keyword,
    nested or non-tensor inputs its structure and constant values (what the graph specialises on)."""
    import torch

    tensors = tuple((tuple(t.shape), str(t.dtype)) for t in sample_tensors(sample))
    if isinstance(sample, tuple) and all(isinstance(x, torch.Tensor) for x in sample):
        return tensors
    from refitcore.capture.structured import describe_leaf, spec_of

    leaves, spec = spec_of(call_of(sample))
    return tensors + (json.dumps([spec, [describe_leaf(x) for x in leaves]], sort_keys=True, default=str),)


COMPILE_OPTIONS = ("torch_executed_ops", "min_block_size", "strict")


def compile_kwargs(options: Any) -> dict:
    """The ``refitcore.compile`` options a check may pass (``torch_executed_ops``, ``min_block_size``,
    ``strict``); ``ValueError`` naming any other key."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"compile_options: unknown key(s) {unknown}; valid: {list(COMPILE_OPTIONS)}")
    if "torch_executed_ops" in options:
        ops = options["torch_executed_ops"]
        options["torch_executed_ops"] = (ops,) if isinstance(ops, str) else tuple(ops)
    return options


def _options_key(options: dict) -> str | None:
    if not options:
        return None
    plain = {k: ([str(o) for o in v] if k == "torch_executed_ops" else v) for k, v in options.items()}
    return json.dumps(plain, sort_keys=True, default=str)


def shapes_key(dynamic_shapes: Any) -> str | None:
    """A cache key for a ``dynamic_shapes`` spec (torch.export Dims written as name and range)."""
    from refitcore.capture.shapes import is_torch_dim

    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if is_torch_dim(v):
            return ["Dim", v.__name__, getattr(v, "min", None), getattr(v, "max", None)]
        return v if v is None or isinstance(v, (int, str)) else repr(v)

    return None if dynamic_shapes is None else json.dumps(plain(dynamic_shapes), sort_keys=True, default=str)


class RefitSession:
    """What ``trt_refit`` gives a test: ``config``, ``backend``, :meth:`engine_for`, :meth:`check`,
    :meth:`check_sequence`. Records every check for the terminal summary and the JSON report."""

    def __init__(self, config: RefitConfig, *, worker: str | None = None):
        self.config = config
        self.worker = worker
        self.records: list[dict] = []
        self.failures: list[dict] = []
        self.builds: list[dict] = []
        self.current_test: str | None = None
        self.started = time.time()
        self._cache: dict[tuple, CacheEntry] = {}
        self._backend: tuple[str, str] | None = None
        self._factory_models: dict = {}
        self.outcomes: dict[str, str] = {}      # test node id -> passed | failed | skipped
        self.worker_parts: list[dict] = []      # exports of pytest-xdist workers (controller only)
        self.finished: float | None = None
        self.report_path: str | None = None
        self.collection: dict = {}              # declared models added / deselected (collection.py)
        self.layers: list[dict] = []            # per-engine-weight cached vs fallback discrepancy per check
        self.cache_dir: str | None = None       # where engines persist across sessions (None: nowhere)
        self.cache_note = "off"
        self._engine_cache = None

    # -- backend -------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend the checks run on ('reference' or 'tensorrt'); 'auto' is resolved on first use."""
        return self._resolve()[0]

    @property
    def backend_reason(self) -> str:
        return self._resolve()[1]

    @property
    def backend_resolved(self) -> bool:
        return self._backend is not None

    def require_backend(self) -> None:
        """Raise ``pytest.UsageError`` naming the reason when the asked-for backend cannot run here
        (``--trt-refit-backend=tensorrt`` without a GPU that builds and runs engines)."""
        if self.config.backend != "tensorrt":
            return
        import pytest
        from refitcore.backends import tensorrt

        usable, reason = tensorrt.usable()
        if not usable:
            raise pytest.UsageError(f"--trt-refit-backend=tensorrt: TensorRT cannot build and run engines on this "
                                    f"machine ({reason}); use --trt-refit-backend=auto or reference here")

    def _resolve(self) -> tuple[str, str]:
        if self._backend is None:
            from refitcore.backends import resolve_backend

            self._backend = resolve_backend(self.config.backend)
        return self._backend

    # -- compile cache -------------------------------------------------------------------
    def open_engine_cache(self, pytest_config) -> None:
        """Choose where engines persist across sessions: ``--trt-refit-cache-dir``, else pytest's cache
        directory (``config.cache``; absent under ``-p no:cacheprovider``), nowhere under
        ``--trt-refit-no-cache``. ``--cache-clear`` empties it (on the controller, before workers start)."""
        cfg = self.config
        if cfg.no_cache:
            self.cache_dir, self.cache_note = None, "off (--trt-refit-no-cache)"
            return
        if cfg.cache_dir:
            directory = os.path.abspath(os.path.expanduser(cfg.cache_dir))
        elif getattr(pytest_config, "cache", None) is not None:
            directory = str(pytest_config.cache.mkdir("trtrefit-engines"))
        else:
            self.cache_dir, self.cache_note = None, ("off (pytest's cacheprovider is disabled; give "
                                                     "--trt-refit-cache-dir=DIR to keep engines)")
            return
        if pytest_config.getoption("cacheclear", False) and not hasattr(pytest_config, "workerinput"):
            from refitcore.cache.store import EngineCache

            EngineCache(directory).clear()
        self.cache_dir, self.cache_note = directory, directory

    def engine_for(self, model_or_factory, inputs, *, name: str | None = None, dynamic_shapes: Any = None,
                   compile_options: Any = None):
        """The session's engine for this architecture and input spec (compiled on first use, or loaded
        from the engine cache); ``inputs``: a sample (tensor, tuple of positional inputs,
        ``refitcore.Inputs``) or a list whose first sample is the example; ``dynamic_shapes``: input
        ranges as :func:`refitcore.compile` takes them (the first sample is the example, ``opt``);
        ``compile_options``: ``torch_executed_ops``, ``min_block_size``, ``strict`` for
        :func:`refitcore.compile` (part of the cache key). When the session checks the fallback path
        it has its exported program, so both refit paths work on it."""
        entry = self._entry(model_or_factory, inputs, name=name, dynamic_shapes=dynamic_shapes,
                            compile_options=compile_options)
        self._ready_for(entry, self.config.paths)
        return entry.engine

    def _entry(self, model_or_factory, inputs, *, name: str | None = None,
               dynamic_shapes: Any = None, compile_options: Any = None) -> CacheEntry:
        model = self._factory_models.get(_hashable(model_or_factory))
        if model is None:
            model = _model_from(model_or_factory)
            if _hashable(model_or_factory) is not None:  # a factory: build its model once per session
                self._factory_models[_hashable(model_or_factory)] = model
        samples = as_samples(inputs)
        options = compile_kwargs(compile_options)
        key = (architecture_key(model), input_spec(samples[0]), self.backend, shapes_key(dynamic_shapes),
               _options_key(options))
        entry = self._cache.get(key)
        if entry is None:
            import refitcore

            eager = copy.deepcopy(model).eval()
            if self._engine_cache is None and self.cache_dir is not None:
                self._engine_cache = refitcore.EngineCache(self.cache_dir)
            try:
                backend = self.backend    # resolved once per session ('auto' probes the GPU): not compile time
                args, kwargs = call_of(samples[0])
                t0 = time.perf_counter()
                engine = refitcore.compile(eager, args=args, kwargs=kwargs, backend=backend,
                                           dynamic_shapes=dynamic_shapes, cache=self._engine_cache, **options)
            except refitcore.BackendUnavailableError as err:
                raise refitcore.BackendUnavailableError(
                    f"{err} (pytest: --trt-refit-backend={self.config.backend} was asked for; use "
                    f"--trt-refit-backend=auto or reference on this machine)") from err
            seconds = time.perf_counter() - t0
            label = name or type(model).__name__
            entry = CacheEntry(key[0], label, engine, eager, seconds, samples[0],
                               dict(options, dynamic_shapes=dynamic_shapes))
            self._cache[key] = entry
            build = {"model": label, "architecture": key[0][:16],
                     "inputs": [list(t.shape) for t in sample_tensors(samples[0])],
                     "backend": self.backend, "compile_s": seconds, "worker": self.worker,
                     "cache": {True: "hit", False: "miss"}.get(engine.cache_hit)}
            if engine.io.profiles is not None:
                build["profiles"] = engine.io.profiles.to_json()["profiles"]
            self.builds.append(build)
        return entry

    def _ready_for(self, entry: CacheEntry, paths: Sequence[str]) -> None:
        """An engine from the engine cache has no exported program; the fallback path converts one
        again, so export it when a fallback check first needs it (a session checking only the cached
        path never exports). A cached engine whose graph is not the model's is evicted and rebuilt."""
        import refitcore
        from refitcore.compiler.native import attach_exported_program

        if "fallback" not in paths or entry.engine.exported_program is not None:
            return
        t0 = time.perf_counter()
        try:
            attach_exported_program(entry.engine, entry.eager, entry.sample)
        except refitcore.ArchitectureMismatchError as err:
            if self._engine_cache is not None and entry.engine.cache_key:
                self._engine_cache.evict(entry.engine.cache_key)
            args, kwargs = call_of(entry.sample)
            entry.engine = refitcore.compile(entry.eager, args=args, kwargs=kwargs, backend=self.backend,
                                             cache=self._engine_cache, **entry.options)
            self.builds.append({"model": entry.name, "architecture": entry.key[:16], "backend": self.backend,
                                "compile_s": time.perf_counter() - t0, "worker": self.worker, "cache": "miss",
                                "inputs": [list(t.shape) for t in sample_tensors(entry.sample)], "note": err.problems[0]})
            return
        seconds = time.perf_counter() - t0
        entry.compile_seconds += seconds
        for b in reversed(self.builds):             # the export counts as part of this engine's build
            if b["model"] == entry.name:
                b["compile_s"] += seconds
                b["exported_on_hit"] = True
                break

    # -- checks --------------------------------------------------------------------------
    def _settings(self, paths, rtol, atol) -> tuple[tuple[str, ...], float, float]:
        paths = self.config.paths if paths is None else ((paths,) if isinstance(paths, str) else tuple(paths))
        bad = [p for p in paths if p not in ("cached", "fallback")]
        if bad or not paths:
            raise ValueError(f"paths={paths!r}: each path must be 'cached' or 'fallback'")
        return (paths, self.config.rtol if rtol is None else float(rtol),
                self.config.atol if atol is None else float(atol))

    def _prepare(self, model_or_factory, inputs, paths, rtol, atol, name, dynamic_shapes, compile_options):
        """(engine entry ready for ``paths``, samples, paths, rtol, atol) of one check call."""
        paths, rtol, atol = self._settings(paths, rtol, atol)
        samples = as_samples(inputs)
        entry = self._entry(model_or_factory, samples, name=name, dynamic_shapes=dynamic_shapes,
                            compile_options=compile_options)
        self._ready_for(entry, paths)
        return entry, samples, paths, rtol, atol

    def check(self, model_or_factory, weights, inputs, *, paths: str | Sequence[str] | None = None,
              rtol: float | None = None, atol: float | None = None, name: str | None = None,
              dynamic_shapes: Any = None, compile_options: Any = None) -> CheckOutcome:
        """Refit the session's engine for this model with ``weights`` through each selected path and
        compare it with eager PyTorch on ``inputs``; raise ``AssertionError`` with the mismatch report
        when any path disagrees.

        ``model_or_factory``: an ``nn.Module`` or a callable returning one (its weights do not
        matter). ``weights``: a state_dict, an ``nn.Module`` or a checkpoint path. ``inputs``: a
        tensor, a tuple of positional inputs or a ``refitcore.Inputs(*args, **kwargs)`` (one
        sample), or a list of samples; outputs may be any structure (dicts, ``ModelOutput``...) and
        are compared leaf by leaf, each named by its path. ``dynamic_shapes``: compile
        with input ranges (as :func:`refitcore.compile`; the first sample is the example, ``opt``),
        so that samples of other shapes inside the ranges check one engine. ``compile_options``:
        ``torch_executed_ops``, ``min_block_size``, ``strict`` for :func:`refitcore.compile`.

        Example::

            def test_refit(trt_refit):
                trt_refit.check(MyNet, MyNet().state_dict(), torch.randn(1, 3, 32, 32))
        """
        __tracebackhide__ = True
        from refitcore.refitting.prepare import load_for

        entry, samples, paths, rtol, atol = self._prepare(model_or_factory, inputs, paths, rtol, atol, name,
                                                          dynamic_shapes, compile_options)
        loaded = load_for(entry.engine, weights)
        t0 = time.perf_counter()
        outcome = run_check(entry, loaded, samples, paths=paths, rtol=rtol, atol=atol,
                            model=name or model_label(entry.eager), weights_label=describe_weights(weights))
        self._record(outcome, time.perf_counter() - t0)
        if not outcome.ok:
            raise AssertionError(outcome.report())
        return outcome

    def check_sequence(self, model_or_factory, sequence: Sequence[Any], inputs, *,
                       paths: str | Sequence[str] | None = None, rtol: float | None = None,
                       atol: float | None = None, name: str | None = None,
                       dynamic_shapes: Any = None, compile_options: Any = None) -> list[CheckOutcome]:
        """Refit one engine with each weight set of ``sequence`` in turn (per path), comparing with
        eager at every step; weights that repeat an earlier step must reproduce that step's outputs
        bit for bit (A -> B -> A). Raises ``AssertionError`` with the report of every failing step."""
        __tracebackhide__ = True
        from refitcore.refitting.prepare import load_for

        entry, samples, paths, rtol, atol = self._prepare(model_or_factory, inputs, paths, rtol, atol, name,
                                                          dynamic_shapes, compile_options)
        states = [load_for(entry.engine, w) for w in sequence]
        labels = [describe_weights(w) for w in sequence]
        t0 = time.perf_counter()
        outcomes = run_sequence(entry, states, samples, paths=paths, rtol=rtol, atol=atol,
                                model=name or model_label(entry.eager), labels=labels)
        per = (time.perf_counter() - t0) / max(1, len(outcomes))
        for o in outcomes:
            self._record(o, per)
        bad = [o for o in outcomes if not o.ok]
        if bad:
            head = getattr(sequence, "describe", lambda: f"a sequence of {len(states)} weight sets")()
            raise AssertionError(f"refit sequence {head}: {len(bad)} of {len(outcomes)} step(s) failed\n"
                                 + "\n".join(o.report() for o in bad))
        return outcomes

    # -- records -------------------------------------------------------------------------
    def _record(self, outcome: CheckOutcome, seconds: float) -> None:
        share = seconds / max(1, len(outcome.paths))
        # Outputs that pass while the two mappings disagree fail every path of the check.
        audit_failed = outcome.mapping_audit is not None and not outcome.mapping_audit.ok
        only_audit = audit_failed and all(p.ok for p in outcome.paths)
        for p in outcome.paths:
            worst = p.worst
            rec = {"test": self.current_test, "model": outcome.model, "kind": outcome.kind, "path": p.path,
                   "ok": p.ok and not only_audit, "seconds": round(share, 6), "backend": outcome.backend,
                   "worker": self.worker}
            if worst is not None:
                rec.update(max_abs=worst.max_abs, max_rel=worst.max_rel, norm_rel=worst.norm_rel,
                           min_rtol=worst.min_rtol, min_atol=worst.min_atol)
            if worst is not None and worst.name:
                rec["output"] = output_label(outcome, worst)     # the worst output's pytree path
            bad_outputs = failing_outputs(outcome, p)
            if bad_outputs:
                rec["failed_outputs"] = bad_outputs
            if p.error is not None:
                rec["error"] = p.error.splitlines()[0]
            if outcome.culprit is not None:
                rec["culprit"] = outcome.culprit.name
            if outcome.trt_share is not None:
                rec["trt_share"] = outcome.trt_share
            if outcome.architecture is not None:
                rec["architecture"] = outcome.architecture
            self.records.append(rec)
        if outcome.layers:
            self.layers.append({"test": self.current_test, "model": outcome.model, "weights": outcome.layers})
        if not outcome.ok:
            failed = [p.path for p in outcome.paths if not p.ok] or [p.path for p in outcome.paths]
            self.failures.append({"test": self.current_test, "model": outcome.model, "kind": outcome.kind,
                                  "paths": failed, "mappings_disagree": audit_failed,
                                  "outputs": list(dict.fromkeys(n for p in outcome.paths for n in failing_outputs(outcome, p))),
                                  "culprit": outcome.culprit.name if outcome.culprit else None,
                                  "report": outcome.report()})

    def export(self) -> dict:
        """Everything the reports need, JSON-serialisable (sent from pytest-xdist workers)."""
        return {"records": self.records, "failures": self.failures, "builds": self.builds,
                "outcomes": dict(self.outcomes), "layers": self.layers,
                "collection": {k: v for k, v in self.collection.items() if k != "files"},
                "backend": self._backend[0] if self._backend else None,
                "backend_reason": self._backend[1] if self._backend else None,
                "engine_cache": self.cache_note}


def _model_from(model_or_factory: Any):
    import torch

    if isinstance(model_or_factory, torch.nn.Module):
        return model_or_factory.eval()
    if callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the model factory {model_or_factory!r} returned {type(model).__name__}, "
                            f"not a torch.nn.Module")
        return model.eval()
    raise TypeError(f"expected an nn.Module or a callable returning one, got {type(model_or_factory).__name__}")


def _hashable(model_or_factory):
    """The key under which a factory's model is remembered; None for modules and unhashable callables."""
    import torch

    if isinstance(model_or_factory, torch.nn.Module):
        return None
    try:
        hash(model_or_factory)
    except TypeError:
        return None
    return model_or_factory


def worker_id() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")

