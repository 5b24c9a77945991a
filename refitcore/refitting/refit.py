"""``refitcore.refit``: new weights -> refitted engine, through the cached map or the fallback."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from refitcore.capture.structured import as_positional, check_structured_samples, flat_positional
from refitcore.options import REFIT_PATHS as PATHS
from refitcore.refitting.audit import Audit
from refitcore.refitting.mapping import constants_note
from refitcore.refitting.pipeline import RefitReport, run_refit
from refitcore.refitting.prepare import prepare_weights
from refitcore.refitting.render import indented
from refitcore.refitting.validate import check_samples, eager_reference
from refitcore.refitting.verify import Verdict, engine_tolerances

__all__ = ["refit", "RefitResult", "PATHS", "verification_samples"]

log = logging.getLogger("refitcore")


@dataclasses.dataclass
class RefitResult:
    """What a refit did. Truthy unless verification ran and failed. A falsy result of an in-place
    refit left the engine as it was before (``restored``)."""

    engine: Any
    path: str                                  # the path whose weights the engine now holds (tried last if restored)
    requested_path: str
    fell_back: bool = False
    audit: Audit | None = None                 # cached vs fallback, when both were computed
    verdict: Verdict | None = None             # engine vs eager, when verify_inputs were given
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)
    restored: bool = False                     # in place and failed: the engine holds its previous weights again

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
            lines.append(indented(self.audit))
        if self.verdict is not None:
            lines.append(indented(self.verdict))
        lines.append("  timings: " + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in self.timings.items()))
        return "\n".join(lines)

    @classmethod
    def from_report(cls, report: RefitReport, *, requested_path: str, messages: list[str],
                    total_s: float) -> RefitResult:
        """The result of :func:`refit` from the pipeline's report (``total_s``: the whole call)."""
        timings = {f"{p}_mapping_s": r.mapping_s for p, r in report.records.items() if r.error is None}
        applied = [report.records[p] for p in report.paths]
        if applied:
            timings["apply_s"] = sum(r.apply_s for r in applied)
        if any(r.verdict is not None for r in applied):
            timings["verify_s"] = sum(r.verify_s for r in applied)
        timings["total_s"] = total_s
        if report.used is None:   # run_refit(record_errors=False) raises when no path goes through
            raise RuntimeError("internal error: the refit pipeline applied no path")
        verdict = report.records[report.used].verdict
        return cls(report.engine, report.used, requested_path, report.fell_back, report.audit, verdict, timings,
                   messages, restored=report.restored)


def verification_samples(engine, verify_inputs: Any) -> list:
    """``verify_inputs`` as a list of samples checked against ``engine``'s inputs; ``ValueError``
    listing every mismatch (the caller's inputs, found before anything is touched)."""
    if flat_positional(engine.structure):
        return check_samples(engine.io, as_positional(verify_inputs))
    return check_structured_samples(engine, verify_inputs)


def refit(engine, new_weights: Any, *, path: str = "auto", verify_inputs=None, rtol: float | None = None,
          atol: float | None = None, in_place: bool = False, audit: bool = False,
          reference_model: torch.nn.Module | None = None, trust_factory: bool = False,
          progress: Any = None) -> RefitResult:
    """Refit ``engine`` with ``new_weights`` (nn.Module, ExportedProgram, state_dict or checkpoint path).

    ``path``: 'cached' (the weight map's recipes), 'fallback' (convert again, read the weights off
    the network) or 'auto' (cached; when ``verify_inputs`` are given and the result disagrees
    with eager, refit through the fallback and say so). ``audit=True`` computes both mappings and
    compares them weight by weight. Raises on unusable weights (nothing is changed then); a
    verification mismatch is reported in the returned :class:`RefitResult` (falsy).

    ``in_place=True`` refits ``engine`` itself, as one transaction: when anything raises (an
    interrupt included) or the result is falsy (verification or the audit failed on the path the
    engine ended on), the engine is restored bit for bit to the weights it held before (a
    weightless engine stays weightless) and the result says ``restored``; its verdict is the
    failing path's. ``rtol``/``atol`` of engine vs eager: None (default) takes the engine precision's
    (:data:`refitcore.options.PRECISION_TOLERANCES`); NaN, negative or infinite ones are a ``ValueError``.

    An engine loaded from a file has no exported program: verification and the fallback path then
    need the model, ``reference_model`` (or the new weights as an nn.Module). The factory the file
    records is imported only with ``trust_factory=True``. ``progress`` (an object with
    ``info(message)`` and a ``step(what)`` context manager, as the gate takes) is told each step,
    and how far a long one got.

    Example::

        result = refitcore.refit(engine, "finetuned.pt", verify_inputs=[torch.randn(1, 3, 64, 64)])
        assert result, str(result)
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    rtol, atol = engine_tolerances(engine, rtol, atol)
    t_start = time.perf_counter()
    weights = prepare_weights(engine, new_weights)
    for note in weights.notes:
        log.info("refitcore: %s", note)
    messages = list(weights.notes) + constants_note(engine.weight_map, weights.source, model=reference_model)
    samples = model = None
    if verify_inputs is not None:  # what verification needs is checked before the engine is touched
        samples = verification_samples(engine, verify_inputs)
        model = reference_model if reference_model is not None else eager_reference(
            engine, weights.state, weights.source, trust_factory=trust_factory)
    report = run_refit(engine, weights, paths=path if path == "auto" else (path,), reference=model, samples=samples,
                       rtol=rtol, atol=atol, in_place=in_place, audit=audit, culprit=path == "auto",
                       model=reference_model, trust_factory=trust_factory, progress=progress)
    return RefitResult.from_report(report, requested_path=path, messages=messages + report.messages,
                                   total_s=time.perf_counter() - t_start)
