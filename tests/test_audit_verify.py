"""Audit and verify verdicts (their reports name the worst weight/output, the tolerances and the
smallest tolerance that would pass; fed wrong data they fail), and architecture mismatches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.refitting.verify import compare_outputs

MODEL = "residual"


@pytest.fixture
def mapping(compiled):
    c = compiled(MODEL)
    return refitcore.cached_mapping(c.engine.weight_map, c.fresh(3).state_dict())


def _perturbed(mapping, name, index, delta):
    out = {k: v.copy() for k, v in mapping.items()}
    out[name].reshape(-1)[index] += delta
    return out


# --- audit ------------------------------------------------------------------------------------

def test_audit_of_equal_mappings_is_ok(mapping):
    report = refitcore.audit(mapping, {k: v.copy() for k, v in mapping.items()})
    assert report.ok and bool(report)
    assert report.failures == [] and report.first_failure() is None
    assert str(report).startswith("audit a vs b: OK")
    assert "closest to failing" in str(report)


def test_audit_names_the_worst_weight_and_the_tolerance_that_would_pass(mapping):
    small, big = "conv1/conv2d BIAS", "conv2/conv2d KERNEL"
    bad = _perturbed(_perturbed(mapping, small, 1, 1e-3), big, 5, 0.5)
    report = refitcore.audit(bad, mapping, a_label="cached", b_label="fallback")
    assert not report.ok and not bool(report)
    assert [d.name for d in report.failures] == [big, small]  # worst first
    lines = str(report).splitlines()
    assert "cached vs fallback: FAILED" in lines[0] and "rtol=1e-05" in lines[0] and "atol=1e-07" in lines[0]
    assert lines[1].startswith(f"  - {big}") and "max abs diff 0.5" in lines[1]
    worst = report.worst
    assert worst.name == big and worst.index is not None
    assert worst.max_abs == pytest.approx(0.5, rel=1e-5)
    assert worst.a_value - worst.b_value == pytest.approx(0.5, rel=1e-5)
    hint = next(line for line in lines if "would pass" in line)
    min_rtol = max(d.max_rel for d in report.failures)
    assert f"rtol>={min_rtol:.3g}" in hint
    # The stated minimum is the real minimum: just above passes, just below fails.
    assert refitcore.audit(bad, mapping, rtol=min_rtol * 1.001).ok
    assert not refitcore.audit(bad, mapping, rtol=min_rtol * 0.999).ok
    assert refitcore.audit(bad, mapping, atol=0.5 * 1.001).ok
    # First failure in engine order (conv1 comes before conv2).
    assert report.first_failure(list(mapping)).name == small


@pytest.mark.parametrize("fault,status", [
    ("missing", "missing"), ("extra", "extra"), ("shape", "shape"), ("dtype", "dtype"), ("nan", "nonfinite"),
])
def test_audit_structural_failures(mapping, fault, status):
    name = "conv2/conv2d BIAS"
    bad = {k: v.copy() for k, v in mapping.items()}
    if fault == "missing":
        del bad[name]
    elif fault == "extra":
        bad["ghost KERNEL"] = np.zeros(3, np.float32)
        name = "ghost KERNEL"
    elif fault == "shape":
        bad[name] = bad[name][:-1]
    elif fault == "dtype":
        bad[name] = bad[name].astype(np.float64)
    elif fault == "nan":
        bad[name][0] = np.nan
    report = refitcore.audit(bad, mapping)
    assert not report.ok
    assert [(d.name, d.status) for d in report.failures] == [(name, status)]
    assert name in str(report) and "no tolerance would pass" in str(report)


def test_audit_accepts_flat_engine_kernels(compiled):
    """TensorRT hands kernels back flat: a flat and a shaped copy of the same values agree, but a
    same-count different shape does not."""
    c = compiled(MODEL)
    shaped = refitcore.cached_mapping(c.engine.weight_map, c.model.state_dict())
    flat = {k: v.reshape(-1) for k, v in shaped.items()}
    assert refitcore.audit(flat, shaped).ok
    name = "conv1/conv2d KERNEL"
    other = dict(shaped, **{name: shaped[name].reshape(shaped[name].shape[::-1])})
    assert not refitcore.audit(other, shaped).ok


# --- verify -----------------------------------------------------------------------------------

def test_verify_passes_on_the_right_model_and_fails_on_another(compiled):
    c = compiled(MODEL)
    ok = refitcore.verify(c.engine, c.model, [c.x])
    assert ok.ok and bool(ok) and "OK" in str(ok)
    assert "reference" in str(ok)  # says which backend ran (and what it does not prove)
    bad = refitcore.verify(c.engine, c.fresh(3), [c.x, c.x * 2])  # never raises on a mismatch
    assert not bad.ok and not bool(bad)
    text = str(bad)
    assert "FAILED over 2 sample(s)" in text
    assert "sample 0, output 0" in text and "sample 1, output 0" in text
    # It leads with the worst output: the sample with the larger error (inputs scaled by 2 there).
    assert text.splitlines()[1].startswith("  worst: sample 1, output 0")
    assert "max abs err" in text and "rtol=0.0001" in text and "atol=0.0001" in text
    assert "would pass with atol>=" in text and "rtol>=" in text


def test_verify_min_tolerances_are_real(compiled):
    c = compiled(MODEL)
    other = c.fresh(3)
    check = refitcore.verify(c.engine, other, [c.x]).worst
    assert not check.ok and check.mismatched > 0
    assert refitcore.verify(c.engine, other, [c.x], atol=check.min_atol * 1.001).ok
    assert not refitcore.verify(c.engine, other, [c.x], atol=check.min_atol * 0.99).ok
    # ReLU outputs have exact zeros where eager is 0 and the engine is not: no rtol passes there.
    assert check.min_rtol == float("inf") and "rtol>=inf" in str(check)
    assert not refitcore.verify(c.engine, other, [c.x], rtol=1e6).ok
    # Without exact zeros in eager, the stated rtol is the real minimum.
    expected = [torch.linspace(1, 2, 50)]
    actual = [expected[0] * 1.01]
    (cmp,) = compare_outputs(actual, expected)
    assert not cmp.ok and cmp.min_rtol < 0.01
    assert compare_outputs(actual, expected, rtol=cmp.min_rtol * 1.001)[0].ok
    assert not compare_outputs(actual, expected, rtol=cmp.min_rtol * 0.99)[0].ok


def test_the_margin_is_the_error_over_what_the_rule_allows():
    """A relative error above rtol passes where atol covers it: the margin says so in the rule's own
    terms, |err| / (atol * max(1, max|eager|) + rtol * |eager|), <= 1 exactly when every element passes."""
    expected = torch.tensor([[1e-3, 0.5, -2.0, 0.0]], dtype=torch.float64)
    passing = expected + torch.tensor([[1.7e-7, 1e-4, -1e-4, 0.0]], dtype=torch.float64)
    (check,) = compare_outputs([passing], [expected], rtol=1e-4, atol=1e-4)
    assert check.ok and check.max_rel > 1e-4                       # rel err 1.7e-4 > rtol, yet it passes
    allowed = 1e-4 * 2.0 + 1e-4 * expected.abs()                   # atol * max(1, max|eager|) + rtol * |eager|
    assert check.margin == pytest.approx(float(((passing - expected).abs() / allowed).max()))
    assert 0 < check.margin <= 1
    failing = expected + torch.tensor([[0.0, 5e-4, 0.0, 0.0]], dtype=torch.float64)
    (check,) = compare_outputs([failing], [expected], rtol=1e-4, atol=1e-4)
    assert not check.ok and check.margin == pytest.approx(5e-4 / (2e-4 + 0.5e-4)) and check.margin > 1
    (check,) = compare_outputs([expected.clone()], [expected], rtol=0.0, atol=0.0)
    assert check.ok and check.margin == 0.0                        # exact: nothing allowed, nothing needed
    nan = expected.clone()
    nan[0, 3] = float("nan")
    (check,) = compare_outputs([nan], [expected])
    assert not check.ok and check.margin == float("inf")
    verdict = refitcore.Verdict([[compare_outputs([passing], [expected])[0]],
                                 [compare_outputs([failing], [expected])[0]]])
    assert verdict.margin == pytest.approx(2.0)


def test_verify_catches_a_tiny_error_and_nonfinite_values():
    expected = [torch.linspace(-3, 3, 100).reshape(10, 10)]
    actual = [expected[0].clone()]
    actual[0][4, 7] += 1e-3
    (check,) = compare_outputs(actual, expected)
    assert not check.ok and check.mismatched == 1 and check.max_abs_at == (4, 7)
    assert "[4, 7]" in str(check)
    nan = [expected[0].clone()]
    nan[0][0, 0] = float("nan")
    (check,) = compare_outputs(nan, expected)
    assert not check.ok and check.nonfinite == 1 and "non-finite" in str(check)
    (check,) = compare_outputs([expected[0].clone()], expected)
    assert check.ok and check.max_abs == 0.0
    with pytest.raises(ValueError, match="shape"):
        compare_outputs([expected[0].reshape(-1)], expected)


def test_refit_result_reports_a_failed_verification(compiled):
    c = compiled(MODEL)
    result = refitcore.refit(c.engine, c.fresh(3), path="cached", verify_inputs=[c.x], reference_model=c.model)
    assert not result.ok and not result.fell_back
    assert "FAILED" in str(result) and "verify" in str(result)


# --- architecture mismatch ---------------------------------------------------------------------

class ReluAfter(nn.Module):
    """conv_bias_bn's weights exactly, one more op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Wider(ReluAfter):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(16, eps=1e-3)

    def forward(self, x):
        return self.bn(self.conv(x))


