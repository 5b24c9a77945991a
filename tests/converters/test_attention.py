"""Attention: scaled dot-product attention, nn.MultiheadAttention, a ViT-style encoder block with
class token and position embedding, Swin's relative position bias folded from parameters."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .harness import check_converter


class SDPA(nn.Module):
    def __init__(self, d: int = 8, **kwargs):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.kwargs = kwargs

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


class MaskedSDPA(SDPA):
    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TinyViT(nn.Module):
    """Class token (expand + cat), position embedding, pre-norm MultiheadAttention and MLP."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.02)
        self.ln1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, 0])


class RelativeBias(nn.Module):
    """Swin's relative position bias: a parameter table indexed by a constant buffer (folded)."""

    def __init__(self, w: int = 3, heads: int = 2):
        super().__init__()
        self.table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * w - 1) + rel[..., 1]).flatten())
        self.heads, self.n = heads, w * w
        self.qkv = nn.Linear(4, 3 * 4)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(1, self.n, 3, self.heads, 2).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(self.n, self.n, -1).permute(2, 0, 1).unsqueeze(0)
        attn = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + bias, dim=-1)
        return attn @ v


@pytest.mark.parametrize("model, shape", [
    pytest.param(SDPA(), (2, 5, 8), id="sdpa"),
    pytest.param(SDPA(scale=0.3), (1, 4, 8), id="sdpa_scale"),
    pytest.param(SDPA(is_causal=True), (1, 4, 8), id="sdpa_causal"),
    pytest.param(MaskedSDPA(), (1, 4, 8), id="sdpa_bool_mask"),
    pytest.param(TinyViT(), (1, 3, 8, 8), id="vit_block"),
    pytest.param(RelativeBias(), (1, 9, 4), id="relative_position_bias"),
])
def test_attention_matches_eager_and_refits(model, shape):
    engine = check_converter(model, torch.randn(shape))
    if isinstance(model, RelativeBias):
        # The bias is a function of parameters only: folded into a constant whose recorded operand
        # replays the gather from the table (so both refit paths recompute it).
        assert any("aten.index.Tensor" in json.dumps(src.inputs) and "table" in json.dumps(src.inputs)
                   for src in engine.weight_map.sources.values()), engine.weight_map.sources


# ----------------------------------------------------------------------------- the documented edges

class MaskInputSDPA(nn.Module):
    """Queries from ``x``, keys and values from ``y`` (L != S), attention masked by an input."""

    def __init__(self, d: int = 8, **kwargs):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.kwargs = kwargs

    def forward(self, x, y, mask=None):
        q = self.q(x).unflatten(-1, (2, -1)).transpose(1, 2)
        k, v = self.kv(y).unflatten(-1, (2, 2, -1)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs)


class ConstantMaskSDPA(MaskInputSDPA):
    """A key padding mask made in forward (a literal of the graph) that masks every key of query row 1."""

    def forward(self, x, y):
        mask = torch.ones(x.shape[1], y.shape[1], dtype=torch.bool)
        mask[1] = False
        return super().forward(x, y, mask)


def _bool_mask(batch=2, lq=3, s=5):
    mask = torch.rand(batch, 1, lq, s) > 0.3
    mask[0, :, 1] = False          # a query row that may attend to nothing: 0 in eager
    mask[1, :, :, -2:] = False     # left/right padding of the second sequence
    mask[1, :, 2] = False
    return mask


def _float_mask(scale=float("-inf")):
    return torch.zeros(2, 1, 3, 5).masked_fill(~_bool_mask(), scale)


@pytest.mark.parametrize("model, mask", [
    pytest.param(MaskInputSDPA(), _bool_mask(), id="bool_mask_row_all_false"),
    pytest.param(MaskInputSDPA(), _float_mask(), id="float_mask_row_all_minus_inf"),
    pytest.param(MaskInputSDPA(scale=0.3), _float_mask(), id="float_mask_scale"),
    pytest.param(MaskInputSDPA(), _float_mask(torch.finfo(torch.float32).min), id="float_mask_finfo_min"),
    pytest.param(MaskInputSDPA(), _bool_mask()[:, :, :1], id="bool_mask_broadcast_over_queries"),
])
def test_fully_masked_rows_match_eager(model, mask):
    x, y = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    check_converter(model, x, y, mask)
    with torch.no_grad():
        eager = model.eval()(x, y, mask)
    if mask.dtype == torch.bool and mask.shape[2] == 3:
        assert eager[0, :, 1].abs().max() == 0     # the edge itself: eager gives 0, not the mean of V


@pytest.mark.parametrize("model, lq, s", [
    pytest.param(ConstantMaskSDPA(), 3, 5, id="constant_mask_row_all_false"),
    pytest.param(MaskInputSDPA(is_causal=True), 3, 5, id="causal_fewer_queries"),
    pytest.param(MaskInputSDPA(is_causal=True), 5, 3, id="causal_more_queries"),
    pytest.param(MaskInputSDPA(is_causal=True, scale=2.0), 4, 4, id="causal_scale"),
])
def test_attention_edges_match_eager(model, lq, s):
    check_converter(model, torch.randn(2, lq, 8), torch.randn(2, s, 8))
