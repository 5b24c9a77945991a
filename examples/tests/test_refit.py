"""Fixture-style refit checks: the ``trt_refit`` fixture and the Hypothesis strategies in test code."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from modelzoo import DepthwiseClassifier, TiedAutoencoder, TinyResNet, example_input
from pytest_trtrefit.strategies import inputs, perturbations, refit_sequences, refit_settings, state_dicts

pytestmark = pytest.mark.trt_refit


def finetune(model: torch.nn.Module, steps: int = 3, seed: int = 0) -> torch.nn.Module:
    """A few SGD steps in train mode: new weights *and* new BatchNorm running statistics."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_finetuned_checkpoint_refits(trt_refit, tmp_path):
    """The deploy gate: a fine-tuned checkpoint, saved the usual way, refits to eager's answers."""
    path = tmp_path / "finetuned.pt"
    torch.save(finetune(TinyResNet()).state_dict(), path)
    x = example_input("tiny_resnet")
    trt_refit.check(TinyResNet, str(path), [x, example_input("tiny_resnet", seed=1)])


def test_one_engine_serves_every_check(trt_refit):
    """The compile cache: one engine per architecture and input spec for the whole session."""
    x = example_input("depthwise_classifier")
    first = trt_refit.engine_for(DepthwiseClassifier, x)
    trt_refit.check(DepthwiseClassifier, DepthwiseClassifier().state_dict(), x)
    assert trt_refit.engine_for(DepthwiseClassifier(), torch.randn(1, 3, 32, 32)) is first


@refit_settings()
@given(weights=state_dicts(TinyResNet()), sample=inputs(example_input("tiny_resnet")))
def test_random_weights(trt_refit, weights, sample):
    trt_refit.check(TinyResNet, weights, [example_input("tiny_resnet"), sample])


@refit_settings()
@given(data=st.data())
def test_lora_style_update(trt_refit, data):
    """A low-rank update of one weight of the tied model (the tied copy must follow)."""
    base = data.draw(state_dicts(TiedAutoencoder(), max_specials=1), label="base")
    tuned = data.draw(perturbations(base, kinds=("low_rank",)), label="tuned")
    assert torch.equal(tuned["refine.weight"], tuned["refine_again.weight"])
    trt_refit.check_sequence(TiedAutoencoder, [base, tuned], example_input("tied_autoencoder"))


@refit_settings(max_examples=2)
@given(sequence=refit_sequences(DepthwiseClassifier(), max_size=3))
def test_checkpoint_history(trt_refit, sequence):
    """A -> B -> ... -> A on one engine: back at A, the outputs are A's, bit for bit."""
    trt_refit.check_sequence(DepthwiseClassifier, sequence, example_input("depthwise_classifier"))


def test_tied_weights_that_differ_are_refused(trt_refit):
    """A checkpoint that gives tied parameters different values is an error, not a guess."""
    state = TiedAutoencoder().state_dict()
    state["refine_again.weight"] = state["refine_again.weight"] + 1.0
    with pytest.raises(AssertionError, match="tied parameters 'refine.weight' and 'refine_again.weight'"):
        trt_refit.check(TiedAutoencoder, state, example_input("tied_autoencoder"))
