"""The engine provider of a ``pytest --trt-refit`` session: backend resolution, the compile cache
and the engine cache across sessions.

One :class:`EngineProvider` per pytest process (each pytest-xdist worker has its own), built in
``pytest_configure`` and kept in ``config.stash``. Engines are compiled once per session per
(architecture fingerprint, input spec, backend, shape ranges, compile options) and refitted in
place by every check, so a worker builds each architecture at most once. Across sessions (and
between workers), engines persist in refitcore's engine cache (pytest's cache directory by
default): a later session loads an engine and refits it with the model's weights instead of
compiling it. Every engine built or loaded is a :class:`~pytest_trtrefit.records.BuildRecord`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from .checks import as_samples, call_of, sample_tensors
from .config import DEFAULT_COMPILER, TORCH_TENSORRT, RefitConfig
from .records import BuildRecord

__all__ = ["EngineProvider", "CacheEntry", "architecture_key", "input_spec", "shapes_key", "compile_kwargs",
           "COMPILE_OPTIONS"]

COMPILE_OPTIONS = ("torch_executed_ops", "min_block_size", "strict")


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


class EngineProvider:
    """The session's engines: :meth:`engine_for` (and :meth:`entry`, what a check refits), the
    backend they run on (``auto`` resolved once, on first use) and where they persist."""

    def __init__(self, config: RefitConfig, *, worker: str | None = None):
        self.config = config
        self.worker = worker
        self.builds: list[BuildRecord] = []
        self.cache_dir: str | None = None       # where engines persist across sessions (None: nowhere)
        self.cache_note = "off"
        self._cache: dict[tuple, CacheEntry] = {}
        self._backend: tuple[str, str] | None = None
        self._factory_models: dict = {}
        self._engine_cache = None
        self._unkeyed: dict[int, Any] = {}      # models whose architecture key is incomplete: kept by identity
        self.compilers: dict[str, str] = {}      # compiler -> its version, for each compiler that built an engine

    # -- compiler ------------------------------------------------------------------------
    def compiler_unavailable(self, compiler: str) -> str | None:
        """Why ``compiler`` cannot build engines here (Torch-TensorRT not installed, an untested version,
        a missing entry point), None when it can."""
        if compiler == DEFAULT_COMPILER:
            return None
        from refitcore.engine import torch_tensorrt_api

        usable, why = torch_tensorrt_api.available()
        return None if usable else f"compiler={compiler!r}: {why}"

    def compiler_version(self, compiler: str) -> str:
        """The version of ``compiler`` that builds this session's engines (refitcore's, or the installed
        Torch-TensorRT's)."""
        if compiler not in self.compilers:
            if compiler == DEFAULT_COMPILER:
                from refitcore._version import __version__ as version
            else:
                from refitcore.engine import torch_tensorrt_api

                version = torch_tensorrt_api.load().version
            self.compilers[compiler] = version
        return self.compilers[compiler]

    def require_compiler(self) -> None:
        """Raise ``pytest.UsageError`` naming the reason when the session's compiler cannot run as asked:
        ``--trt-refit-compiler=torch_tensorrt`` without a usable Torch-TensorRT, with
        ``--trt-refit-backend=tensorrt`` (refitcore does not drive Torch-TensorRT's own GPU engines yet)
        or with the cached path (Torch-TensorRT 2.13 on has none)."""
        cfg = self.config
        if cfg.compiler == DEFAULT_COMPILER:
            return
        import pytest

        flag = f"--trt-refit-compiler={cfg.compiler}"
        why = self.compiler_unavailable(cfg.compiler)
        if why is not None:
            raise pytest.UsageError(f"{flag}: {why.split(': ', 1)[1]}")
        if cfg.backend == "tensorrt":
            raise pytest.UsageError(f"{flag} with --trt-refit-backend=tensorrt: the plugin does not check "
                                    f"Torch-TensorRT's own GPU engines yet (refitcore.compile(..., "
                                    f"compiler='torch_tensorrt', backend='tensorrt') builds them); use "
                                    f"--trt-refit-backend=auto or reference (Torch-TensorRT's network run by the "
                                    f"CPU reference interpreter)")
        if "cached" in cfg.paths:
            from refitcore.engine.torch_tensorrt_api import WEIGHT_MAP_CACHE_REMOVED

            raise pytest.UsageError(f"{flag} with --trt-refit-paths={'both' if len(cfg.paths) == 2 else 'cached'}: "
                                    + WEIGHT_MAP_CACHE_REMOVED.format(version=self.compiler_version(cfg.compiler))
                                    .replace("path='fallback'", "--trt-refit-paths=fallback")
                                    .replace(" or path='auto'", ""))

    # -- backend -------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend the checks run on ('reference' or 'tensorrt'); 'auto' is resolved on first use."""
        return self._resolve()[0]

    @property
    def backend_reason(self) -> str:
        return self._resolve()[1]

    @property
    def resolved(self) -> tuple[str, str] | None:
        """(backend, why) once resolved, else None (nothing resolved it: no check ran here)."""
        return self._backend

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

    # -- the engine cache across sessions --------------------------------------------------
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

    # -- the compile cache -----------------------------------------------------------------
    def engine_for(self, model_or_factory, inputs, *, name: str | None = None, dynamic_shapes: Any = None,
                   compile_options: Any = None, precision: str | None = None, compiler: str | None = None):
        """The session's engine for this architecture and input spec (compiled on first use, or loaded
        from the engine cache); ``inputs``: a sample (tensor, tuple of positional inputs,
        ``refitcore.Inputs``) or a list whose first sample is the example; ``dynamic_shapes``: input
        ranges as :func:`refitcore.compile` takes them (the first sample is the example, ``opt``);
        ``compile_options``: ``torch_executed_ops``, ``min_block_size``, ``strict`` for
        :func:`refitcore.compile` (part of the cache key); ``precision``: 'fp32', 'fp16' or 'bf16'
        (None: ``--trt-refit-precision``); ``compiler``: 'refitcore' or 'torch_tensorrt' (None:
        ``--trt-refit-compiler``). When the session checks the fallback path it has its
        exported program, so both refit paths work on it."""
        return self.entry(model_or_factory, as_samples(inputs), paths=self.config.paths_for(compiler), name=name,
                          dynamic_shapes=dynamic_shapes, compile_options=compile_options, precision=precision,
                          compiler=compiler).engine

    def entry(self, model_or_factory, samples: Sequence[Any], *, paths: Sequence[str], name: str | None = None,
              dynamic_shapes: Any = None, compile_options: Any = None, precision: str | None = None,
              compiler: str | None = None) -> CacheEntry:
        """The compile-cache entry for this model and ``samples`` (the first is the example), ready to
        be refitted through ``paths``."""
        entry = self._entry(model_or_factory, samples, name=name, dynamic_shapes=dynamic_shapes,
                            compile_options=compile_options, precision=precision or self.config.precision,
                            compiler=compiler or self.config.compiler)
        self._ready_for(entry, paths)
        return entry

    def _entry(self, model_or_factory, samples, *, name: str | None, dynamic_shapes: Any,
               compile_options: Any, precision: str, compiler: str) -> CacheEntry:
        model = self._factory_models.get(_hashable(model_or_factory))
        if model is None:
            model = _model_from(model_or_factory)
            if _hashable(model_or_factory) is not None:  # a factory: build its model once per session
                self._factory_models[_hashable(model_or_factory)] = model
        options = compile_kwargs(compile_options)
        if precision != "fp32":   # compile's default: fp32 engines keep the keys they had
            options["precision"] = precision
        if compiler != DEFAULT_COMPILER:   # refitcore's engines keep the keys they had
            options["compiler"] = compiler
        backend = self._backend_for(compiler)
        key = (self._architecture_key(model), input_spec(samples[0]), backend, shapes_key(dynamic_shapes),
               _options_key(options))
        entry = self._cache.get(key)
        if entry is None:
            import refitcore

            eager = copy.deepcopy(model).eval()
            if self._engine_cache is None and self.cache_dir is not None:
                self._engine_cache = refitcore.EngineCache(self.cache_dir)
            # Torch-TensorRT's engines are not saved (their PyTorch segments are code): no engine cache.
            cache = self._engine_cache if compiler == DEFAULT_COMPILER else None
            try:
                args, kwargs = call_of(samples[0])
                t0 = time.perf_counter()
                engine = refitcore.compile(eager, args=args, kwargs=kwargs, backend=backend,
                                           dynamic_shapes=dynamic_shapes, cache=cache,
                                           verify_inputs=self._verify(samples) if cache is not None else None,
                                           **options)
            except refitcore.BackendUnavailableError as err:
                raise refitcore.BackendUnavailableError(
                    f"{err} (pytest: --trt-refit-backend={self.config.backend} was asked for; use "
                    f"--trt-refit-backend=auto or reference on this machine)") from err
            seconds = time.perf_counter() - t0
            label = name or type(model).__name__
            entry = CacheEntry(key[0], label, engine, eager, seconds, samples[0],
                               dict(options, dynamic_shapes=dynamic_shapes))
            self._cache[key] = entry
            self.builds.append(BuildRecord(
                label, architecture=key[0][:16], inputs=[list(t.shape) for t in sample_tensors(samples[0])],
                backend=backend, compile_s=seconds, worker=self.worker,
                cache={True: "hit", False: "miss"}.get(engine.cache_hit),
                profiles=engine.io.profiles.to_json()["profiles"] if engine.io.profiles is not None else None,
                compiler=compiler, compiler_version=self.compiler_version(compiler)))
        return entry

    def _backend_for(self, compiler: str) -> str:
        """The backend an engine of ``compiler`` runs on: the session's, except that Torch-TensorRT's
        network runs on the reference interpreter under ``--trt-refit-backend=auto`` (refitcore does not
        drive Torch-TensorRT's own GPU engines yet)."""
        if compiler == TORCH_TENSORRT and self.config.backend == "auto":
            self._resolve()   # the session's backend, for its reports
            return "reference"
        return self.backend   # resolved once per session ('auto' probes the GPU): not compile time

    def _architecture_key(self, model) -> str:
        """The session's key of ``model``'s architecture: :func:`architecture_key`, and the model's
        identity too when that fingerprint cannot see everything its ``forward`` reads (the model is
        then kept alive, so that its identity is not reused)."""
        from refitcore.cache.key import architecture

        arch = architecture(model)
        if arch.complete:
            return arch.digest
        self._unkeyed[id(model)] = model
        return f"{arch.digest}-{id(model)}"

    def _verify(self, samples: Sequence[Any]):
        """A hit of the engine cache is checked against eager PyTorch on the test's samples."""
        return list(samples) if self._engine_cache is not None else None

    def _ready_for(self, entry: CacheEntry, paths: Sequence[str]) -> None:
        """An engine from the engine cache has no exported program; the fallback path converts one
        again, so export it when a fallback check first needs it (a session checking only the cached
        path never exports). A cached engine whose graph is not the model's is evicted and rebuilt."""
        import refitcore
        from refitcore.compiler.native import attach_exported_program

        if "fallback" not in paths:
            return
        # A hybrid engine (its model does not export whole) holds one engine per compiled submodule:
        # each converts again from its own exported program.
        parts = getattr(entry.engine.impl, "engines", None)
        missing = [(entry.engine, entry.eager)] if parts is None else \
            [(sub, entry.eager.get_submodule(path)) for path, sub in parts.items()]
        missing = [(engine, module) for engine, module in missing if engine.exported_program is None]
        if not missing:
            return
        t0 = time.perf_counter()
        try:
            for engine, module in missing:
                attach_exported_program(engine, module)
        except refitcore.ArchitectureMismatchError as err:
            if self._engine_cache is not None and entry.engine.cache_key:
                self._engine_cache.evict(entry.engine.cache_key)
            args, kwargs = call_of(entry.sample)
            entry.engine = refitcore.compile(entry.eager, args=args, kwargs=kwargs, backend=self.backend,
                                             cache=self._engine_cache, verify_inputs=self._verify([entry.sample]),
                                             **entry.options)
            self.builds.append(BuildRecord(
                entry.name, architecture=entry.key[:16], backend=self.backend, compile_s=time.perf_counter() - t0,
                worker=self.worker, cache="miss", inputs=[list(t.shape) for t in sample_tensors(entry.sample)],
                note=err.problems[0], compiler=DEFAULT_COMPILER,
                compiler_version=self.compiler_version(DEFAULT_COMPILER)))
            return
        seconds = time.perf_counter() - t0
        entry.compile_seconds += seconds
        for b in reversed(self.builds):             # the export counts as part of this engine's build
            if b.model == entry.name:
                b.compile_s += seconds
                b.exported_on_hit = True
                break


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
