"""Recipes: the closed set of pure functions that turn state_dict tensors into engine weights.

Each recipe takes torch tensors (operands already evaluated; an absent optional operand is
``None``) and keyword parameters, and returns one tensor. The cached mapping applies them
through :data:`RECIPES`; the converters call the BatchNorm fold functions below directly, so
compile, cached and fallback paths compute every folded weight with one arithmetic and agree bit
for bit. What stays independent is the plumbing: the converters read their operands off the
graph, the cached path evaluates the weight map's operand trees and looks recipes up by name
(see docs/DESIGN-NOTES.md, "The fallback is an independent witness").

BatchNorm fold (DESIGN.md): conv(W, b) then eval BatchNorm(gamma, beta, mean, var, eps) is one
conv with ``W' = W * gamma/sqrt(var+eps)`` per output channel and
``b' = (b - mean) * gamma/sqrt(var+eps) + beta`` (b = 0 without a conv bias; gamma = 1 and
beta = 0 without affine parameters).

Fold arithmetic: the per-channel quantities (``gamma/sqrt(var+eps)``, the folded bias, scale and
shift) in float64, cast once to float32 by the caller: the correctly rounded float32 of the exact
value, independent of which float32 kernels (rsqrt approximations, FMA, vector widths) a torch
build picks. The folded *kernel* is one IEEE multiply per element in the kernel's own precision
(at least float32): ``W * float32(factor)``. An elementwise multiply is correctly rounded by every
kernel, so the result is still the same on every path and machine; it is within one float32 ulp
of the exact fold (the factor's rounding, then the product's), and it costs one float32 pass over
the kernel instead of three float64 ones (a resnet50 refit folds 23.5M kernel values).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, overload

import numpy as np
import torch

__all__ = ["RECIPES", "apply_recipe", "evaluate_operand", "resolve_aten_op", "bn_factor", "bn_fold_kernel",
           "bn_fold_bias", "bn_scale", "bn_shift"]


@overload
def _f64(t: torch.Tensor) -> torch.Tensor: ...
@overload
def _f64(t: None) -> None: ...
def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def bn_factor(gamma: torch.Tensor | None, var: torch.Tensor, eps: float) -> torch.Tensor:
    """gamma / sqrt(var + eps), per channel, in float64."""
    inv = 1.0 / torch.sqrt(_f64(var) + float(eps))
    return inv if gamma is None else _f64(gamma) * inv


def copy(*, x: torch.Tensor) -> torch.Tensor:
    return x


def constant(*, x: torch.Tensor) -> torch.Tensor:
    return x


def bn_fold_kernel(*, weight, gamma, var, eps: float, axis: int = 0, groups: int = 1, **_unused) -> torch.Tensor:
    """The folded kernel W * factor along the output channels, in W's precision (at least float32;
    the factor is computed in float64, then rounded to it). ``axis=0``: a convolution's
    (out, in/groups, k...) kernel. ``axis=1``: a transposed convolution's (in, out/groups, k...)
    kernel, whose output channel ``g * out/groups + j`` is column ``j`` of group ``g``'s block of
    input rows."""
    w = weight.detach()
    dtype = torch.promote_types(w.dtype, torch.float32) if w.is_floating_point() else torch.float32
    w = w.to(dtype)
    factor = bn_factor(gamma, var, eps).to(dtype)
    if axis == 0:
        return w * factor.reshape((-1,) + (1,) * (w.dim() - 1))
    if axis != 1:
        raise ValueError(f"bn_fold_kernel: axis must be 0 or 1, got {axis}")
    if w.shape[0] % groups or factor.numel() != w.shape[1] * groups:
        raise ValueError(f"bn_fold_kernel: a transposed kernel of shape {tuple(w.shape)} in {groups} groups "
                         f"does not have {factor.numel()} output channels")
    grouped = w.reshape((groups, w.shape[0] // groups) + tuple(w.shape[1:]))
    scaled = grouped * factor.reshape((groups, 1, w.shape[1]) + (1,) * (w.dim() - 2))
    return scaled.reshape(w.shape)


def bn_fold_bias(*, bias, gamma, beta, mean, var, eps: float, **_unused) -> torch.Tensor:
    """The folded bias (b - mean) * factor + beta, in float64."""
    factor = bn_factor(gamma, var, eps)
    b = -_f64(mean) if bias is None else _f64(bias) - _f64(mean)
    out = b * factor
    return out if beta is None else out + _f64(beta)


def bn_scale(*, gamma, var, eps: float, **_unused) -> torch.Tensor:
    """The scale of an unfolded eval BatchNorm (an IScaleLayer), in float64."""
    return bn_factor(gamma, var, eps)


def bn_shift(*, gamma, beta, mean, var, eps: float) -> torch.Tensor:
    """The shift of an unfolded eval BatchNorm, beta - mean * factor, in float64."""
    out = -_f64(mean) * bn_factor(gamma, var, eps)
    return out if beta is None else out + _f64(beta)


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
