"""Recipes: the closed set of pure functions that turn state_dict tensors into engine weights.

Each recipe takes torch tensors (operands already evaluated; an absent optional operand is
``None``) and keyword parameters, and returns one tensor. The cached mapping applies them;
the converters compute the same quantities independently (in float64) so the fallback path
is a real second witness, not the same code run twice.

BatchNorm fold (DESIGN.md): conv(W, b) then eval BatchNorm(gamma, beta, mean, var, eps) is one
conv with ``W' = W * gamma/sqrt(var+eps)`` per output channel and
``b' = (b - mean) * gamma/sqrt(var+eps) + beta`` (b = 0 without a conv bias; gamma = 1 and
beta = 0 without affine parameters).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

__all__ = ["RECIPES", "apply_recipe", "evaluate_operand", "resolve_aten_op", "bn_factor"]


def bn_factor(gamma: torch.Tensor | None, var: torch.Tensor, eps: float) -> torch.Tensor:
    """gamma / sqrt(var + eps), per channel."""
    inv = torch.rsqrt(var + eps)
    return inv if gamma is None else gamma * inv


def copy(*, x: torch.Tensor) -> torch.Tensor:
    return x


def constant(*, x: torch.Tensor) -> torch.Tensor:
    return x


def bn_fold_kernel(*, weight, gamma, var, eps: float, **_unused) -> torch.Tensor:
    factor = bn_factor(gamma, var, eps)
    return weight * factor.reshape((-1,) + (1,) * (weight.dim() - 1))


def bn_fold_bias(*, bias, gamma, beta, mean, var, eps: float, **_unused) -> torch.Tensor:
    factor = bn_factor(gamma, var, eps)
    b = -mean if bias is None else bias - mean
    out = b * factor
    return out if beta is None else out + beta


def bn_scale(*, gamma, var, eps: float, **_unused) -> torch.Tensor:
    return bn_factor(gamma, var, eps)


def bn_shift(*, gamma, beta, mean, var, eps: float) -> torch.Tensor:
    out = -mean * bn_factor(gamma, var, eps)
    return out if beta is None else out + beta


RECIPES: dict[str, Callable[..., torch.Tensor]] = {
    "copy": copy,
    "constant": constant,
    "bn_fold_kernel": bn_fold_kernel,
    "bn_fold_bias": bn_fold_bias,
    "bn_scale": bn_scale,
    "bn_shift": bn_shift,
}


def resolve_aten_op(qualname: str):
    """'aten.permute.default' -> torch.ops.aten.permute.default; only the aten namespace."""
    parts = qualname.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        raise ValueError(f"weight map operand op {qualname!r} is not an ATen overload 'aten.<op>.<overload>'")
    packet = getattr(torch.ops.aten, parts[1])
    return getattr(packet, parts[2])


def _decode_literal(value: Any):
    if isinstance(value, dict) and "dtype" in value and len(value) == 1:
        return getattr(torch, value["dtype"])
    if isinstance(value, list):
        return [_decode_literal(v) for v in value]
    return value


def evaluate_operand(operand: Any, state: Mapping[str, torch.Tensor], constants: Mapping[str, np.ndarray],
                     memo: dict | None = None):
    """Evaluate an operand tree (see :mod:`refitcore.weight_map`) against a state_dict."""
    if operand is None:
        return None
    if isinstance(operand, dict):
        if "key" in operand:
            return state[operand["key"]]
        if "const" in operand:
            return torch.from_numpy(np.asarray(constants[operand["const"]]))
        if "op" in operand:
            memo_key = None
            if memo is not None:
                memo_key = repr(operand)
                if memo_key in memo:
                    return memo[memo_key]
            op = resolve_aten_op(operand["op"])
            args = [evaluate_operand(a, state, constants, memo) for a in operand.get("args", [])]
            kwargs = {k: evaluate_operand(v, state, constants, memo) for k, v in operand.get("kwargs", {}).items()}
            out = op(*args, **kwargs)
            if "index" in operand:
                out = out[operand["index"]]
            if memo is not None:
                memo[memo_key] = out
            return out
        return _decode_literal(operand)
    if isinstance(operand, list):
        return [evaluate_operand(v, state, constants, memo) for v in operand]
    return operand


def apply_recipe(recipe: str, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> torch.Tensor:
    try:
        fn = RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {sorted(RECIPES)}") from None
    return fn(**inputs, **params)
