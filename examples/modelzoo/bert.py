"""A tiny transformers BERT classifier: keyword inputs, a ``ModelOutput`` result.

Built from a small config with random weights (nothing is downloaded): vocabulary 100, hidden size
32, 2 layers of 2 heads, intermediate size 64, 64 positions, 3 labels. It takes ``input_ids`` and
an ``attention_mask`` keyword input and returns a ``SequenceClassifierOutput`` whose ``logits`` the
refit checks compare with eager PyTorch by name.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_bert", "bert_inputs", "BERT_CONFIG"]

BERT_CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64, num_labels=3)
SEQ_LEN = 12
FIRST_TOKEN = 3      # ids 0..2 are special tokens ([PAD], [CLS], [SEP]): sample words from 3 on


def tiny_bert(seed: int = 0):
    """A ``transformers.BertForSequenceClassification`` from :data:`BERT_CONFIG`, random weights
    drawn from ``seed``, in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**BERT_CONFIG)).eval()


def bert_inputs(seed: int = 0, *, padding: int = 3):
    """One call's inputs: ``input_ids`` [1, 12] int64 in [3, 100) and, as a keyword input, an
    ``attention_mask`` whose last ``padding`` positions are padding (0)."""
    from refitcore import Inputs

    ids = torch.randint(FIRST_TOKEN, BERT_CONFIG["vocab_size"], (1, SEQ_LEN),
                        generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, SEQ_LEN, dtype=torch.long)
    if padding:
        mask[:, SEQ_LEN - padding:] = 0
    return Inputs(ids, attention_mask=mask)
