"""Fault injection: each deliberate mapping fault makes the checks fail with a message naming the
engine weight at fault.

For every fault we show that (1) ``audit(cached, fallback)`` fails and names the weight, (2) the
engine refitted through the faulty cached path fails ``verify``, and (3) ``refit(path="auto",
verify_inputs=...)`` notices, refits through the fallback, and reports the culprit. A check
that cannot fail is worthless; these tests are what shows ours can.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch

import refitcore
import refitcore.conversion.recipes as recipes
from refitcore.conversion.weight_map import WeightMap


def _with_map(engine, edit: Callable[[WeightMap], None]):
    """A copy of ``engine`` whose weight map was edited by ``edit`` (the compiled one is untouched)."""
    faulty = engine.clone()
    wm = WeightMap.loads(engine.weight_map.dumps())
    edit(wm)
    faulty.weight_map = wm
    return faulty


def _set_source(wm: WeightMap, name: str, **changes):
    wm.sources[name] = dataclasses.replace(wm.sources[name], **changes)


# --- the faults ------------------------------------------------------------------------------

def swap_same_shape(wm):
    a, b = "conv1/conv2d KERNEL", "conv2/conv2d KERNEL"
    assert wm.sources[a].shape == wm.sources[b].shape
    wm.sources[a], wm.sources[b] = wm.sources[b], wm.sources[a]


def transpose_linear(wm):
    name = "fc2/linear.weight CONSTANT"
    src = wm.sources[name]
    _set_source(wm, name, inputs={"x": {"op": "aten.t.default", "args": [src.inputs["x"]], "kwargs": {}}})


def wrong_eps(wm):
    for name, src in wm.sources.items():
        if "eps" in src.params:
            assert src.params["eps"] == pytest.approx(1e-3)
            _set_source(wm, name, params=dict(src.params, eps=1e-5))


def drop_bias(wm):
    name = "conv/conv2d BIAS"
    src = wm.sources[name]
    assert src.inputs["bias"] == {"key": "conv.bias"}
    _set_source(wm, name, inputs=dict(src.inputs, bias=None))


def _small_var(model):
    """Running variances near eps, so that eps matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.bn.running_var.copy_(torch.rand(model.bn.running_var.shape, generator=g) * 2e-3)
    return model


@dataclasses.dataclass
class Fault:
    id: str
    model: str
    culprits: tuple[str, ...]
    edit_map: Callable[[WeightMap], None] | None = None
    patch_recipes: dict = dataclasses.field(default_factory=dict)   # recipe name -> faulty recipe
    prepare: Callable = lambda m: m


FAULTS = [
    Fault("swapped_same_shape", "residual", ("conv1/conv2d KERNEL", "conv2/conv2d KERNEL"), edit_map=swap_same_shape),
    Fault("linear_transposed", "tied_mlp", ("fc2/linear.weight CONSTANT",), edit_map=transpose_linear),
    Fault("bn_eps_wrong", "conv_bias_bn", ("conv/conv2d KERNEL", "conv/conv2d BIAS"), edit_map=wrong_eps,
          prepare=_small_var),
    Fault("bias_dropped", "conv_bias_bn", ("conv/conv2d BIAS",), edit_map=drop_bias),
]


def _buggy_bn_factor(gamma, var, eps):
    """The classic bug: 1/(var + eps) instead of 1/sqrt(var + eps)."""
    inv = 1.0 / (var.double() + eps)
    return inv if gamma is None else gamma.double() * inv


def _kernel_without_sqrt(*, weight, gamma, var, eps, **_unused):
    return weight.double() * _buggy_bn_factor(gamma, var, eps).reshape((-1,) + (1,) * (weight.dim() - 1))


def _bias_without_sqrt(*, bias, gamma, beta, mean, var, eps, **_unused):
    b = -mean.double() if bias is None else bias.double() - mean.double()
    out = b * _buggy_bn_factor(gamma, var, eps)
    return out if beta is None else out + beta.double()


def _kernel_folded_along_inputs(*, weight, gamma, var, eps, **_unused):
    """Scaled per input channel (dim 1) instead of per output channel: same shapes when in == out."""
    return weight.double() * recipes.bn_factor(gamma, var, eps).reshape((1, -1) + (1,) * (weight.dim() - 2))


FAULTS += [
    # The cached path looks recipes up by name in recipes.RECIPES; the converters call the fold
    # functions themselves, so a faulty recipe there is a fault of the cached path only.
    Fault("var_without_sqrt", "conv_bias_bn", ("conv/conv2d KERNEL", "conv/conv2d BIAS"),
          patch_recipes={"bn_fold_kernel": _kernel_without_sqrt, "bn_fold_bias": _bias_without_sqrt}),
    Fault("fold_along_inputs", "residual", ("conv1/conv2d KERNEL", "conv2/conv2d KERNEL"),
          patch_recipes={"bn_fold_kernel": _kernel_folded_along_inputs}),
]


@pytest.fixture(params=FAULTS, ids=lambda f: f.id)
def fault(request, compiled, monkeypatch):
    f: Fault = request.param
    c = compiled(f.model)
    engine = c.engine if f.edit_map is None else _with_map(c.engine, f.edit_map)
    for name, fn in f.patch_recipes.items():
        monkeypatch.setitem(recipes.RECIPES, name, fn)
    new = f.prepare(c.fresh(11))
    return f, c, engine, new


