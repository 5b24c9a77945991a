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
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from refitcore.errors import RefitCoreError

__all__ = ["eager_model", "UntrustedFactoryError", "EagerModelError"]


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
                trust_factory: bool = False, keep_missing: bool = False) -> torch.nn.Module:
    """An eager model holding ``state`` (a state_dict), never sharing storage the caller can see.

    ``model``: an nn.Module (copied: the original is never written), an ExportedProgram, a callable
    returning an nn.Module, or a ``'module:callable'`` string (imported: the caller named it).
    Without it, ``engine.exported_program``, else ``engine.model_factory`` when ``trust_factory``.
    Values take the template's dtypes; the state_dict's ``_metadata`` (per-module versions) is
    kept, else the template's. ``keep_missing``: keys ``state`` lacks keep the template's values
    (else they are an error naming them).

    Example::

        reference = refitcore.capture.eager.eager_model(new_state, engine=engine, trust_factory=True)
    """
    module = _template(model, engine, trust_factory)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing and not keep_missing:
        raise EagerModelError(f"the new weights lack {missing[:5]}" + (f" (+{len(missing) - 5} more)"
                              if len(missing) > 5 else "") + " needed to run the eager model")
    # assign=True: the template may share its tensors with an exported program or with the model
    # the caller passed; assigning fresh tensors (cast to the template's dtypes, as an in-place
    # load_state_dict would) leaves those untouched.
    values = collections.OrderedDict(
        (k, state.get(k, v).detach().to(v.dtype).clone()) for k, v in own.items())
    metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)
    if metadata is not None:
        values._metadata = metadata  # type: ignore[attr-defined]  # torch's state_dict convention (load_state_dict reads it)
    try:
        module.load_state_dict(values, strict=True, assign=True)
    except RuntimeError as err:
        raise EagerModelError(f"the eager model cannot load the new weights: {str(err).strip()}") from err
    return module if isinstance(module, torch.fx.GraphModule) else module.eval()


def _template(model: Any, engine: Any, trust_factory: bool) -> torch.nn.Module:
    if model is not None:
        return _from(model)
    if engine is not None and getattr(engine, "exported_program", None) is not None:
        return engine.exported_program.module()
    factory = getattr(engine, "model_factory", None) if engine is not None else None
    if factory:
        if not trust_factory:
            raise UntrustedFactoryError(factory)
        return _from(factory)
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
