"""``refitcore.refit``: new weights -> refitted engine, through the cached map or the fallback."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from refitcore.refitting.audit import Audit, audit_paths
from refitcore.refitting.culprit import find_culprit
from refitcore.refitting.driver import apply_mapping
from refitcore.refitting.checkpoints import load_weights
from refitcore.capture.eager import eager_model
from refitcore.errors import MapCannotServeError
from refitcore.refitting.mapping import cached_mapping, constants_note, fallback_mapping
from refitcore.options import REFIT_PATHS as PATHS
from refitcore.capture.structured import as_positional, check_structured_samples, flat_positional
from refitcore.refitting.validate import check_samples, eager_reference
from refitcore.refitting.verify import DEFAULT_ATOL, DEFAULT_RTOL, Verdict, verify

__all__ = ["refit", "RefitResult", "eager_model_for", "PATHS"]

log = logging.getLogger("refitcore")


@dataclasses.dataclass
class RefitResult:
    """What a refit did. Truthy unless verification ran and failed."""

    engine: Any
    path: str                                  # the path whose weights the engine now holds
    requested_path: str
    fell_back: bool = False
    audit: Audit | None = None                 # cached vs fallback, when both were computed
    verdict: Verdict | None = None             # engine vs eager, when verify_inputs were given
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.verdict is None or self.verdict.ok) and (self.audit is None or self.audit.ok or
                                                              (self.fell_back and self.verdict is not None
                                                               and self.verdict.ok))

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines = [f"refit via {self.path} path (requested {self.requested_path}) on {self.engine.backend}: "
                 f"{'OK' if self.ok else 'FAILED'}"]
        lines += [f"  {m}" for m in self.messages]
        if self.audit is not None:
            lines.append("  " + str(self.audit).replace("\n", "\n  "))
        if self.verdict is not None:
            lines.append("  " + str(self.verdict).replace("\n", "\n  "))
        lines.append("  timings: " + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in self.timings.items()))
        return "\n".join(lines)


def eager_model_for(engine, state: dict[str, torch.Tensor], source: Any = None, *, trust_factory: bool = False):
    """An eager model holding the new weights, to compare the refitted engine with (see
    :func:`refitcore.capture.eager.eager_model`; ``source``: the new weights' own module, if any)."""
    return eager_model(state, model=source, engine=engine, trust_factory=trust_factory)


def refit(engine, new_weights: Any, *, path: str = "auto", verify_inputs=None, rtol: float = DEFAULT_RTOL,
          atol: float = DEFAULT_ATOL, in_place: bool = False, audit: bool = False,
          reference_model: torch.nn.Module | None = None, trust_factory: bool = False) -> RefitResult:
    """Refit ``engine`` with ``new_weights`` (nn.Module, ExportedProgram, state_dict or checkpoint path).

    ``path``: 'cached' (the weight map's recipes), 'fallback' (convert again, read the weights off
    the network) or 'auto' (cached; when ``verify_inputs`` are given and the result disagrees
    with eager, refit through the fallback and say so). ``audit=True`` computes both mappings and
    compares them weight by weight. Raises on unusable weights (nothing is changed then); a
    verification mismatch is reported in the returned :class:`RefitResult` (falsy).

    An engine loaded from a file has no exported program: verification and the fallback path then
    need the model, ``reference_model`` (or the new weights as an nn.Module). The factory the file
    records is imported only with ``trust_factory=True``.

    Example::

        result = refitcore.refit(engine, "finetuned.pt", verify_inputs=[torch.randn(1, 3, 64, 64)])
        assert result, str(result)
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    t_start = time.perf_counter()
    loaded = load_weights(new_weights, weight_map=engine.weight_map, state_keys=engine.state_keys)
    state, source = loaded.state_dict, loaded.source
    timings: dict[str, float] = {}
    messages: list[str] = list(loaded.notes)
    for note in loaded.notes:
        log.info("refitcore: %s", note)
    messages += constants_note(engine.weight_map, source)

    def timed(key, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return out

    def fallback_of():
        return fallback_mapping(engine, source if source is not None else state, model=reference_model,
                                trust_factory=trust_factory)

    cached = fallback = None
    unserved = False                # the map cannot express these weights: auto converts again
    if path in ("auto", "cached") or audit:
        try:
            # A model (not only its state_dict): the map reads its tensor constants from it too.
            cached = timed("cached_mapping_s", cached_mapping, engine.weight_map, source if source is not None else state)
        except MapCannotServeError as err:
            if path == "cached":
                raise
            unserved = True
            messages.append(f"{str(err).splitlines()[0]}: {'; '.join(err.problems)}; refitting through the "
                            f"fallback path")
    if path == "fallback" or audit or unserved:
        fallback = timed("fallback_mapping_s", fallback_of)
    report = audit_paths(cached, fallback) if audit and cached is not None else None
    used = "fallback" if path == "fallback" or unserved else "cached"
    model = None
    if verify_inputs is not None:  # what verification needs is checked before the engine is touched
        verify_inputs = (check_samples(engine.io, as_positional(verify_inputs)) if flat_positional(engine.structure)
                         else check_structured_samples(engine, verify_inputs))
        model = reference_model if reference_model is not None else eager_reference(
            engine, state, source, trust_factory=trust_factory)
    # The cached mapping was computed here for this refit: its fresh arrays are handed to the engine
    # (no copy); arrays that alias the model's memory are read-only and still copied.
    refitted = timed("apply_s", apply_mapping, engine, fallback if used == "fallback" else cached, in_place=in_place,
                     hand_over=used == "cached")
    verdict = None
    fell_back = unserved and path == "auto"
    if verify_inputs is not None:
        verdict = timed("verify_s", verify, refitted, model, verify_inputs, rtol=rtol, atol=atol)
        if not verdict and path == "auto" and used == "cached":
            messages.append("the cached path disagreed with eager; refitting through the fallback path")
            log.warning("refitcore: cached refit disagreed with eager (%s); retrying via fallback",
                        verdict.worst)
            if fallback is None:
                fallback = timed("fallback_mapping_s", fallback_of)
            report = audit_paths(cached, fallback)
            culprit = find_culprit(engine, state, mappings={"cached": cached, "fallback": fallback},
                                   held={"cached": refitted.current_weights()})
            if culprit is not None:
                messages.append(f"first engine weight where the witnesses disagree: {culprit.name!r} "
                                f"(recipe {culprit.recipe}); {culprit.why}")
            refitted = timed("apply_s", apply_mapping, refitted, fallback, in_place=True)
            verdict = timed("verify_s", verify, refitted, model, verify_inputs, rtol=rtol, atol=atol)
            used, fell_back = "fallback", True
    timings["total_s"] = time.perf_counter() - t_start
    return RefitResult(refitted, used, path, fell_back, report, verdict, timings, messages)
