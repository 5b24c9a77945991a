"""Tolerances of reduced-precision engines calibrated by the model's own precision noise.

A deep network in bfloat16 differs from itself in float32 by more than the bf16 default tolerance
allows (the 7B Llama of benchmarks/bench_scale.py: eager bf16 and a correctly refitted engine differ
by more than 7% of the largest logit). ``verify`` measures that noise on each sample (the reference
run once more in the other type) and allows NOISE_FACTOR times it; mapping bugs still fail, a model
whose noise is small keeps the defaults, and one whose noise swamps everything is unverifiable.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import refitcore
from refitcore.refitting.verify import MAX_NOISE_ATOL, NOISE_FACTOR, precision_noise


class Deep(nn.Module):
    """A residual stack whose bfloat16 rounding noise grows with depth (scale: the gain per layer)."""

    def __init__(self, depth: int = 32, scale: float = 4.0, width: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.randn(width, width, generator=g) * scale / width ** 0.5)
                layer.bias.copy_(torch.randn(width, generator=g) * 0.1)

    def forward(self, x):
        for layer, norm in zip(self.layers, self.norms):
            x = x + torch.tanh(layer(norm(x))) * 2
        return x


X = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def deep_bf16():
    model = Deep().to(torch.bfloat16).eval()
    x = X.to(torch.bfloat16)
    return model, x, refitcore.compile(model, x, backend="reference")


def test_the_atol_of_a_noisy_bf16_model_is_raised_to_its_measured_noise(deep_bf16):
    """This model's bfloat16 rounding moves its output by about 6.6% of its largest value: the
    verdict allows twice that (not the flat 7%), says so, and a tolerance set by hand is kept."""
    model, x, engine = deep_bf16
    noise, what = precision_noise(model, (x,), {}, [model(x)], torch.bfloat16)
    assert what == "eager bfloat16 vs eager float32" and 0.035 < noise < MAX_NOISE_ATOL / NOISE_FACTOR
    verdict = refitcore.verify(engine, model, [x])                   # the bf16 defaults: calibrated
    assert verdict, str(verdict)
    assert verdict.checks[0][0].atol == pytest.approx(NOISE_FACTOR * noise)
    assert "atol raised from the bf16 default 0.07" in verdict.calibration and "tolerance:" in str(verdict)
    assert verdict.to_json()["calibration"] == verdict.calibration and not verdict.unverifiable
    by_hand = refitcore.verify(engine, model, [x], atol=0.0700001)   # not the default: used as it is
    assert by_hand.calibration == "" and by_hand.checks[0][0].atol == 0.0700001


def test_a_chaotic_model_is_unverifiable_not_passed():
    """Rounding moves this model's outputs by a fifth of their range: no tolerance tells a mapping
    bug from rounding, so the verdict fails as unverifiable and says what to do instead."""
    model = Deep(depth=48, scale=10.0).to(torch.bfloat16).eval()
    x = X.to(torch.bfloat16)
    engine = refitcore.compile(model, x, backend="reference")
    verdict = refitcore.verify(engine, model, [x])
    assert not verdict and verdict.checks[0][0].atol == MAX_NOISE_ATOL
    assert "capped at 0.25" in verdict.calibration
    assert "verify this model at fp32, or by the exact audit" in verdict.unverifiable
    assert "unverifiable:" in str(verdict) and "FAILED" in str(verdict)


def test_mapping_bugs_still_fail_at_the_calibrated_tolerance(deep_bf16):
    model, x, engine = deep_bf16
    state = model.state_dict()
    for a, b in (("layers.1.weight", "layers.5.weight"), ("layers.20.weight", "layers.21.weight")):
        bad = dict(state)
        bad[a], bad[b] = state[b], state[a]
        result = refitcore.refit(engine, bad, path="cached", verify_inputs=[x], reference_model=model)
        assert not result and "atol raised" in result.verdict.calibration, str(result.verdict)
    transposed = dict(state)
    transposed["layers.20.weight"] = state["layers.20.weight"].t().contiguous()
    assert not refitcore.refit(engine, transposed, path="cached", verify_inputs=[x], reference_model=model)


def test_float32_model_at_bf16_is_measured_in_bf16_and_quiet_models_keep_the_defaults():
    torch.manual_seed(0)
    shallow = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    engine = refitcore.compile(shallow, x, backend="reference", precision="bf16")
    noise, what = precision_noise(shallow, (x,), {}, [shallow(x)], torch.bfloat16)
    assert what == "eager float32 vs eager bfloat16" and 0 < noise < 0.035
    verdict = refitcore.verify(engine, shallow, [x])
    assert verdict and verdict.calibration == "" and verdict.checks[0][0].atol == 0.07
    deep = Deep().eval()                                          # float32 model, bf16 engine
    engine = refitcore.compile(deep, X, backend="reference", precision="bf16")
    verdict = refitcore.verify(engine, deep, [X])
    assert verdict, str(verdict)
    assert "eager float32 vs eager bfloat16" in verdict.calibration


def test_noise_is_not_measured_where_it_cannot_be_and_the_verdict_says_why(deep_bf16):
    model, x, engine = deep_bf16
    handle = model.layers[0].register_forward_hook(lambda m, i, o: None)
    try:
        verdict = refitcore.verify(engine, model, [x])
    finally:
        handle.remove()
    assert "not measured: the reference module has forward hooks of its own" in verdict.calibration
    assert verdict.checks[0][0].atol == 0.07                        # the bf16 default, as it is
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())   # its hooks: removed
    assert "atol raised" in refitcore.verify(engine, model, [x]).calibration    # measured again once they are gone
