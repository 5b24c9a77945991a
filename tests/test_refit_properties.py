"""Property tests of refit over the reference models.

Hypothesis draws the *structure* of a weight set (seed, scale family, special values, sign flips,
negative BatchNorm gamma, running_var near eps) and the plugin's ``weight_set`` materialises it;
element-wise Hypothesis arrays would be far too slow for real models and shrink badly.

Properties: the cached and fallback mappings agree weight by weight; the refitted engine matches
eager PyTorch run with the new weights; A -> B -> A returns exactly A's outputs; refitting the
same weights twice changes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from torch import nn

import refitcore
from pytest_trtrefit.strategies import special_targets, weight_set
from refitcore.refitting.verify import compare_outputs
from tests.conftest import LARGE, bit_identical, outputs
from tests.models import SMALL

# VGG's 100M-parameter classifier makes each example cost ~10 s on 2 cores: run it with -m slow.
LARGE_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11_bn" else n for n in LARGE]

# The test's scale families, as the plugin's weight_set (scale family, gain) parameters: "uniform"
# is fan-in uniform with He variance (+-sqrt(6/fan_in)).
FAMILIES = {"kaiming": ("he", 1.0), "tiny": ("he", 1e-3), "large": ("he", 8.0),
            "uniform": ("fan_in_uniform", math.sqrt(2))}


@dataclasses.dataclass(frozen=True)
class Draw:
    """The structure of a weight set, model-agnostic; :func:`materialize` turns it into the plugin's
    ``weight_set`` call for one model."""

    seed: int
    family: str                # a key of FAMILIES
    zero: str                  # none | tensor (one kernel all zeros) | channels (some of its output channels)
    sign_flips: int            # bit i set: negate the i-th (mod 16) weight tensor that can be flipped
    negative_gamma: bool       # every BatchNorm gamma < 0
    var_near_eps: bool         # one BatchNorm's running_var in [0, 2*eps]
    pick: int                  # which kernel is zeroed, which BatchNorm gets variances near eps


weight_sets = st.builds(
    Draw,
    seed=st.integers(0, 2**31 - 1),
    family=st.sampled_from(sorted(FAMILIES)),
    zero=st.sampled_from(["none", "tensor", "channels"]),
    sign_flips=st.integers(0, 2**16 - 1),
    negative_gamma=st.booleans(),
    var_near_eps=st.booleans(),
    pick=st.integers(0, 2**16 - 1),
)


def materialize(d: Draw, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict for ``model``'s architecture drawn as ``d`` says. Tied parameters get one value;
    integer buffers (num_batches_tracked) stay as they are."""
    scale, gain = FAMILIES[d.family]
    specials = [(k, kind) for i, (k, kind) in enumerate(special_targets(model, ["sign_flip"]))
                if d.sign_flips >> (i % 16) & 1]
    if d.negative_gamma:
        specials += special_targets(model, ["negative_gamma"])
    variances = special_targets(model, ["var_near_eps"])
    if d.var_near_eps and variances:
        specials.append(variances[d.pick % len(variances)])
    kernels = [k for k, _ in special_targets(model, ["zero_channels"])]
    if d.zero != "none" and kernels:
        specials.append((kernels[d.pick % len(kernels)], "zeros" if d.zero == "tensor" else "zero_channels"))
    return weight_set(model, seed=d.seed, scale=scale, gain=gain, specials=specials, keep_integers=True)


def _eager(c, state):
    model = copy.deepcopy(c.model)
    model.load_state_dict(state)
    return model.eval()


