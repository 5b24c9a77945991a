"""The Hypothesis strategies of pytest_trtrefit.strategies: valid weight sets, readable shrinking."""
from __future__ import annotations

import pytest
import torch
from hypothesis import find, given, settings, strategies as st
from torch import nn

from pytest_trtrefit.strategies import (
    LARGE,
    TINY,
    InputSample,
    WeightSequence,
    WeightSet,
    inputs,
    perturbations,
    refit_sequences,
    refit_settings,
    special_targets,
    state_dicts,
    weight_set,
)


class Net(nn.Module):
    """Conv + BatchNorm (folded), a LayerNorm'd MLP head whose two layers share one weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        self.fc1 = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 4, bias=False)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(self.norm(torch.relu(self.fc1(y))))


NET = Net()
FAST = settings(max_examples=15, deadline=None, database=None)


def _valid(weights: dict, model: nn.Module = NET) -> None:
    own = model.state_dict()
    assert list(weights) == list(own)
    for k, t in weights.items():
        assert t.shape == own[k].shape and t.dtype == own[k].dtype, k
        if t.dtype.is_floating_point:
            assert bool(torch.isfinite(t).all()), k
    assert bool((weights["bn.running_var"] >= 0).all())
    assert weights["bn.num_batches_tracked"].dtype == torch.int64
    assert weights["bn.num_batches_tracked"].item() >= 0
    assert torch.equal(weights["fc1.weight"], weights["fc2.weight"])     # tied: identical values
    copy = Net().eval()
    copy.load_state_dict(weights, strict=True)
    assert bool(torch.isfinite(copy(torch.randn(1, 3, 8, 8))).all())


@FAST
@given(weights=state_dicts(NET))
def test_state_dicts_are_valid_for_the_model(weights):
    assert isinstance(weights, WeightSet)
    _valid(weights)


@FAST
@given(weights=state_dicts(Net, scales=("unit",), max_specials=0))
def test_a_factory_works_like_a_module(weights):
    _valid(weights)


def test_shrinking_ends_at_a_small_readable_example():
    # Any weight set that touches BatchNorm's variance: the minimal one says exactly that.
    found = find(state_dicts(NET), lambda w: any(kind == "var_near_eps" for _, kind in w.meta["specials"]),
                 settings=settings(database=None, max_examples=500))
    assert repr(found) == "state_dicts(seed=0, scale='fan_in', specials=[('bn.running_var', 'var_near_eps')])"
    assert bool((found["bn.running_var"] <= 2 * 1e-3).all())       # the model's own eps, not a default
    simplest = find(state_dicts(NET), lambda w: True, settings=settings(database=None))
    assert repr(simplest) == "state_dicts(seed=0, scale='fan_in', specials=[])"
    assert "tensor(" not in repr(found) and len(repr(found)) < 120


@pytest.mark.parametrize("kind, key, check", [
    pytest.param("zeros", "conv.weight", lambda t, base: bool((t == 0).all()), id="zeros"),
    pytest.param("large", "bn.bias", lambda t, base: torch.allclose(t, base * LARGE), id="large"),
    pytest.param("tiny", "fc1.bias", lambda t, base: torch.allclose(t, base * TINY), id="tiny"),
    pytest.param("sign_flip", "bn.running_mean", lambda t, base: torch.equal(t, -base), id="sign-flip"),
    pytest.param("negative_gamma", "bn.weight", lambda t, base: bool((t <= 0).all()), id="negative-gamma"),
    pytest.param("zero_channels", "conv.weight",
                 lambda t, base: any(bool((row == 0).all()) for row in t)
                 and all(bool((row == 0).all()) or torch.equal(row, b) for row, b in zip(t, base)), id="zero-channels"),
])
def test_each_special_value_does_what_it_says(kind, key, check):
    strategy = state_dicts(NET, specials=(kind,), max_specials=1)
    hit = find(strategy, lambda w: (key, kind) in w.meta["specials"],
               settings=settings(database=None, max_examples=2000))
    plain = weight_set(NET, seed=hit.meta["seed"], scale=hit.meta["scale"])   # the same draw, no special
    assert check(hit[key], plain[key])
    assert all(torch.equal(hit[k], plain[k]) for k in plain if k not in (key, "fc2.weight"))
    _valid(hit)


def test_specials_on_a_tied_weight_keep_the_tie():
    hit = find(state_dicts(NET, specials=("large",), max_specials=1),
               lambda w: ("fc1.weight", "large") in w.meta["specials"],
               settings=settings(database=None, max_examples=2000))
    assert hit["fc1.weight"] is hit["fc2.weight"]
    # the follower of a tie is never a target of its own, so no draw gives the two different values
    targets = {key for key, _ in special_targets(NET)}
    assert "fc1.weight" in targets and "fc2.weight" not in targets


def test_fan_in_scaling_keeps_a_deep_net_finite_and_bounded():
    deep = nn.Sequential(*[m for _ in range(24) for m in (nn.Linear(64, 64), nn.ReLU())]).eval()
    found = find(state_dicts(deep, scales=("fan_in",), max_specials=0), lambda w: True,
                 settings=settings(database=None))
    deep.load_state_dict(found)
    with torch.no_grad():
        out = deep(torch.randn(8, 64))
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) < 1e3


@FAST
@given(data=st.data())
def test_perturbations_stay_valid_and_move_what_they_say(data):
    base = data.draw(state_dicts(NET, max_specials=0), label="base")
    new = data.draw(perturbations(base), label="new")
    _valid(new)
    kind = new.meta["kind"]
    assert torch.equal(new["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    changed = [k for k in base if not torch.equal(base[k], new[k])]
    if kind == "single_tensor":
        assert changed in ([new.meta["key"]], ["fc1.weight", "fc2.weight"])
    elif kind == "low_rank":
        (key, *rest) = changed
        assert key == new.meta["key"] and rest in ([], ["fc2.weight"])
        delta = (new[key] - base[key]).double().reshape(new[key].shape[0], -1)
        assert torch.linalg.matrix_rank(delta, rtol=1e-3) <= 2   # float32 rounding adds noise
    else:
        assert set(changed) >= {"conv.weight", "bn.running_var", "fc1.weight", "fc2.weight"}
    assert repr(new).startswith(f"perturbations(kind={kind!r}") and "tensor(" not in repr(new)


def test_perturbations_reject_what_they_cannot_perturb():
    with pytest.raises(TypeError, match="expected a dict of tensors"):
        perturbations({"a": [1.0]})
    with pytest.raises(ValueError, match="no floating-point tensors"):
        perturbations({"n": torch.tensor(3)})


@FAST
@given(sequence=refit_sequences(NET, min_size=2, max_size=4))
def test_refit_sequences_return_to_the_start(sequence):
    assert isinstance(sequence, WeightSequence)
    assert 2 <= len(sequence) <= 4
    assert sequence[-1] is sequence[0] and sequence.labels[-1] == "A"
    for step in sequence:
        _valid(step)
    assert repr(sequence).startswith("refit_sequences([A=state_dicts(") and repr(sequence).endswith("A again])")


@FAST
@given(sample=inputs([torch.zeros(2, 3, 8, 8), (2, 5), torch.zeros(2, 4, dtype=torch.int64)]))
def test_inputs_follow_the_spec(sample):
    assert isinstance(sample, InputSample) and len(sample) == 3
    assert [tuple(t.shape) for t in sample] == [(2, 3, 8, 8), (2, 5), (2, 4)]
    assert [t.dtype for t in sample] == [torch.float32, torch.float32, torch.int64]
    assert bool(((sample[2] >= 0) & (sample[2] < 2)).all())
    if "'zeros'" in repr(sample):
        assert not sample[0].any()
    assert repr(sample).startswith("inputs(seed=")


def test_refit_settings_have_no_deadline_and_bounded_examples():
    s = refit_settings()
    assert s.deadline is None and s.max_examples <= 10 ** 3
    assert refit_settings(max_examples=3).max_examples == 3


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda: state_dicts(NET, scales=("xavier",)), "choose one or more of", id="scale"),
    pytest.param(lambda: state_dicts(NET, scales=()), "choose one or more of", id="no-scale"),
    pytest.param(lambda: state_dicts(NET, specials=("nan",)), "unknown", id="special"),
    pytest.param(lambda: state_dicts(NET, max_specials=-1), ">= 0", id="max-specials"),
    pytest.param(lambda: state_dicts(42), "expected an nn.Module", id="not-a-model"),
    pytest.param(lambda: perturbations(NET.state_dict(), kinds=("dropout",)), "choose one or more of", id="kind"),
    pytest.param(lambda: refit_sequences(NET, min_size=3, max_size=2), "min_size", id="sizes"),
    pytest.param(lambda: inputs((1, 3), families=("gaussian",)), "choose one or more of", id="family"),
    pytest.param(lambda: inputs("image"), "expected a tensor or a shape", id="spec"),
])
def test_invalid_arguments_say_what_to_do(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_weight_set_is_the_strategy_draw_and_says_how_it_was_made():
    hit = find(state_dicts(NET, specials=("var_near_eps",), max_specials=1), lambda w: bool(w.meta["specials"]),
               settings=settings(database=None, max_examples=2000))
    again = weight_set(NET, seed=hit.meta["seed"], scale=hit.meta["scale"], specials=hit.meta["specials"])
    assert list(again) == list(hit) and all(torch.equal(again[k], hit[k]) for k in hit)
    assert repr(again).startswith("weight_set(seed=") and "var_near_eps" in repr(again)
    _valid(again)


def test_weight_set_gain_scales_weights_and_biases_only():
    base, big = weight_set(NET, seed=5), weight_set(NET, seed=5, gain=8.0)
    for k in ("conv.weight", "fc1.weight", "fc1.bias"):
        assert torch.allclose(big[k], base[k] * 8.0), k
    for k in ("bn.weight", "bn.running_var", "norm.weight"):
        assert torch.equal(big[k], base[k]), k
    kept = weight_set(NET, seed=5, keep_integers=True)
    assert torch.equal(kept["bn.num_batches_tracked"], NET.state_dict()["bn.num_batches_tracked"])
    assert all(torch.equal(kept[k], base[k]) for k in base if k != "bn.num_batches_tracked")


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale="xavier"), "scale="),
    (dict(gain=0.0), "gain="),
    (dict(specials=[("bn.running_var", "zeros")]), "not applicable"),
    (dict(specials=[("fc2.weight", "large")]), "not applicable"),   # a tie's follower: its leader is the target
])
def test_weight_set_rejects_what_it_cannot_draw(kwargs, message):
    with pytest.raises(ValueError, match=message):
        weight_set(NET, **kwargs)


def test_perturb_moves_every_float_tensor_a_little_and_keeps_ties():
    from pytest_trtrefit.strategies import perturb

    base = weight_set(NET, seed=1)
    new = perturb(base, seed=2, magnitude=1e-2)
    _valid(new)
    assert new["fc1.weight"] is new["fc2.weight"]
    assert torch.equal(new["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    for k, t in base.items():
        if t.dtype.is_floating_point:
            rel = float((new[k] - t).abs().max() / t.abs().mean())
            assert 0 < rel < 0.1, (k, rel)
    with pytest.raises(ValueError, match="key="):
        perturb(base, kind="single_tensor")


class SameShapes(nn.Module):
    """Three same-shaped linear layers: a mapping that swaps two of them must see different values."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_weight_sets_are_cut_from_the_pool_not_drawn_per_tensor(monkeypatch):
    """Materialising costs a memory copy per tensor: no Gaussian or uniform draw once the pool exists."""
    weight_set(Net(), seed=1, scale="fan_in")                  # the pools exist from here on
    weight_set(Net(), seed=1, scale="fan_in_uniform")
    calls = []

    def counting(real):
        def draw(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)
        return draw
    monkeypatch.setattr(torch, "randn", counting(torch.randn))
    monkeypatch.setattr(torch, "rand", counting(torch.rand))
    for seed in range(5):
        for scale in ("fan_in", "fan_in_uniform", "he"):
            weight_set(Net(), seed=seed, scale=scale)
    assert calls == []


def test_same_shaped_weights_differ_and_the_same_seed_gives_the_same_tensors():
    for seed in range(20):
        w = weight_set(SameShapes(), seed=seed)
        for key in ("weight", "bias"):
            x, y, z = (w[f"{m}.{key}"] for m in "abc")
            for p, q in ((x, y), (x, z), (y, z)):
                assert not torch.equal(p, q) and not torch.equal(p, -q), (seed, key)
                assert not torch.equal(p.flatten().sort().values, q.flatten().sort().values), (seed, key)
        again = weight_set(SameShapes(), seed=seed)
        assert all(torch.equal(w[k], again[k]) for k in w)
    assert not torch.equal(weight_set(SameShapes(), seed=1)["a.weight"], weight_set(SameShapes(), seed=2)["a.weight"])
