"""Property tests of refit over the reference models.

Hypothesis draws the *structure* of a weight set (seed, scale family, special values, sign flips,
negative BatchNorm gamma, running_var near eps) and torch materialises the tensors from it;
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
from refitcore.verify import compare_outputs
from tests.conftest import LARGE, bit_identical, outputs
from tests.models import SMALL

# VGG's 100M-parameter classifier makes each example cost ~10 s on 2 cores: run it with -m slow.
LARGE_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11_bn" else n for n in LARGE]

SCALES = {"kaiming": 1.0, "tiny": 1e-3, "large": 8.0, "uniform": 1.0}


@dataclasses.dataclass(frozen=True)
class WeightSet:
    """The structure of a weight set; :func:`materialize` turns it into a state_dict."""

    seed: int
    scale: str                 # a key of SCALES
    zero: str                  # none | tensor (one weight tensor all zeros) | channels (some output channels)
    sign_flips: bool           # negate a random subset of weight tensors
    negative_gamma: bool       # some BatchNorm gammas < 0
    var_near_eps: bool         # some running_var channels at 0, eps/10 or eps


weight_sets = st.builds(
    WeightSet,
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from(sorted(SCALES)),
    zero=st.sampled_from(["none", "tensor", "channels"]),
    sign_flips=st.booleans(),
    negative_gamma=st.booleans(),
    var_near_eps=st.booleans(),
)


def materialize(ws: WeightSet, model: nn.Module, tied: list[list[str]]) -> dict[str, torch.Tensor]:
    """A state_dict for ``model``'s architecture drawn as ``ws`` says. Tied parameters get one
    value; integer buffers (num_batches_tracked) stay as they are."""
    g = torch.Generator().manual_seed(ws.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bn_eps = {}
    roles = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bn_eps[prefix] = m.eps
            for p in ("weight", "bias", "running_mean", "running_var"):
                roles[prefix + p] = f"bn_{p}"
        elif isinstance(m, nn.LayerNorm):
            for p in ("weight", "bias"):
                roles[prefix + p] = f"ln_{p}"

    def randn(shape):
        return torch.randn(shape, generator=g)

    mult = SCALES[ws.scale]
    weight_keys = []
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        role = roles.get(key)
        shape = t.shape
        if role == "bn_running_var":
            v = torch.rand(shape, generator=g) * 1.5 + 0.5
            if ws.var_near_eps:
                eps = bn_eps[key[: -len("running_var")]]
                pick = torch.rand(shape, generator=g) < 0.25
                near = torch.tensor([0.0, eps / 10, eps])[torch.randint(0, 3, shape, generator=g)]
                v = torch.where(pick, near, v)
        elif role == "bn_running_mean":
            v = 0.5 * randn(shape)
        elif role == "bn_weight":
            v = 1 + 0.2 * randn(shape)
            if ws.negative_gamma:
                v = torch.where(torch.rand(shape, generator=g) < 0.5, -v, v)
        elif role in ("bn_bias", "ln_bias"):
            v = 0.2 * randn(shape)
        elif role == "ln_weight":
            v = 1 + 0.2 * randn(shape)
        elif t.dim() >= 2:
            fan_in = math.prod(shape[1:])
            if ws.scale == "uniform":
                v = (torch.rand(shape, generator=g) * 2 - 1) * math.sqrt(6.0 / fan_in)
            else:
                v = randn(shape) * math.sqrt(2.0 / fan_in) * mult
            weight_keys.append(key)
        else:  # conv / linear bias
            v = 0.1 * mult * randn(shape)
            weight_keys.append(key)
        state[key] = v.to(t.dtype)
    if ws.sign_flips:
        for key in weight_keys:
            if torch.rand((), generator=g) < 0.5:
                state[key] = -state[key]
    if ws.zero != "none" and weight_keys:
        key = weight_keys[int(torch.randint(0, len(weight_keys), (), generator=g))]
        if ws.zero == "tensor":
            state[key] = torch.zeros_like(state[key])
        else:
            rows = torch.rand(state[key].shape[0], generator=g) < 0.3
            state[key][rows] = 0.0
    for group in tied:
        for alias in group[1:]:
            state[alias] = state[group[0]]
    return state


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


def check_mappings_agree_and_match_eager(c, ws: WeightSet):
    state = materialize(ws, c.model, c.engine.weight_map.tied)
    cached = refitcore.cached_mapping(c.engine.weight_map, state)
    fallback = refitcore.fallback_mapping(c.engine, state)
    report = refitcore.audit(cached, fallback, a_label="cached", b_label="fallback")
    assert report.ok, f"{ws}\n{report}"
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


def check_refit_sequences(c, a: WeightSet, b: WeightSet):
    state_a = materialize(a, c.model, c.engine.weight_map.tied)
    state_b = materialize(b, c.model, c.engine.weight_map.tied)
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
    ws = WeightSet(seed=3, scale="kaiming", zero="tensor", sign_flips=True, negative_gamma=True, var_near_eps=True)
    state = materialize(ws, c.model, [])
    assert (state["bn.weight"] < 0).any()
    assert (state["bn.running_var"] <= 1e-5).any() and (state["bn.running_var"] >= 0).all()
    assert any(bool((v == 0).all()) for k, v in state.items() if k.endswith("weight") and v.dim() >= 2
               or k.endswith(".bias") and not k.startswith("bn"))
    assert torch.equal(state["bn.num_batches_tracked"], c.model.state_dict()["bn.num_batches_tracked"])
    tied = materialize(ws, compiled("tied_mlp").model, [["fc1.weight", "fc2.weight"]])
    assert torch.equal(tied["fc1.weight"], tied["fc2.weight"])
    assert not torch.equal(materialize(dataclasses.replace(ws, seed=4), c.model, [])["pw.weight"], state["pw.weight"])
