"""The object the ``trt_refit`` fixture gives a test: checks over the session's engine provider
(:mod:`.engines`) and its report recorder (:mod:`.recorder`).

Like pytest-benchmark's ``BenchmarkFixture`` beside its ``BenchmarkSession``: the provider and the
recorder are the session's (built once in ``pytest_configure``, kept in ``config.stash``); a
:class:`RefitSession` only runs checks on the one and records them with the other.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import pytest

from refitcore.options import check_tolerance, parse_compiler, parse_precision

from .checks import CheckOutcome, as_samples, describe_weights, model_label, run_check, run_sequence
from .config import RefitConfig
from .engines import EngineProvider
from .recorder import ReportRecorder

__all__ = ["RefitSession"]


class RefitSession:
    """What ``trt_refit`` gives a test: ``config``, ``backend``, :meth:`engine_for`, :meth:`check`,
    :meth:`check_sequence`. ``engines`` and ``recorder`` default to fresh ones (a session of its own,
    outside pytest)."""

    def __init__(self, config: RefitConfig, *, engines: EngineProvider | None = None,
                 recorder: ReportRecorder | None = None, worker: str | None = None):
        self.config = config
        self.engines = engines if engines is not None else EngineProvider(config, worker=worker)
        self.recorder = recorder if recorder is not None else ReportRecorder(config, worker=worker)

    @property
    def backend(self) -> str:
        """The backend the checks run on ('reference' or 'tensorrt'); 'auto' is resolved on first use."""
        return self.engines.backend

    @property
    def backend_reason(self) -> str:
        return self.engines.backend_reason

    # The records so far, in their JSON form (as the report writes them).
    @property
    def records(self) -> list[dict]:
        return [r.as_dict() for r in self.recorder.checks]

    @property
    def failures(self) -> list[dict]:
        return [f.as_dict() for f in self.recorder.failures]

    @property
    def builds(self) -> list[dict]:
        return [b.as_dict() for b in self.engines.builds]

    def engine_for(self, model_or_factory, inputs, *, name: str | None = None, dynamic_shapes: Any = None,
                   compile_options: Any = None, precision: str | None = None, compiler: str | None = None):
        """The session's engine for this architecture and input spec: :meth:`EngineProvider.engine_for`."""
        return self.engines.engine_for(model_or_factory, inputs, name=name, dynamic_shapes=dynamic_shapes,
                                       compile_options=compile_options, precision=_precision(precision),
                                       compiler=self._compiler(compiler))

    def _compiler(self, compiler: str | None) -> str:
        """A check's ``compiler=`` argument (None: ``--trt-refit-compiler``); a compiler that cannot run here
        skips the test with the reason (``--trt-refit-compiler`` itself is checked at session start)."""
        if compiler is None:
            return self.config.compiler
        try:
            compiler = parse_compiler(compiler)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"compiler={compiler!r}: {err}") from None
        why = self.engines.compiler_unavailable(compiler)
        if why is not None:
            pytest.skip(why)
        return compiler

    def _settings(self, paths, rtol, atol, compiler: str) -> tuple[tuple[str, ...], float | None, float | None]:
        paths = self.config.paths_for(compiler) if paths is None else (
            (paths,) if isinstance(paths, str) else tuple(paths))
        bad = [p for p in paths if p not in ("cached", "fallback")]
        if bad or not paths:
            raise ValueError(f"paths={paths!r}: each path must be 'cached' or 'fallback'")
        return (paths, None if rtol is None else check_tolerance(rtol, "rtol"),
                None if atol is None else check_tolerance(atol, "atol"))

    def _prepare(self, model_or_factory, inputs, paths, rtol, atol, name, dynamic_shapes, compile_options, precision,
                 compiler):
        """(engine entry ready for ``paths``, samples, paths, rtol, atol) of one check call. Tolerances not
        given here come from the options (``--trt-refit-rtol``), else from the engine's precision."""
        compiler = self._compiler(compiler)
        paths, rtol, atol = self._settings(paths, rtol, atol, compiler)
        precision = _precision(precision)
        samples = as_samples(inputs)
        entry = self.engines.entry(model_or_factory, samples, paths=paths, name=name, dynamic_shapes=dynamic_shapes,
                                   compile_options=compile_options, precision=precision, compiler=compiler)
        default_rtol, default_atol = self.config.tolerances(entry.engine.options.precision)
        return (entry, samples, paths, default_rtol if rtol is None else rtol,
                default_atol if atol is None else atol)

    def check(self, model_or_factory, weights, inputs, *, paths: str | Sequence[str] | None = None,
              rtol: float | None = None, atol: float | None = None, name: str | None = None,
              dynamic_shapes: Any = None, compile_options: Any = None, precision: str | None = None,
              compiler: str | None = None) -> CheckOutcome:
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
        ``precision``: 'fp32', 'fp16' or 'bf16' (also 'float16'...; default: ``--trt-refit-precision``);
        ``rtol``/``atol`` given neither here nor in the options are the engine precision's defaults
        (:data:`refitcore.options.PRECISION_TOLERANCES`). ``compiler``: 'refitcore' or 'torch_tensorrt'
        (default: ``--trt-refit-compiler``): a Torch-TensorRT engine is refitted by Torch-TensorRT's own refit
        (``refit_module_weights``; ``paths`` default to ``fallback``, its only path) and every weight it sets is
        audited against a fresh Torch-TensorRT conversion; the test is skipped, with the reason, where
        Torch-TensorRT cannot be used.

        Example::

            def test_refit(trt_refit):
                trt_refit.check(MyNet, MyNet().state_dict(), torch.randn(1, 3, 32, 32))
        """
        __tracebackhide__ = True
        from refitcore.refitting.prepare import load_for

        entry, samples, paths, rtol, atol = self._prepare(model_or_factory, inputs, paths, rtol, atol, name,
                                                          dynamic_shapes, compile_options, precision, compiler)
        loaded = load_for(entry.engine, weights)
        t0 = time.perf_counter()
        outcome = run_check(entry, loaded, samples, paths=paths, rtol=rtol, atol=atol,
                            model=name or model_label(entry.eager), weights_label=describe_weights(weights))
        self.recorder.record(outcome, time.perf_counter() - t0)
        if not outcome.ok:
            raise AssertionError(outcome.report())
        return outcome

    def check_sequence(self, model_or_factory, sequence: Sequence[Any], inputs, *,
                       paths: str | Sequence[str] | None = None, rtol: float | None = None,
                       atol: float | None = None, name: str | None = None,
                       dynamic_shapes: Any = None, compile_options: Any = None,
                       precision: str | None = None, compiler: str | None = None) -> list[CheckOutcome]:
        """Refit one engine with each weight set of ``sequence`` in turn (per path), comparing with
        eager at every step; weights that repeat an earlier step must reproduce that step's outputs
        bit for bit (A -> B -> A). Raises ``AssertionError`` with the report of every failing step."""
        __tracebackhide__ = True
        from refitcore.refitting.prepare import load_for

        entry, samples, paths, rtol, atol = self._prepare(model_or_factory, inputs, paths, rtol, atol, name,
                                                          dynamic_shapes, compile_options, precision, compiler)
        states = [load_for(entry.engine, w) for w in sequence]
        labels = [describe_weights(w) for w in sequence]
        t0 = time.perf_counter()
        outcomes = run_sequence(entry, states, samples, paths=paths, rtol=rtol, atol=atol,
                                model=name or model_label(entry.eager), labels=labels)
        per = (time.perf_counter() - t0) / max(1, len(outcomes))
        for o in outcomes:
            self.recorder.record(o, per)
        bad = [o for o in outcomes if not o.ok]
        if bad:
            head = getattr(sequence, "describe", lambda: f"a sequence of {len(states)} weight sets")()
            raise AssertionError(f"refit sequence {head}: {len(bad)} of {len(outcomes)} step(s) failed\n"
                                 + "\n".join(o.report() for o in bad))
        return outcomes


def _precision(precision: str | None) -> str | None:
    """A check's ``precision=`` argument as its canonical name ('float16' -> 'fp16'); None: the session's."""
    if precision is None:
        return None
    try:
        return parse_precision(precision)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"precision={precision!r}: {err}") from None
