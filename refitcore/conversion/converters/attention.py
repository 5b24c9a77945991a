"""Scaled dot-product attention, spelled out in TensorRT layers:
softmax(q @ k^T * scale + mask) @ v (the math of ``torch.nn.functional.scaled_dot_product_attention``).

The scale is a literal (recorded as a constant); a boolean mask becomes a float mask of 0 and
``MASKED`` (folded when it is a constant, an ISelectLayer when the network computes it, e.g. from
the input's shape); float masks are added; ``is_causal`` is a literal lower-triangular float mask
aligned to the top left (``torch.ones(L, S).tril()``, as documented, also when L != S).

A row of queries that may attend to nothing (a boolean mask row all False, a float mask row all
``-inf``) is 0 in eager PyTorch: its math kernel ends in ``_safe_softmax``, which zeroes rows whose
masked scores are all ``-inf``, where a plain softmax gives a uniform row (the mean of V) or NaN. The
network does the same: such rows are found from the mask (its row maximum is ``MASKED`` or ``-inf``)
and the output is selected to 0 there. A float mask of large finite values (HF's
``finfo(float32).min``) masks no row entirely, in eager as here.
"""
from __future__ import annotations

import math

import torch

from refitcore.conversion.context import ConversionContext, StaticValue
from refitcore.conversion.converters._util import arg, as_tensor, rank, shape_of
from refitcore.conversion.converters.activation import softmax
from refitcore.conversion.registry import Unsupported, converter

aten = torch.ops.aten
# A masked score: finite (engine weights must be finite to pass refit validation) yet so negative
# that exp(score - max) is exactly 0 in float32, as with PyTorch's -inf, unless a whole row is masked.
MASKED = -1e30


def _float_mask(ctx: ConversionContext, mask: StaticValue) -> StaticValue:
    """A boolean mask as a float mask (0 where attended, MASKED elsewhere). A mask read from the
    model (a buffer, a tensor attribute) keeps how it was made, so that refit recomputes it."""
    zeros = torch.zeros(mask.shape)
    value = zeros.masked_fill(~mask.tensor, MASKED)
    if not ctx.refittable(mask):
        return StaticValue(value, None)
    inverted = {"op": "aten.bitwise_not.default", "args": [ctx.operand(mask)], "kwargs": {}}
    return StaticValue(value, {"op": "aten.masked_fill.Scalar", "args": [ctx.literal(zeros), inverted, MASKED],
                               "kwargs": {}})


def _check_sdpa(node) -> str | None:
    args, kwargs = node.args, node.kwargs
    if arg(args, kwargs, 4, "dropout_p", 0.0):
        return "attention dropout_p != 0 (export in eval mode)"
    if arg(args, kwargs, 7, "enable_gqa", False):
        return "grouped-query attention (enable_gqa=True)"
    return None


def scaled_dot_product_attention(ctx: ConversionContext, q, k, v, *, attn_mask=None, is_causal=False,
                                 scale=None):
    trt = ctx.trt
    r = max(rank(q), rank(k), rank(v))
    if r < 2:
        raise Unsupported("attention on 1-D tensors")
    q = as_tensor(ctx, q, rank_=r, suffix="q")
    k = as_tensor(ctx, k, rank_=r, suffix="k")
    v = as_tensor(ctx, v, rank_=r, suffix="v")
    L, E = shape_of(q)[-2:]
    S = shape_of(k)[-2]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    scores = ctx.network.add_matrix_multiply(q, trt.MatrixOperation.NONE, k, trt.MatrixOperation.TRANSPOSE)
    s = ctx.name(scores, "qk").get_output(0)
    factor = ctx.constant(torch.tensor(scale), rank=r, suffix="scale")
    s = ctx.name(ctx.network.add_elementwise(s, factor, trt.ElementWiseOperation.PROD), "scaled").get_output(0)
    if is_causal:
        if L < 0 or S < 0:
            raise Unsupported("causal attention over a dynamic sequence length (its mask is a literal of static size)")
        if attn_mask is not None:
            raise Unsupported("attention with both attn_mask and is_causal")
        attn_mask = StaticValue(torch.zeros(L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), MASKED),
                                None)
    if attn_mask is not None:
        mask_dtype = attn_mask.tensor.dtype if isinstance(attn_mask, StaticValue) else None
        if mask_dtype is torch.bool or (mask_dtype is None and attn_mask.dtype == trt.bool):
            if isinstance(attn_mask, StaticValue):
                attn_mask = _float_mask(ctx, attn_mask)
            else:   # computed in the network (e.g. from the input's shape): 0 where True, MASKED elsewhere
                mr = rank(attn_mask)
                keep = as_tensor(ctx, 0.0, rank_=mr, suffix="mask_keep")
                drop = as_tensor(ctx, MASKED, rank_=mr, suffix="mask_drop")
                attn_mask = ctx.name(ctx.network.add_select(attn_mask, keep, drop), "mask_select").get_output(0)
            fully_masked = MASKED
        else:
            fully_masked = -math.inf
        m = as_tensor(ctx, attn_mask, rank_=r, suffix="mask")
        s = ctx.name(ctx.network.add_elementwise(s, m, trt.ElementWiseOperation.SUM), "masked").get_output(0)
    p = softmax(ctx, s, r - 1, suffix="softmax")
    out = ctx.network.add_matrix_multiply(p, trt.MatrixOperation.NONE, v, trt.MatrixOperation.NONE)
    if attn_mask is None or is_causal:   # a causal row always attends to its first key
        return ctx.name(out).get_output(0)
    out = ctx.name(out, "attend").get_output(0)
    return _zero_fully_masked_rows(ctx, out, m, fully_masked, r)


def _zero_fully_masked_rows(ctx: ConversionContext, out, mask, fully_masked: float, r: int):
    """``out`` with 0 in every query row whose mask row is ``fully_masked`` throughout (eager's
    ``_safe_softmax``): the mask's row maximum, compared with that value, selects 0 or ``out``."""
    trt = ctx.trt
    row_max = ctx.name(ctx.network.add_reduce(mask, trt.ReduceOperation.MAX, 1 << (r - 1), True),
                       "mask_row_max").get_output(0)
    threshold = ctx.constant(torch.tensor(fully_masked), rank=r, suffix="fully_masked")
    none = ctx.name(ctx.network.add_elementwise(row_max, threshold, trt.ElementWiseOperation.EQUAL),
                    "fully_masked_rows").get_output(0)
    zero = ctx.constant(torch.tensor(0.0), rank=r, suffix="zero")
    return ctx.name(ctx.network.add_select(none, zero, out)).get_output(0)


@converter(aten.scaled_dot_product_attention.default, capability=_check_sdpa)
def sdpa(ctx, node, args, kwargs):
    return scaled_dot_product_attention(ctx, args[0], args[1], args[2], attn_mask=arg(args, kwargs, 3, "attn_mask"),
                                        is_causal=bool(arg(args, kwargs, 5, "is_causal", False)),
                                        scale=arg(args, kwargs, 6, "scale"))
