"""``refitcore.find_culprit``: fed a wrong mapping (swapped, transposed, stale), it names the weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import refitcore
from tests.cli_models import randomized_state, small_net

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def engine():
    return refitcore.compile(small_net(), X, backend="reference")


@pytest.fixture(scope="module")
def state():
    return randomized_state(5)


@pytest.fixture(scope="module")
def right(engine, state):
    return refitcore.cached_mapping(engine.weight_map, state)


def test_right_mappings_have_no_culprit(engine, state, right):
    refitted = refitcore.apply_mapping(engine, right)
    assert refitcore.find_culprit(engine, state, held={"cached": refitted.current_weights()}) is None


def test_swapped_entries_are_named_first_in_engine_order(engine, state, right):
    a, b = "conv/conv2d BIAS", "conv2/conv2d BIAS"
    wrong = dict(right, **{a: right[b], b: right[a]})
    culprit = refitcore.find_culprit(engine, state, mappings={"cached": wrong})
    first = min((a, b), key=engine.weight_names.index)
    assert culprit is not None and culprit.name == first, culprit
    assert culprit.total == len(engine.weight_names) and culprit.position == engine.weight_names.index(first)
    assert "cached map vs fallback map" in culprit.why and culprit.recipe in str(culprit)
    assert culprit.to_json()["name"] == first


def test_a_transposed_kernel_is_named(engine, state, right):
    name = next(n for n in engine.weight_names if n.startswith("fc") and right[n].ndim == 2)
    t = right[name].T.copy()
    culprit = refitcore.find_culprit(engine, state, mappings={"cached": dict(right, **{name: t})})
    assert culprit is not None and culprit.name == name and "shape" in culprit.why


def test_a_stale_weight_in_the_engine_is_named_by_the_engine_witness(engine, state, right):
    """Both mappings agree; the engine after the refit still holds an old value for one weight."""
    stale = "conv2/conv2d KERNEL"
    refitted = refitcore.apply_mapping(engine, right)
    held = {k: np.array(v, copy=True) for k, v in refitted.current_weights().items()}
    held[stale] = np.asarray(engine.current_weights()[stale]).copy()  # the compile-time value
    culprit = refitcore.find_culprit(engine, state, mappings={"cached": right}, held={"cached": held})
    assert culprit is not None and culprit.name == stale
    assert culprit.why.startswith("engine after cached refit vs cached map")
    assert "cached map and fallback map agree" in str(culprit)
