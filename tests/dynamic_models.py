"""Tiny models with dynamic input dimensions (batch, sequence length), and their ranges."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyResNet", "TinyAttention", "tiny_resnet", "tiny_attention", "tiny_bert", "BertHidden", "BertIds",
           "BATCH", "SEQ"]

BATCH = (1, 8)      # batch range of the CNN
SEQ = (4, 32)       # sequence-length range of the attention models


class Flat(nn.Module):
    """A reshape that must compute its batch size in the network (a baked size fails off the example)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """resnet18's structure at toy width: stem, two stages of basic blocks, pooling, and a head
    that flattens with ``view(x.size(0), -1)`` (the reshape that must not bake in a batch size)."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


class TinyAttention(nn.Module):
    """A causal self-attention block over a dynamic sequence length, without embeddings: a
    position table sliced to the length, heads split with ``view``, and a causal mask built from
    ``arange`` over the input's length."""

    def __init__(self, d: int = 16, heads: int = 2, max_len: int = SEQ[1]):
        super().__init__()
        self.heads = heads
        self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.1)
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        x = x + self.pos[:, :t]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        pos = torch.arange(t)
        scores = scores.masked_fill(pos[None, :] > pos[:, None], -1e9)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y) + x


def tiny_resnet() -> TinyResNet:
    return TinyResNet()


def tiny_attention() -> TinyAttention:
    return TinyAttention()


def _bert():
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config)


class BertHidden(nn.Module):
    """transformers.BertModel (tiny config, random weights, never downloaded) returning its last
    hidden state, given input_ids and an attention mask."""

    def __init__(self):
        super().__init__()
        self.bert = _bert()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class BertIds(nn.Module):
    """The same BertModel given input_ids alone (transformers builds the mask from their shape)."""

    def __init__(self):
        super().__init__()
        self.bert = _bert()

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


def tiny_bert() -> BertHidden:
    return BertHidden()
