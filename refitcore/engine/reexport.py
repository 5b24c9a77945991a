"""The fallback path's program: the ExportedProgram that is converted again with new weights,
checked against the compiled graph, and the parameters it is converted with.

Shared by the engine kinds that convert an exported graph (:mod:`refitcore.engine.whole`,
:mod:`refitcore.engine.segmented_build`); the eager model a loaded engine is re-exported from
comes from :func:`refitcore.capture.eager.eager_model`.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from refitcore.capture.eager import EagerModelError, UntrustedFactoryError, eager_model
from refitcore.capture.lowering import export_model, graph_fingerprint, lower
from refitcore.capture.shapes import export_call, nest_dynamic_shapes
from refitcore.conversion.weight_map import WeightMap
from refitcore.engine.program_record import rebuild_program, weight_inputs
from refitcore.errors import ArchitectureMismatchError

__all__ = ["exported_for", "conversion_params", "recorded_program"]


def _describe_entry(e: list) -> str:
    """A graph_fingerprint entry in words: 'op aten.relu.default (node relu, module layer1.0)'."""
    kind = e[0] if e else "?"
    if kind == "op":
        return f"op {e[1]} (node {e[2]}, module {e[3] or '<top level>'}, args {e[4]})"
    if kind in ("weight", "input"):
        return f"{kind} {e[1]} of shape {e[2]} ({e[3]})"
    if kind == "output":
        return f"the graph output {e[1]}"
    return str(e)


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at graph entry {i}: compiled {_describe_entry(x)}, new {_describe_entry(y)}"
    if len(a) != len(b):
        longer, which = (a, "compiled") if len(a) > len(b) else (b, "new")
        return (f"the {which} graph has {abs(len(a) - len(b))} more entries, first "
                f"{_describe_entry(longer[min(len(a), len(b))])}")
    return "no difference found"


def exported_for(engine, source: Any, state: Mapping[str, torch.Tensor], *, model: Any = None,
                 trust_factory: bool = False, owned: bool = False, recorded: bool = False):
    """The ExportedProgram to convert for the fallback path, checked against the compiled graph.

    ``source``: the new weights' own module or ExportedProgram, if any. Without one the engine's
    exported program is reused; a loaded engine has none, so the eager model holding ``state`` is
    re-exported, built by :func:`refitcore.capture.eager.eager_model` from ``model`` (the caller's) or
    the engine's recorded factory when ``trust_factory`` (never imported otherwise): with ``owned``
    (the refit's own tensors, read from a file for it) that model holds them as they are, without a
    copy, where their dtypes are the model's (narrower ones are cast whole: an export must see the
    model's own dtypes). ``recorded``: the caller converts programs rebuilt from a saved engine's
    program record (:class:`refitcore.engine.program_record.RecordedProgram`), which a loaded engine
    uses first: no model, no export (:func:`recorded_program`)."""
    if isinstance(source, torch.nn.Module) and engine.io.profiles is not None:
        # The same export as at compile time: example shapes, and the recorded dynamic ranges.
        profiles = engine.io.profiles
        args, kwargs = (engine.example_call() if engine.structure is not None else
                        (tuple(torch.zeros(s, dtype=getattr(torch, d))
                               for s, d in zip(engine.io.input_shapes, engine.io.input_dtypes)), {}))
        ep = export_model(source, *export_call(args, kwargs, profiles),
                          dynamic_shapes=nest_dynamic_shapes(profiles.torch_dynamic_shapes(), source, args, kwargs))
    elif isinstance(source, torch.nn.Module) and engine.structure is not None:
        args, kwargs = engine.example_call()
        ep = export_model(source, args, kwargs)
    elif isinstance(source, torch.nn.Module):
        ep = export_model(source, [torch.zeros(s, dtype=getattr(torch, d))
                                   for s, d in zip(engine.io.input_shapes, engine.io.input_dtypes)])
    elif isinstance(source, torch.export.ExportedProgram):
        ep = lower(source)
    else:
        ep = engine.exported_program
        if ep is None and recorded and engine.record.program is not None:
            ep = recorded_program(engine, state, can_export=model is not None or bool(engine.model_factory))
            if ep is not None:
                return ep
        if ep is None:
            if model is None and not engine.model_factory:
                why = engine.record.program_note or "the file holds none"
                raise ArchitectureMismatchError([
                    f"this engine has no exported program (it was loaded from a file), no program record ({why}) "
                    f"and no recorded model factory; pass the new weights as an nn.Module (or model=) to use the "
                    f"fallback path"])
            try:
                module = eager_model(state, model=model, engine=engine, trust_factory=trust_factory,
                                     keep_missing=True, share=owned, widen=False)
            except UntrustedFactoryError:
                raise
            except EagerModelError as err:
                raise ArchitectureMismatchError([f"the fallback path cannot rebuild the model: {err}"]) from err
            return exported_for(engine, module, state)
        return ep
    digest, entries = graph_fingerprint(ep)
    if digest != engine.fingerprint:
        where = _first_difference(engine.graph_entries or [], entries) if engine.graph_entries else "unknown"
        raise ArchitectureMismatchError([f"the new model's graph differs from the compiled one ({where}); "
                                         f"recompile needed"])
    return ep


def recorded_program(engine, state: Mapping[str, torch.Tensor], *, can_export: bool = False):
    """The loaded engine's program record rebuilt with ``state`` as its weights, checked against the
    engine's fingerprint. When it cannot serve (``state`` lacks a weight the graph reads, or the record
    does not give the compiled graph): None, with a warning that says why, where ``can_export`` (the
    caller re-exports the model instead); else :class:`ArchitectureMismatchError`."""
    record = engine.record.program
    missing, stand_ins = weight_inputs(record, state)
    if stand_ins:
        state = {**state, **stand_ins}
    if missing:
        why = (f"the new weights lack {len(missing)} weight(s) the compiled graph reads "
               f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    else:
        program = rebuild_program(record, engine.record.program_constants, state)
        digest, entries = graph_fingerprint(program)
        if digest == engine.fingerprint:
            return program
        where = _first_difference(engine.graph_entries or [], entries) if engine.graph_entries else "unknown"
        why = f"the engine file's program record does not give the compiled graph ({where})"
    if not can_export:
        raise ArchitectureMismatchError([f"the fallback path cannot convert this loaded engine again: {why}; "
                                         f"pass model= (the model's nn.Module or factory) to export it anew"])
    warnings.warn(f"the fallback path exports the model again: {why}", RuntimeWarning, stacklevel=4)
    return None


def conversion_params(weight_map: WeightMap, state: Mapping[str, torch.Tensor],
                      checked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters to convert with, by the exported program's own fully qualified names: the
    state_dict with the checked (validated, cast) values, and every alias of a tied parameter given
    its canonical key's value (the exported program may have lifted the tensor under any name)."""
    params = dict(state)
    params.update(checked)
    for group in weight_map.tied:
        if group[0] in checked:
            params.update(dict.fromkeys(group[1:], checked[group[0]]))
    return params
