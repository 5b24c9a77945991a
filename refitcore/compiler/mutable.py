"""``MutableEngine``: a compiled model that follows its ``nn.Module``. Callable like the model; before
each call it refits when the module's weights changed and recompiles when its architecture did,
so it never runs stale weights (Torch-TensorRT's ``MutableTorchTensorRTModule`` plays this role
there).

Detecting a weight change (``check=``):

- ``"content"`` (the default): before each call every parameter and buffer is compared bit for bit
  with a copy of the values the engine was last refitted with, so every route of an edit is seen:
  ``p.data.mul_(2)``, ``p.data.copy_(new)``, ``bn.running_mean.data.add_(1)``, a write through a
  numpy view, ``load_state_dict``. It reads the model's weights and the copy once per call and
  holds the copy (benchmarks/bench_mutable_check.py measures it).
- ``"version"``: only tensors whose signature moved are compared: the ``_version`` counter (bumped
  by in-place writes through the tensor itself: ``load_state_dict``, ``nn.init.*_``, ``p.mul_(2)``
  under ``no_grad``), ``data_ptr`` (``p.data = ...``), identity, shape and dtype. Cheaper, but
  writes that do not bump the counter (through ``p.data``, a numpy view) are missed: the engine
  then runs stale weights.

In both modes a write that changed nothing (``p.mul_(1)``) refits nothing, and an architecture change
(a replaced layer, another attribute, private or not, or code:
:func:`refitcore.cache.key.architecture_fingerprint`) recompiles, through the engine cache when one
is given.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore.backends import choose_backend
from refitcore.cache.key import architecture_fingerprint
from refitcore.cache.store import as_cache
from refitcore.capture.shapes import nest_dynamic_shapes
from refitcore.capture.structured import Inputs, leaf_names, spec_to_json
from refitcore.compiler.native import call_inputs, compile as compile_model
from refitcore.engine.refittable import RefittableEngine, load as load_engine
from refitcore.errors import ArchitectureMismatchError, RefitError
from refitcore.options import check_tolerance
from refitcore.refitting.refit import RefitResult, refit

__all__ = ["MutableEngine", "CHECKS"]

CHECKS = ("content", "version")
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

log = logging.getLogger("refitcore")


def _signature(t: torch.Tensor) -> tuple:
    return (id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype)


def _same_bits(t: torch.Tensor, copy: torch.Tensor) -> bool:
    """``t`` holds exactly the bits of ``copy`` (a NaN equals itself, -0.0 differs from 0.0)."""
    t = t.detach()
    if t.shape != copy.shape or t.dtype != copy.dtype or t.device != copy.device:
        return False
    ints = _INTS.get(t.element_size())
    if ints is None:
        return torch.equal(t, copy)
    t, copy = t.view(ints), copy.view(ints)
    if t.device.type == "cpu" and not (t.is_conj() or t.is_neg()):
        # numpy compares CPU memory ~15x faster than torch.equal (measured on resnet50's 320 tensors)
        return bool(np.array_equal(t.numpy(), copy.numpy()))
    return torch.equal(t, copy)


class MutableEngine:
    """Run ``model`` through a refittable engine that stays in step with ``model``.

    Inputs: as :func:`refitcore.compile` takes them: ``example_inputs`` (a tensor or a tuple of
    positional inputs) or ``args=``/``kwargs=``, any pytree of tensors, Python scalars and None;
    ``dynamic_shapes=`` (and any other keyword of :func:`refitcore.compile`, in ``options``) is passed
    to it; ``precision`` None (default) is the model's own at each compile (a half or bfloat16 model
    compiles at fp16/bf16: :func:`refitcore.dtypes.model_precision`). Before each call the call's
    inputs are compared with the compiled ones: another structure, another non-tensor value (a
    constant of the graph) or another dtype recompiles with the call's inputs as the new example;
    another tensor shape recompiles too, except on an engine with ``dynamic_shapes``: a shape inside
    its ranges runs as it is, and one outside them is refused with
    :class:`refitcore.errors.ShapeRangeError` naming the input, the dimension and the range (the ranges
    are the caller's choice: widening them silently would compile another engine than the one asked for).

    ``check``: how weight edits are detected before each call: ``"content"`` (default; every
    tensor compared with the values the engine holds, whatever route the edit took) or
    ``"version"`` (cheaper: version counters; misses writes through ``.data`` or numpy views).

    ``verify`` (default True): after every refit and recompile, compare the engine with eager
    ``model`` on the example inputs; a cached refit that disagrees is redone through the fallback
    path, and one that still disagrees raises :class:`refitcore.RefitError` (and the engine is not
    run until a later call refits it successfully); ``rtol``/``atol``: None (default) takes the engine
    precision's (:data:`refitcore.options.PRECISION_TOLERANCES`). Counters: ``refits``, ``recompiles``;
    ``last_action`` ('compile', 'load', 'refit', 'recompile' or 'none'); ``last_refit`` (a
    :class:`refitcore.RefitResult`).

    :meth:`save` writes the engine (with its weights, or weightless as the engine cache stores it);
    :meth:`load` reads it back for a model (the file holds no code), refitted from the model's
    weights before its first run.

    Example::

        fast = refitcore.MutableEngine(model, torch.randn(1, 3, 64, 64), backend="reference")
        fast(x)                                      # compiled
        model.load_state_dict(torch.load("ft.pt", weights_only=True))
        fast(x)                                      # refitted first, then run
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
                 args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
                 dynamic_shapes: Any = None, backend: str = "auto", precision: str | None = None, cache: Any = None,
                 verify: bool = True, rtol: float | None = None, atol: float | None = None,
                 check: str = "content", **options: Any):
        self._setup(model, call_inputs(example_inputs, args, kwargs), check=check, backend=backend, precision=precision,
                    cache=cache, verify=verify, rtol=rtol, atol=atol,
                    options=dict(options, dynamic_shapes=dynamic_shapes))
        self.last_action = "compile"
        self._compile()

    def _setup(self, model: torch.nn.Module, call: tuple[tuple, dict], *, check: str, backend: str,
               precision: str | None, cache: Any, verify: bool, rtol: float | None, atol: float | None,
               options: dict[str, Any]) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if check not in CHECKS:
            raise ValueError(f"check={check!r}: give 'content' (every weight compared before each call) or "
                             f"'version' (version counters only; misses writes through .data or numpy views)")
        self.check = check
        self.model = model
        self.args, self.kwargs = call
        self.backend, _ = choose_backend(backend)
        self.precision = precision
        self.cache = as_cache(cache)
        self.options = options
        # None: the engine precision's default, decided at each refit (refitcore.refitting.verify.engine_tolerances)
        self.verify = bool(verify)
        self.rtol = None if rtol is None else check_tolerance(rtol, "rtol")
        self.atol = None if atol is None else check_tolerance(atol, "atol")
        self.refits = 0
        self.recompiles = 0
        self.last_refit: RefitResult | None = None
        self._signatures: dict[str, tuple] = {}
        self._values: dict[str, torch.Tensor] = {}

    @property
    def example_inputs(self) -> Inputs:
        """The inputs the engine was compiled (or loaded) for, and verified on."""
        return Inputs(*self.args, **self.kwargs)

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, weights: bool = True) -> None:
        """Write the engine to one file (:meth:`refitcore.RefittableEngine.save`); ``weights=False``
        writes it weightless (structure and weight map only, as the engine cache stores it). The
        engine is brought in step with the model first, so the weights written are the model's."""
        self.sync()
        self.engine.save(path, weights=weights)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor |
             None = None, *, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
             dynamic_shapes: Any = None, cache: Any = None, verify: bool = True, rtol: float | None = None,
             atol: float | None = None, check: str = "content", **options: Any) -> MutableEngine:
        """A MutableEngine of ``model`` from a file :meth:`save` (or ``RefittableEngine.save``) wrote,
        with or without its weights. The file holds no code, so ``model`` is required: the engine is
        refitted from its weights before its first run, and recompiled from it when its architecture
        or the inputs call for it (with the file's compile options and dynamic ranges unless given).
        The example inputs (verification, recompiles) default to the file's input structure and shapes
        with random values (zeros for integer inputs)."""
        fixed = sorted({"backend", "precision"} & set(options))
        if fixed:
            raise TypeError(f"MutableEngine.load: {', '.join(fixed)} come from the file (recompile with "
                            f"MutableEngine(model, ...) for others)")
        engine = load_engine(path)
        keys = list(model.state_dict().keys())
        if engine.state_keys and engine.state_keys != keys:
            only_file = [k for k in engine.state_keys if k not in keys]
            only_model = [k for k in keys if k not in engine.state_keys]
            raise ArchitectureMismatchError([f"{path}: the engine was compiled from a model with other state_dict "
                                             f"keys (only in the file: {only_file[:5]}, only in the model: "
                                             f"{only_model[:5]})"])
        recorded = engine.options
        call = (call_inputs(example_inputs, args, kwargs) if example_inputs is not None or args is not None or kwargs
                else _example_of(engine))
        profiles = engine.io.profiles
        if dynamic_shapes is None and profiles is not None and profiles.dynamic:
            dynamic_shapes = nest_dynamic_shapes(profiles.torch_dynamic_shapes(), model, *call)
        compile_options = {k: v for k, v in recorded.to_json().items() if k not in ("backend", "precision")}
        compile_options.update(options, dynamic_shapes=dynamic_shapes)
        self = cls.__new__(cls)
        self._setup(model, call, check=check, backend=engine.backend, precision=recorded.precision, cache=cache,
                    verify=verify, rtol=rtol, atol=atol, options=compile_options)
        self.engine = engine
        self.architecture = architecture_fingerprint(model)
        self._inputs = _describe(call)
        self.last_action = "load"      # no values recorded: the first sync refits every weight from the model
        return self

    # -- state ---------------------------------------------------------------------------
    def _compile(self) -> None:
        with torch.no_grad():
            self.engine = compile_model(self.model, args=self.args, kwargs=self.kwargs, backend=self.backend,
                                        precision=self.precision, cache=self.cache,
                                        verify_inputs=[self.example_inputs] if self.verify else None, **self.options)
        self.architecture = architecture_fingerprint(self.model)
        self._inputs = _describe((self.args, self.kwargs))
        tensors = self.model.state_dict(keep_vars=True)
        self._signatures = {k: _signature(t) for k, t in tensors.items()}
        self._values = {k: t.detach().clone() for k, t in tensors.items()}

    def _changed(self) -> list[str]:
        """Keys whose values differ from those the engine holds (cheap signature check first)."""
        tensors = self.model.state_dict(keep_vars=True)
        if self.check == "content":
            return [k for k, t in tensors.items() if k not in self._values or not _same_bits(t, self._values[k])]
        moved = [k for k, t in tensors.items() if self._signatures.get(k) != _signature(t)]
        changed = [k for k in moved if k not in self._values or not _same_bits(tensors[k], self._values[k])]
        for k in moved:
            if k not in changed:              # written, but to the same values: nothing to refit
                self._signatures[k] = _signature(tensors[k])
        return changed

    def sync(self) -> str:
        """Bring the engine in step with the model: 'none', 'refit' or 'recompile'."""
        arch = architecture_fingerprint(self.model)
        if arch != self.architecture:
            log.warning("refitcore: MutableEngine: the model's architecture changed (%s -> %s); recompiling",
                        self.architecture[:12], arch[:12])
            self._compile()
            self.recompiles += 1
            self.last_action = "recompile"
            return "recompile"
        changed = self._changed()
        if not changed:
            self.last_action = "none"
            return "none"
        self._refit(changed)
        self.refits += 1
        self.last_action = "refit"
        return "refit"

    def _refit(self, changed: list[str]) -> None:
        was_training = self.model.training
        try:
            result = refit(self.engine, self.model, path="auto" if self.verify else "cached", in_place=True,
                           verify_inputs=[self.example_inputs] if self.verify else None, rtol=self.rtol,
                           atol=self.atol, reference_model=self.model)
        finally:
            self.model.train(was_training)
        self.last_refit = result
        if not result:
            # The signatures stay as they were: the next call tries again instead of running this engine.
            raise RefitError([f"after refitting {len(changed)} changed tensor(s), the engine disagrees with eager "
                              f"PyTorch:\n{result}"], rolled_back=result.restored)
        log.info("refitcore: MutableEngine: refitted %d changed tensor(s) (%s) via the %s path", len(changed),
                 ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else ""), result.path)
        tensors = self.model.state_dict(keep_vars=True)
        for k in changed:
            self._signatures[k] = _signature(tensors[k])
            self._values[k] = tensors[k].detach().clone()

    # -- running -------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any):
        if kwargs.keys() == self.kwargs.keys():
            kwargs = {k: kwargs[k] for k in self.kwargs}      # the compiled keyword order
        why = self._inputs_differ(args, kwargs)
        if why:
            log.warning("refitcore: MutableEngine: %s; recompiling", why)
            self.args, self.kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), (tuple(args), kwargs))
            self._compile()
            self.recompiles += 1
            self.last_action = "recompile"
        else:
            self.sync()
        return self.engine(*args, **kwargs)

    def _inputs_differ(self, args: tuple, kwargs: dict) -> str | None:
        """Why a call's inputs need another engine (None: this one runs them). Raises
        :class:`ShapeRangeError` for tensor shapes outside the ranges of an engine with dynamic shapes."""
        spec, leaves = _describe((args, kwargs))
        compiled_spec, compiled = self._inputs
        if spec != compiled_spec:
            return f"the inputs' structure {spec} differs from the compiled {compiled_spec}"
        names = leaf_names(spec_to_json(spec))
        for name, (kind, what, value), (c_kind, c_what, c_value) in zip(names, leaves, compiled):
            if kind != c_kind or what != c_what:
                return (f"input {name} is {_leaf_text(kind, what, value)} where the engine was compiled for "
                        f"{_leaf_text(c_kind, c_what, c_value)}")
            if kind == "value" and not (value is c_value or value == c_value):
                return (f"input {name} is {value!r} where the engine was compiled for {c_value!r} "
                        f"(a constant of the graph)")
        shapes = [value for kind, _, value in leaves if kind == "tensor"]
        compiled_shapes = [value for kind, _, value in compiled if kind == "tensor"]
        if shapes == compiled_shapes:
            return None
        profiles = self.engine.io.profiles
        if profiles is None or not profiles.dynamic:
            return (f"input shapes {[list(s) for s in shapes]} differ from the compiled "
                    f"{[list(s) for s in compiled_shapes]}")
        profiles.profile_for(shapes)            # inside the ranges, or refused naming input, dimension and range
        return None

    def __repr__(self) -> str:
        return (f"MutableEngine({type(self.model).__name__}, backend={self.backend!r}, refits={self.refits}, "
                f"recompiles={self.recompiles})")


