"""``refit(..., in_place=True)`` is one transaction, and a tolerance that cannot fail a check is refused.

Whatever step fails after the driver has applied a path (verification on both paths under
'auto', the fallback raising after the cached path disagreed, an interrupt during verification),
the engine answers bit for bit as before; a weightless engine stays weightless. NaN, negative and
infinite tolerances are refused by every entry point with one message."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import refitcore
import refitcore.conversion.recipes as recipes
from refitcore.cache.store import EngineCache, lookup
from refitcore.compiler.native import compile_cache_key
from refitcore.engine.refittable import RefittableEngine
from refitcore.errors import ArchitectureMismatchError, WeightlessEngineError
from tests.conftest import bit_identical, outputs
from tests.test_faults import _buggy_bn_factor, _with_map, swap_same_shape

pipeline = sys.modules["refitcore.refitting.pipeline"]


def _held(engine) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in engine.current_weights().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def faulty(compiled):
    """A private engine whose cached path is wrong (two kernels swapped), its model and input."""
    c = compiled("residual")
    return c, _with_map(c.engine, swap_same_shape)


def _unchanged(engine, weights, outs, x) -> None:
    assert _same_weights(_held(engine), weights)
    assert bit_identical(outputs(engine, x), outs)


# ---- rollback --------------------------------------------------------------------------------------

def test_both_paths_failing_verification_under_auto_leave_the_engine_as_before(compiled, monkeypatch):
    c = compiled("conv_bias_bn")
    engine = c.engine.clone()
    weights, outs = _held(engine), outputs(engine, c.x)
    monkeypatch.setattr(recipes, "bn_factor", _buggy_bn_factor)   # both paths share the bug
    result = refitcore.refit(engine, c.fresh(11), path="auto", verify_inputs=[c.x], in_place=True)
    assert not result and result.fell_back and result.restored, str(result)
    assert result.engine is engine and not result.verdict.ok
    assert "restored" in str(result)
    _unchanged(engine, weights, outs, c.x)


def test_the_fallback_raising_after_the_cached_path_disagreed_leaves_the_engine_as_before(faulty, monkeypatch):
    c, engine = faulty
    weights, outs = _held(engine), outputs(engine, c.x)

    def fallback_fails(*_args, **_kwargs):
        raise ArchitectureMismatchError("the model no longer exports to this graph")

    monkeypatch.setattr(pipeline, "fallback_mapping", fallback_fails)
    with pytest.raises(ArchitectureMismatchError):
        refitcore.refit(engine, c.fresh(11), path="auto", verify_inputs=[c.x], in_place=True)
    _unchanged(engine, weights, outs, c.x)


def test_an_unexpected_error_of_the_fallback_also_restores(faulty, monkeypatch):
    c, engine = faulty
    weights, outs = _held(engine), outputs(engine, c.x)
    monkeypatch.setattr(pipeline, "fallback_mapping", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        refitcore.refit(engine, c.fresh(11), path="auto", verify_inputs=[c.x], in_place=True)
    _unchanged(engine, weights, outs, c.x)


@pytest.mark.parametrize("path", ["cached", "fallback", "auto"])
def test_an_interrupt_during_verification_leaves_the_engine_as_before(compiled, monkeypatch, path):
    c = compiled("residual")
    engine = c.engine.clone()
    weights, outs = _held(engine), outputs(engine, c.x)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        refitcore.refit(engine, c.fresh(11), path=path, verify_inputs=[c.x], in_place=True)
    _unchanged(engine, weights, outs, c.x)


def test_a_failing_cached_refit_in_place_is_restored_and_reports_the_failing_verdict(faulty):
    c, engine = faulty
    weights, outs = _held(engine), outputs(engine, c.x)
    result = refitcore.refit(engine, c.fresh(11), path="cached", verify_inputs=[c.x], in_place=True)
    assert not result and result.restored and result.path == "cached" and not result.verdict.ok
    _unchanged(engine, weights, outs, c.x)
    # Not in place: the copy keeps what the failing path gave it (for inspection); the engine is untouched.
    copy = refitcore.refit(engine, c.fresh(11), path="cached", verify_inputs=[c.x])
    assert not copy and not copy.restored and copy.engine is not engine
    assert not refitcore.verify(copy.engine, c.fresh(11), [c.x])
    _unchanged(engine, weights, outs, c.x)


def test_a_passing_refit_in_place_keeps_the_new_weights(compiled):
    c = compiled("residual")
    engine, new = c.engine.clone(), c.fresh(11)
    result = refitcore.refit(engine, new, path="auto", verify_inputs=[c.x], in_place=True)
    assert result and not result.restored and result.engine is engine
    assert refitcore.verify(engine, new, [c.x])


def test_a_weightless_engine_stays_weightless_after_a_refused_refit(compiled, monkeypatch, tmp_path):
    c = compiled("conv_bias_bn")
    header, arrays = c.engine.to_parts(weights=False)
    engine = RefittableEngine.from_parts(header, arrays, "<test>")
    monkeypatch.setattr(recipes, "bn_factor", _buggy_bn_factor)
    result = refitcore.refit(engine, c.fresh(11), path="auto", verify_inputs=[c.x], in_place=True)
    assert not result and result.restored
    assert engine.weightless
    with pytest.raises(WeightlessEngineError):
        engine(c.x)
    monkeypatch.undo()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        refitcore.refit(engine, c.fresh(11), path="cached", verify_inputs=[c.x], in_place=True)
    assert engine.weightless
    monkeypatch.undo()
    assert refitcore.refit(engine, c.model, path="cached", verify_inputs=[c.x], in_place=True)
    assert not engine.weightless and bit_identical(outputs(engine, c.x), outputs(c.engine, c.x))


# ---- tolerances ------------------------------------------------------------------------------------

BAD = [float("nan"), -1e-4, float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("which", ["rtol", "atol"])
def test_verify_and_refit_refuse_a_tolerance_that_cannot_fail(compiled, bad, which):
    c = compiled("residual")
    engine = c.engine.clone()
    weights = _held(engine)
    message = rf"{which}={bad!r}: a tolerance must be finite and >= 0, such as 1e-4"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        refitcore.verify(engine, c.fresh(11), [c.x], **{which: bad})
    with pytest.raises(ValueError, match="a tolerance must be finite and >= 0"):
        refitcore.refit(engine, c.fresh(11), verify_inputs=[c.x], in_place=True, **{which: bad})
    assert _same_weights(_held(engine), weights)


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_the_gate_refuses_a_tolerance_that_cannot_fail(compiled, bad):
    c = compiled("residual")
    report = refitcore.gate(c.engine, c.fresh(11).state_dict(), [(c.x,)], model=c.fresh(0), rtol=bad)
    assert not report and report.exit_code == 2, str(report)
    assert "rtol=" in str(report) and "a tolerance must be finite and >= 0" in str(report)


def test_a_nan_tolerance_would_have_passed_a_wrong_engine(faulty):
    """Why the check exists: with NaN, no comparison fails (x <= nan is False, and so is x > nan)."""
    c, engine = faulty
    wrong = refitcore.refit(engine, c.fresh(11), path="cached").engine
    assert not refitcore.verify(wrong, c.fresh(11), [c.x])
    with pytest.raises(ValueError):
        refitcore.verify(wrong, c.fresh(11), [c.x], rtol=float("nan"))


# ---- a cache entry that fails in any way is a miss -----------------------------------------------------

def test_a_cache_entry_whose_load_raises_anything_is_a_miss(tmp_path, monkeypatch):
    store = sys.modules["refitcore.cache.store"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(2, 4)
    refitcore.compile(model, x, backend="reference", cache=str(tmp_path))
    cache = EngineCache(str(tmp_path))
    key = compile_cache_key(model, (x,), backend="reference")

    def unexpected(*_args, **_kwargs):
        raise ZeroDivisionError("a failure no one planned for")

    monkeypatch.setattr(store, "unpack_entry", unexpected)
    assert lookup(cache, key) is None
    assert not list(tmp_path.glob("*.engine"))    # evicted, to be replaced
    monkeypatch.undo()
    again = refitcore.compile(model, x, backend="reference", cache=str(tmp_path))
    assert again.cache_hit is False and list(tmp_path.glob("*.engine"))


def test_a_cache_hit_whose_refit_raises_anything_is_a_miss(tmp_path, monkeypatch):
    native = sys.modules["refitcore.compiler.native"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(2, 4)
    refitcore.compile(model, x, backend="reference", cache=str(tmp_path))

    def unexpected(*_args, **_kwargs):
        raise ZeroDivisionError("a failure no one planned for")

    monkeypatch.setattr(native, "refit", unexpected)
    engine = refitcore.compile(model, x, backend="reference", cache=str(tmp_path))
    assert engine.cache_hit is False
    monkeypatch.undo()
    assert refitcore.compile(model, x, backend="reference", cache=str(tmp_path)).cache_hit is True