def _other_op(c):
    m = ReluAfter().eval()
    m.load_state_dict(c.model.state_dict())
    return m


@pytest.mark.parametrize("as_program", [False, True], ids=["module", "exported_program"])
def test_other_graph_is_an_architecture_mismatch(compiled, as_program):
    c = compiled("conv_bias_bn")
    other = _other_op(c)
    source = torch.export.export(other, (c.x,)) if as_program else other
    with pytest.raises(refitcore.ArchitectureMismatchError) as info:
        refitcore.fallback_mapping(c.engine, source)
    text = str(info.value)
    assert "recompile" in text and "aten.relu.default" in text and "first difference" in text
    with pytest.raises(refitcore.ArchitectureMismatchError):
        refitcore.refit(c.engine, source, path="fallback")


def test_other_graph_is_caught_by_auto_refit_with_verification(compiled):
    """The cached path reads only the state_dict; verification notices the other graph, and the
    fallback refuses it."""
    c = compiled("conv_bias_bn")
    with pytest.raises(refitcore.ArchitectureMismatchError, match="recompile"):
        refitcore.refit(c.engine, _other_op(c), verify_inputs=[c.x])


@pytest.mark.parametrize("path", ["cached", "fallback", "auto"])
def test_other_weight_shapes_are_an_architecture_mismatch(compiled, path):
    c = compiled("conv_bias_bn")
    with pytest.raises(refitcore.ArchitectureMismatchError) as info:
        refitcore.refit(c.engine, Wider().eval(), path=path)
    text = str(info.value)
    assert "recompile" in text
    assert "'conv.weight': shape [16, 3, 3, 3] where the compiled model has [8, 3, 3, 3]" in text
    assert "conv/conv2d KERNEL" in text


