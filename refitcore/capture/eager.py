"""The eager reference model: PyTorch holding given weights, to compare a refitted engine with.

One loader for every caller (``refit``'s verification, the gate, the plugin's checks, the fallback
path's re-export). The template comes from, in order: the model the caller passes (an nn.Module,
an ExportedProgram, a factory callable or a ``'module:callable'`` string the caller typed), the
engine's exported program, or the engine's recorded factory when the caller trusts it.

Trust: a bundle loaded from a file may *record* a model factory, but a file is data. The recorded
factory is never imported unless the caller says ``trust_factory=True`` (CLI: ``--trust-factory``);
otherwise :class:`UntrustedFactoryError` says how to pass the model instead.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from refitcore.errors import RefitCoreError

__all__ = ["eager_model", "skeleton", "parameters_on_meta", "widen_in_forward", "UntrustedFactoryError",
           "EagerModelError"]


class EagerModelError(RefitCoreError, ValueError):
    """No eager model can be built, or the weights do not fit it (the message says what to pass)."""


class UntrustedFactoryError(EagerModelError):
    """The engine only records a model factory (it came from a file) and the caller did not trust it."""

    def __init__(self, factory: str):
        self.factory = factory
        super().__init__(
            f"this engine was loaded from a file that records the model factory {factory!r}; a file is data, so "
            f"refitcore does not import what it names unless asked: pass the model (reference_model=, or the new "
            f"weights as an nn.Module), or trust_factory=True if you trust the file "
            f"(CLI: --model {factory} or --trust-factory)")


def eager_model(state: Mapping[str, torch.Tensor], *, model: Any = None, engine: Any = None,
                trust_factory: bool = False, keep_missing: bool = False, share: bool = False,
                widen: bool = True) -> torch.nn.Module:
    """An eager model holding ``state`` (a state_dict), never sharing storage the caller can see
    unless ``share``: the caller hands ``state``'s tensors over (it read them from a file for
    this model and never writes them), and the model keeps them as they are, without a copy;
    narrower ones (bfloat16 for a float32 model) are widened per module as it runs
    (:func:`widen_in_forward`), except in a ``GraphModule`` (its graph reads every tensor itself:
    they are widened whole, and with ``widen=False``, which a model to export needs: its graph must
    see the model's own dtypes).

    ``model``: an nn.Module (copied: the original is never written), an ExportedProgram, a callable
    returning an nn.Module, or a ``'module:callable'`` string (imported: the caller named it).
    Without it, ``engine.exported_program``, else ``engine.model_factory`` when ``trust_factory``.
    Values take the template's dtypes; the state_dict's ``_metadata`` (per-module versions) is
    kept, else the template's. ``keep_missing``: keys ``state`` lacks keep the template's values
    (else they are an error naming them). A factory builds the template with its parameters on
    the ``meta`` device (:func:`parameters_on_meta`: no memory, no random initialisation), which
    ``state`` then fills; a factory that cannot build that way, or a template whose parameters
    ``state`` does not all give, is built again the ordinary way.

    Example::

        reference = refitcore.capture.eager.eager_model(new_state, engine=engine, trust_factory=True)
    """
    for skeleton in (True, False):
        module = _template(model, engine, trust_factory, skeleton=skeleton)
        own = module.state_dict()
        missing = [k for k in own if k not in state]
        if missing and not keep_missing:
            raise EagerModelError(f"the new weights lack {missing[:5]}" + (f" (+{len(missing) - 5} more)"
                                  if len(missing) > 5 else "") + " needed to run the eager model")
        # assign=True: the template may share its tensors with an exported program or with the model
        # the caller passed; assigning fresh tensors (cast to the template's dtypes, as an in-place
        # load_state_dict would) leaves those untouched. Tensors handed over (``share``) are assigned
        # as they are where their dtype is the template's.
        # Narrower floating-point tensors handed over (a bfloat16 checkpoint, a float32 model) stay
        # narrow in a module that runs its own forward, and are widened there per call
        # (:func:`widen_in_forward`): one module's worth of float32 at a time, not the model's.
        narrow = {k: v.dtype for k, v in own.items() if share and widen and k in state and _widens(state[k], v.dtype)
                  and not isinstance(module, torch.fx.GraphModule)}
        values = collections.OrderedDict(
            (k, state[k].detach() if k in narrow else _value(state[k], v.dtype, share) if k in state
             else v.detach().clone()) for k, v in own.items())
        metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)
        if metadata is not None:
            values._metadata = metadata  # type: ignore[attr-defined]  # torch's state_dict convention (load_state_dict reads it)
        try:
            module.load_state_dict(values, strict=True, assign=True)
        except RuntimeError as err:
            raise EagerModelError(f"the eager model cannot load the new weights: {str(err).strip()}") from err
        # A tensor still on meta: a parameter the weights do not give, or a buffer computed from a
        # parameter at construction. The skeleton cannot serve: the model is built the ordinary way.
        if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
            break
    if narrow:
        widen_in_forward(module, narrow)
    return module if isinstance(module, torch.fx.GraphModule) else module.eval()


def _widens(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t`` reads exactly as ``dtype`` once widened (float16/bfloat16 as float32/64)."""
    return (t.is_floating_point() and dtype.is_floating_point and t.dtype != dtype
            and torch.promote_types(t.dtype, dtype) == dtype and t.dtype.itemsize < dtype.itemsize)


def widen_in_forward(module: torch.nn.Module, dtypes: Mapping[str, torch.dtype]) -> list[Any]:
    """Run ``module`` as if the tensors named in ``dtypes`` (state_dict keys) had those wider dtypes,
    while they stay stored narrow: the module that owns each one widens it for the duration of its
    own forward (hooks), then puts the narrow tensor back (also when the forward raises). The
    arithmetic is the wide model's (widening is exact); the memory is one module's worth of wide
    tensors at a time. A tensor read outside its owner's forward would be seen narrow: the
    eager model then disagrees with the engine or raises, and the gate says so, never passes.
    The dtypes may be narrower too (a float32 model run in bfloat16). Returns the hooks' handles
    (``handle.remove()`` for each ends it)."""
    owned: dict[torch.nn.Module, list[tuple[str, torch.dtype]]] = {}
    for key, dtype in dtypes.items():
        path, _, name = key.rpartition(".")
        owner = module.get_submodule(path)
        owned.setdefault(owner, []).append((name, dtype))

    handles = []
    for owner, entries in owned.items():
        saved: list[dict[str, torch.Tensor]] = []

        def widen(m: torch.nn.Module, _args: Any, entries=entries, saved=saved) -> None:
            narrow = {}
            for name, dtype in entries:
                store: dict[str, Any] = m._parameters if name in m._parameters else m._buffers
                t = store[name]
                if t is None or t.dtype == dtype:   # an outer call of the same module widened it already
                    continue
                narrow[name] = t
                wide = t.detach().to(dtype)
                store[name] = torch.nn.Parameter(wide, requires_grad=False) if name in m._parameters else wide
            saved.append(narrow)

        def restore(m: torch.nn.Module, _args: Any, _out: Any, saved=saved) -> None:
            for name, t in saved.pop().items():
                store: dict[str, Any] = m._parameters if name in m._parameters else m._buffers
                store[name] = t   # the narrow Parameter (or buffer) it held

        handles.append(owner.register_forward_pre_hook(widen))
        handles.append(owner.register_forward_hook(restore, always_call=True))
    return handles


def _value(t: torch.Tensor, dtype: torch.dtype, share: bool) -> torch.Tensor:
    """``t`` as the model's own tensor of ``dtype``: a copy unless it is handed over and of that dtype."""
    t = t.detach()
    if t.dtype != dtype:
        return t.to(dtype)     # a new tensor already
    return t if share else t.clone()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device: no memory, and their
    initialisation (random, or from a file) does nothing. Buffers stay real (a rotary embedding's
    frequencies, a BatchNorm's statistics are computed at construction and may not be in any
    state_dict). Not thread-safe: it replaces ``torch.nn.Module.register_parameter`` meanwhile."""
    original = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register   # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original   # type: ignore[method-assign]


def skeleton(model: Any) -> torch.nn.Module:
    """The module a factory (a callable or a ``'module:callable'`` string) builds, its parameters on
    ``meta`` where it can be built so (:func:`parameters_on_meta`): its keys, shapes and dtypes at
    no cost in memory."""
    return _template(model, None, True, skeleton=True)


def _template(model: Any, engine: Any, trust_factory: bool, *, skeleton: bool = False) -> torch.nn.Module:
    """The module to load the weights into; ``skeleton``: a factory's built with its parameters on
    ``meta`` (:func:`parameters_on_meta`) when it can be (else the ordinary way)."""
    if model is not None and skeleton and not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        try:
            with parameters_on_meta():
                return _from(model)
        except (ValueError, TypeError):
            raise   # the factory cannot be imported or does not make a module: said as it is
        except Exception:  # noqa: BLE001 - a factory whose construction needs real parameters: built normally
            pass
    if model is not None:
        return _from(model)
    if engine is not None and getattr(engine, "exported_program", None) is not None:
        return engine.exported_program.module()
    factory = getattr(engine, "model_factory", None) if engine is not None else None
    if factory:
        if not trust_factory:
            raise UntrustedFactoryError(factory)
        return _template(factory, None, True, skeleton=skeleton)
    raise EagerModelError("cannot build the eager model: the engine has no exported program and records no model "
                          "factory; pass the model (reference_model=, or the new weights as an nn.Module)")


def _from(model: Any) -> torch.nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, torch.nn.Module):
        # A structural copy that shares the original's tensors (memo): cheap, and load_state_dict
        # with assign=True then replaces them in the copy only.
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        return copy.deepcopy(model, memo)
    factory: Callable = model
    if isinstance(model, str):
        from refitcore.capture.factory import load_factory

        factory = load_factory(model)
    if not callable(factory):
        raise TypeError(f"model must be an nn.Module, ExportedProgram, callable or 'module:callable', "
                        f"got {type(model).__name__}")
    built = factory()
    if not isinstance(built, torch.nn.Module):
        raise TypeError(f"the model factory {model!r} returned {type(built).__name__}, not a torch.nn.Module")
    return built