def well_conditioned(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether eager fp32 itself reproduces eager fp64 within verify's tolerances. Some draws (large
    scales through MobileNet's 50 layers) make the model chaotic: fp32 eager then differs from
    fp64 eager by as much as any engine could, and no fp32 engine can be held to it."""
    with torch.no_grad():
        y32 = model(x)
        y64 = copy.deepcopy(model).double()(x.double())
    return all(check.ok for check in compare_outputs([y32], [y64]))


def check_mappings_agree_and_match_eager(c, ws: Draw):
    state = materialize(ws, c.model)
    cached = refitcore.cached_mapping(c.engine.weight_map, state)
    fallback = refitcore.fallback_mapping(c.engine, state)
    report = refitcore.audit_paths(cached, fallback)      # exact: one arithmetic on both paths
    assert report.ok and report.rtol == report.atol == 0, f"{ws}\n{report}"
    model = _eager(c, state)
    conditioned = well_conditioned(model, c.x)
    event(f"eager fp32 reproduces fp64: {conditioned}")
    assume(conditioned)
    for label, mapping in (("cached", cached), ("fallback", fallback)):
        verdict = refitcore.verify(refitcore.apply_mapping(c.engine, mapping), model, [c.x])
        assert verdict.ok, f"{label} path, {ws}\n{verdict}"
    # And the public entry point agrees: refit(path="cached") with verification, no fallback needed.
    result = refitcore.refit(c.engine, state, path="cached", verify_inputs=[c.x], reference_model=model)
    assert result.ok and result.path == "cached" and not result.fell_back, f"{ws}\n{result}"


def check_refit_sequences(c, a: Draw, b: Draw):
    state_a = materialize(a, c.model)
    state_b = materialize(b, c.model)
    engine = refitcore.refit(c.engine, state_a).engine          # a private copy from here on
    out_a = outputs(engine, c.x)
    weights_a = {k: np.array(v) for k, v in engine.current_weights().items()}
    # The same weights twice: nothing changes.
    refitcore.refit(engine, state_a, in_place=True)
    assert bit_identical(out_a, outputs(engine, c.x)), f"{a}: refit with the same weights changed the outputs"
    assert all(np.array_equal(weights_a[k], v) for k, v in engine.current_weights().items())
    # A -> B -> A: exactly A again.
    refitcore.refit(engine, state_b, in_place=True)
    if a != b:
        changed = [k for k, v in engine.current_weights().items() if not np.array_equal(weights_a[k], v)]
        assert changed or all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    refitcore.refit(engine, state_a, in_place=True)
    assert bit_identical(out_a, outputs(engine, c.x)), f"A={a} B={b}: A -> B -> A did not return to A"
    assert all(np.array_equal(weights_a[k], v) for k, v in engine.current_weights().items())


PROPS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                   HealthCheck.filter_too_much])


@pytest.mark.parametrize("name", SMALL)
@settings(max_examples=5, **PROPS)
@given(ws=weight_sets)
def test_small_mappings_agree_and_match_eager(compiled, name, ws):
    check_mappings_agree_and_match_eager(compiled(name), ws)


@pytest.mark.parametrize("name", SMALL)
@settings(max_examples=3, **PROPS)
@given(a=weight_sets, b=weight_sets)
def test_small_refit_sequences(compiled, name, a, b):
    check_refit_sequences(compiled(name), a, b)


@pytest.mark.parametrize("name", LARGE_PARAMS)
@settings(max_examples=1, **PROPS)
@given(ws=weight_sets)
def test_large_mappings_agree_and_match_eager(compiled, name, ws):
    check_mappings_agree_and_match_eager(compiled(name), ws)


@pytest.mark.parametrize("name", LARGE_PARAMS)
@settings(max_examples=1, **PROPS)
@given(a=weight_sets, b=weight_sets)
def test_large_refit_sequences(compiled, name, a, b):
    check_refit_sequences(compiled(name), a, b)


def test_fallback_with_the_compiled_weights_reproduces_the_engine_exactly(compiled):
    """Conversion is deterministic: the fallback path fed the compile-time weights gives the
    compiled engine's weights bit for bit."""
    for name in ("conv_bn_relu", "residual", "tied_mlp"):
        c = compiled(name)
        fallback = refitcore.fallback_mapping(c.engine, c.model.state_dict())
        current = c.engine.current_weights()
        assert set(fallback) == set(current)
        assert all(np.array_equal(np.asarray(current[k]).reshape(-1), v.reshape(-1)) for k, v in fallback.items())


def test_materialize_honours_the_structure(compiled):
    """The generator is part of the test: its special values must really appear."""
    c = compiled("depthwise_bn")
    ws = Draw(seed=3, family="kaiming", zero="tensor", sign_flips=0xFFFF, negative_gamma=True, var_near_eps=True,
              pick=2)   # zeroes the third kernel (grouped.weight); the first BatchNorm's variances
    state = materialize(ws, c.model)
    assert (state["bn.weight"] < 0).any()
    assert (state["bn.running_var"] <= 1e-5).any() and (state["bn.running_var"] >= 0).all()
    assert any(bool((v == 0).all()) for k, v in state.items() if k.endswith("weight") and v.dim() >= 2
               or k.endswith(".bias") and not k.startswith("bn"))
    assert torch.equal(state["bn.num_batches_tracked"], c.model.state_dict()["bn.num_batches_tracked"])
    tied = materialize(ws, compiled("tied_mlp").model)
    assert torch.equal(tied["fc1.weight"], tied["fc2.weight"])
    assert not torch.equal(materialize(dataclasses.replace(ws, seed=4), c.model)["pw.weight"], state["pw.weight"])
    channels = materialize(dataclasses.replace(ws, zero="channels"), c.model)["grouped.weight"]
    assert any(bool((row == 0).all()) for row in channels) and not bool((channels == 0).all())


@pytest.mark.parametrize("name", ["residual", "conv_bias_bn"])
def test_a_b_a_through_the_cached_path_returns_bit_identically_to_the_compiled_engine(compiled, name):
    """Compile, cached and fallback fold BatchNorm with one arithmetic: refitting the compiled
    weights back after other weights gives the compiled engine's weights bit for bit."""
    c = compiled(name)
    compiled_weights = {k: np.array(v) for k, v in c.engine.current_weights().items()}
    state_a = c.model.state_dict()
    engine = refitcore.refit(c.engine, c.fresh(5).state_dict(), path="cached").engine
    assert any(not np.array_equal(compiled_weights[k], v) for k, v in engine.current_weights().items())
    refitcore.refit(engine, state_a, path="cached", in_place=True)
    assert all(np.array_equal(compiled_weights[k], v) for k, v in engine.current_weights().items())
    # Each mapping of A on its own is the compiled engine's weights, exactly.
    for mapping in (refitcore.cached_mapping(c.engine.weight_map, state_a),
                    refitcore.fallback_mapping(c.engine, state_a)):
        assert set(mapping) == set(compiled_weights)
        assert all(np.array_equal(compiled_weights[k].reshape(-1), v.reshape(-1)) for k, v in mapping.items())
