"""Declarative refit checks: list the models, pytest-trtrefit generates the property tests.

``pytest --trt-refit`` then runs, for every model below, three Hypothesis property tests with no
test code: random weight sets (``weights``), a weight set followed by a fine-tuning-like change
(``perturbations``) and several checkpoints in a row ending where they began (``sequences``),
each refitted through the cached weight map and the fallback path and compared with eager PyTorch.
"""
from __future__ import annotations

import importlib.util

from modelzoo import MODELS, example_input
from modelzoo.bert import bert_inputs, tiny_bert


def pytest_trt_refit_models():
    models = {
        name: (cls, example_input(name), {"examples": 2} if name == "tied_autoencoder" else {})
        for name, (cls, _shape) in MODELS.items()
    }
    # A transformers model called with a keyword input (refitcore.Inputs): input_ids, attention_mask=.
    # Generated samples redraw the token ids inside the example's range and keep the mask.
    if importlib.util.find_spec("transformers") is not None:   # a test-only dependency (the zoo/test extras)
        models["tiny_bert"] = (tiny_bert, bert_inputs(), {"examples": 2})
    return models