def _describe(call: tuple[tuple, dict]) -> tuple[Any, list[tuple[str, Any, Any]]]:
    """(TreeSpec, [(kind, dtype or type, shape or value)]) of one call's inputs: what decides whether
    an engine runs them."""
    leaves, spec = pytree.tree_flatten(call)
    return spec, [("tensor", leaf.dtype, tuple(leaf.shape)) if isinstance(leaf, torch.Tensor)
                  else ("value", type(leaf), leaf) for leaf in leaves]


def _leaf_text(kind: str, what: Any, value: Any) -> str:
    return f"a {str(what).replace('torch.', '')} tensor" if kind == "tensor" else f"{value!r}"


def _example_of(engine: RefittableEngine) -> tuple[tuple, dict]:
    """Example inputs of a loaded engine: its recorded call structure and constants, at its example
    shapes, with random floating-point tensors (zeros for the others)."""
    gen = torch.Generator().manual_seed(0)

    def fill(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t

    if engine.structure is None:
        args: tuple = tuple(torch.zeros(shape, dtype=getattr(torch, dtype))
                            for shape, dtype in zip(engine.io.input_shapes, engine.io.input_dtypes))
        return tuple(fill(t) for t in args), {}
    args, kwargs = engine.example_call()
    return pytree.tree_map_only(torch.Tensor, fill, (args, kwargs))