def test_same_architecture_is_not_a_mismatch(compiled):
    c = compiled("conv_bias_bn")
    fallback = refitcore.fallback_mapping(c.engine, c.fresh(9))
    assert refitcore.audit(refitcore.cached_mapping(c.engine.weight_map, c.fresh(9).state_dict()), fallback).ok


def test_an_infinity_equal_to_eager_is_equal_and_anything_else_there_is_a_mismatch():
    """A -inf that eager has too (a mask fill) matches; the tolerance scales with eager's finite values
    only (an eager infinity must not widen it to infinity); at eager's infinities nothing else passes."""
    expected = torch.tensor([[1.0, float("-inf"), 2.0], [float("inf"), 0.5, -3.0]])
    (check,) = compare_outputs([expected.clone()], [expected])
    assert check.ok and check.max_abs == 0.0 and check.margin == 0.0 and check.nonfinite == 0
    for at, value in (((0, 1), 5.0), ((0, 1), float("inf")), ((0, 1), float("nan")), ((1, 0), 1e30)):
        wrong = expected.clone()
        wrong[at] = value
        (check,) = compare_outputs([wrong], [expected])
        assert not check.ok and check.mismatched + check.nonfinite >= 1 and check.max_abs_at == at, (at, value)
    off = expected.clone()
    off[0, 0] += 1.0       # a finite error next to eager's infinities: judged on the finite scale (max 3)
    (check,) = compare_outputs([off], [expected])
    assert not check.ok and check.mismatched == 1 and check.max_abs == pytest.approx(1.0)
    nan_both = torch.tensor([float("nan"), 1.0])
    (check,) = compare_outputs([nan_both.clone()], [nan_both])
    assert not check.ok    # NaN is never equal
