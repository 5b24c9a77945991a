"""Fixture-style refit checks of a transformers model: keyword inputs, a ``ModelOutput`` result."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

from modelzoo.bert import bert_inputs, tiny_bert
from pytest_trtrefit.strategies import inputs, refit_settings, state_dicts

pytestmark = pytest.mark.trt_refit
transformers = pytest.importorskip("transformers")


def finetune(model: torch.nn.Module, steps: int = 3, seed: int = 0) -> torch.nn.Module:
    """A few SGD steps of sequence classification, called with keyword inputs as a training loop does."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(steps):
        batch = bert_inputs(seed=100 + step)
        out = model(*batch.args, **batch.kwargs, labels=torch.tensor([step % 3]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def test_finetuned_bert_checkpoint_refits(trt_refit, tmp_path):
    """A fine-tuned checkpoint, saved the usual way, refits to eager's answers with keyword inputs
    (a padded and an unpadded sequence); the output is checked by its name."""
    path = tmp_path / "bert-finetuned.pt"
    torch.save(finetune(tiny_bert()).state_dict(), path)
    outcome = trt_refit.check(tiny_bert, str(path), [bert_inputs(0), bert_inputs(1, padding=0)])
    assert [c.name for c in outcome.paths[0].verdict.checks[0]] == ["logits"]


@refit_settings(max_examples=2)
@given(weights=state_dicts(tiny_bert(), max_specials=1), sample=inputs(bert_inputs()))
def test_random_bert_weights(trt_refit, weights, sample):
    """Random weights and random token ids (drawn inside the example's id range, mask kept)."""
    trt_refit.check(tiny_bert, weights, [bert_inputs(), sample])


def test_bert_with_gelu_in_pytorch(trt_refit):
    """A partitioned engine: GELU runs in PyTorch between TensorRT segments (the summary's TRT
    share drops below 100%); the refit still covers every segment."""
    options = {"torch_executed_ops": ["aten.gelu.default"]}
    engine = trt_refit.engine_for(tiny_bert, bert_inputs(), compile_options=options)
    assert engine.kind.name == "segments" and engine.summary().op_share < 1.0
    trt_refit.check(tiny_bert, finetune(tiny_bert(seed=1)), bert_inputs(), compile_options=options,
                    name="tiny_bert (gelu in PyTorch)")