def test_audit_names_the_faulty_weight(fault):
    f, c, engine, new = fault
    cached = refitcore.cached_mapping(engine.weight_map, new.state_dict())
    fallback = refitcore.fallback_mapping(engine, new.state_dict())
    report = refitcore.audit(cached, fallback, a_label="cached", b_label="fallback")
    assert not report.ok
    failing = {d.name for d in report.failures}
    assert failing == set(f.culprits), str(report)
    assert report.worst.name in f.culprits
    text = str(report)
    assert "FAILED" in text and all(name in text for name in f.culprits)
    # The very same mapping, audited against itself, passes: the failure is the fault's.
    assert refitcore.audit(fallback, fallback).ok


def test_verify_fails_after_a_faulty_cached_refit(fault):
    f, c, engine, new = fault
    refitted = refitcore.refit(engine, new.state_dict(), path="cached").engine
    verdict = refitcore.verify(refitted, new, [c.x])
    assert not verdict.ok, str(verdict)
    assert "FAILED" in str(verdict)
    # The fallback path, on the same engine, is right.
    good = refitcore.refit(engine, new.state_dict(), path="fallback").engine
    assert refitcore.verify(good, new, [c.x]).ok


def test_auto_refit_falls_back_and_reports_the_culprit(fault):
    f, c, engine, new = fault
    result = refitcore.refit(engine, new.state_dict(), path="auto", verify_inputs=[c.x])
    assert result.fell_back and result.path == "fallback", str(result)
    assert result.ok and result.verdict.ok, str(result)
    assert result.audit is not None and not result.audit.ok
    culprit_lines = [m for m in result.messages if "first engine weight" in m]
    assert culprit_lines and any(name in culprit_lines[0] for name in f.culprits), result.messages
    assert any(name in str(result) for name in f.culprits)
    # The engine the caller holds and the model it was compiled from are untouched.
    assert refitcore.verify(engine, c.model, [c.x]).ok


def test_a_bug_in_the_shared_fold_arithmetic_is_caught_by_verification(compiled, monkeypatch):
    """The converters and the recipes share the BatchNorm fold arithmetic (recipes.bn_factor), so
    the two paths agree on a bug there: the audit cannot see it, verification against eager does."""
    c = compiled("conv_bias_bn")
    new = c.fresh(11)
    monkeypatch.setattr(recipes, "bn_factor", _buggy_bn_factor)
    cached = refitcore.cached_mapping(c.engine.weight_map, new.state_dict())
    assert refitcore.audit_paths(cached, refitcore.fallback_mapping(c.engine, new.state_dict())).ok
    for path in ("cached", "fallback"):
        refitted = refitcore.refit(c.engine, new.state_dict(), path=path).engine
        assert not refitcore.verify(refitted, new, [c.x]).ok, path


# --- one weight left stale ----------------------------------------------------------------------

STALE = "conv2/conv2d KERNEL"


def test_driver_refuses_a_mapping_missing_a_weight(compiled):
    c = compiled("residual")
    new = c.fresh(11)
    mapping = refitcore.cached_mapping(c.engine.weight_map, new.state_dict())
    del mapping[STALE]
    engine = c.engine.clone()
    before = [o.clone() for o in engine.run([c.x])]
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.apply_mapping(engine, mapping, in_place=True)
    assert STALE in str(info.value) and "stale" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.run([c.x])))


def _stale_mapping(c, new):
    mapping = refitcore.cached_mapping(c.engine.weight_map, new.state_dict())
    mapping[STALE] = np.array(c.engine.current_weights()[STALE]).reshape(mapping[STALE].shape)
    return mapping


def test_audit_against_expected_names_the_stale_weight(compiled):
    c = compiled("residual")
    new = c.fresh(11)
    expected = refitcore.fallback_mapping(c.engine, new.state_dict())
    report = refitcore.audit(_stale_mapping(c, new), expected, a_label="applied", b_label="expected")
    assert not report.ok
    assert [d.name for d in report.failures] == [STALE]
    assert STALE in str(report).splitlines()[1]  # the report leads with it
    # The engine the stale mapping produces disagrees with eager.
    stale_engine = refitcore.apply_mapping(c.engine, _stale_mapping(c, new))
    assert not refitcore.verify(stale_engine, new, [c.x]).ok
    # And its current weights, audited against what they should be, name the weight too.
    current = {k: np.asarray(v).reshape(expected[k].shape) for k, v in stale_engine.current_weights().items()}
    assert [d.name for d in refitcore.audit(current, expected).failures] == [STALE]


def test_auto_refit_recovers_from_a_stale_weight(compiled, monkeypatch):
    pipeline = sys.modules["refitcore.refitting.pipeline"]  # where refit() maps the weights

    c = compiled("residual")
    new = c.fresh(11)
    monkeypatch.setattr(pipeline, "cached_mapping", lambda wm, state, **_kw: _stale_mapping(c, new))
    result = refitcore.refit(c.engine, new.state_dict(), path="auto", verify_inputs=[c.x])
    assert result.fell_back and result.ok, str(result)
    assert any(STALE in m for m in result.messages), result.messages
