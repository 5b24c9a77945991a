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

from refitcore.conversion import allowed_ops
from refitcore.errors import BundleContentError, MapCannotServeError
from refitcore.options import MAX_TENSOR_ELEMENTS

__all__ = ["RECIPES", "apply_recipe", "evaluate_operand", "check_operand", "resolve_aten_op", "bn_factor",
           "bn_fold_kernel",
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


def converted(*, keys: Any = None, compiler: str = "", name: str = "", **where: Any) -> torch.Tensor:
    """A weight another compiler's converters compute from ``keys`` (the state_dict entries they
    read): no recipe here replays that arithmetic, so the cached map cannot serve it; that
    compiler's own refit path does (``name``: the weight as the compiler names it, ``where``: its
    segment, FX node and module path)."""
    place = ", ".join(f"{k} {v}" for k, v in where.items())
    raise MapCannotServeError([f"engine weight {name!r} ({place}) is computed by {compiler}'s converters, which no "
                               f"recipe of the weight map replays; refit it through {compiler}'s own refit path"])


RECIPES: dict[str, Callable[..., torch.Tensor]] = {
    "copy": copy,
    "constant": constant,
    "bn_fold_kernel": bn_fold_kernel,
    "bn_fold_bias": bn_fold_bias,
    "bn_scale": bn_scale,
    "bn_shift": bn_shift,
    "converted": converted,
}


def resolve_aten_op(qualname: str, where: str = "weight map operand"):
    """'aten.permute.default' -> torch.ops.aten.permute.default, for the ops of
    :data:`refitcore.conversion.allowed_ops.ALLOWED_OPS` only (:class:`BundleContentError` otherwise)."""
    return allowed_ops.resolve(qualname, where)


Leaf = Callable[[str, str], Any]


def _evaluate(operand: Any, leaf: Leaf, call: Callable, memo: dict, where: str):
    """The value of an operand tree: ``leaf(kind, name)`` for ``{"key"}``/``{"const"}`` leaves,
    ``call(op, args, kwargs, where)`` for ``{"op"}`` nodes; anything else is refused."""
    if operand is None or isinstance(operand, (bool, int, float, str)):
        return operand
    if isinstance(operand, list):
        return [_evaluate(v, leaf, call, memo, where) for v in operand]
    if not isinstance(operand, dict):
        raise BundleContentError(f"{where}: an operand of type {type(operand).__name__}")
    if len(operand) == 1 and isinstance(operand.get("key", operand.get("const")), str):
        kind = next(iter(operand))
        return leaf(kind, operand[kind])
    if len(operand) == 1 and "dtype" in operand:
        return allowed_ops.decode_dtype(operand["dtype"], where)
    if "op" not in operand or not set(operand) <= {"op", "args", "kwargs", "index"}:
        raise BundleContentError(f"{where}: unknown operand kind {sorted(operand)[:5]}")
    memo_key = repr(operand)
    if memo_key in memo:
        return memo[memo_key]
    here = f"{where} ({str(operand['op'])[:80]})"
    op = resolve_aten_op(operand["op"], where)
    args, kwargs = operand.get("args", []), operand.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise BundleContentError(f"{here}: args must be a list and kwargs an object")
    out = call(op, _evaluate(args, leaf, call, memo, here),
               {str(k): _evaluate(v, leaf, call, memo, here) for k, v in kwargs.items()}, here)
    if "index" in operand:
        index = operand["index"]
        if (not isinstance(index, int) or isinstance(index, bool) or not isinstance(out, (list, tuple))
                or not 0 <= index < len(out)):
            raise BundleContentError(f"{here}: index {str(index)[:40]} does not select one of its results")
        out = out[index]
    memo[memo_key] = out
    return out


def check_operand(operand: Any, leaf: Leaf, *, max_elements: int, where: str = "weight map operand"):
    """Evaluate an operand tree on the ``meta`` device (``leaf`` gives meta tensors): what it would
    make, without memory or side effects. :class:`BundleContentError` when it names an op outside
    the allowlist, holds an unknown operand kind or a bad index, or would make a tensor of more than
    ``max_elements`` elements."""
    def call(op, args, kwargs, here):
        out = allowed_ops.check_call(op, args, kwargs, max_elements, here)
        if out is None:
            raise BundleContentError(f"{here}: the size of what {op} makes depends on the weights' values; "
                                     f"a weight map operand must have a size known from shapes")
        return out

    return _evaluate(operand, leaf, call, {}, where)


def evaluate_operand(operand: Any, state: Mapping[str, torch.Tensor], constants: Mapping[str, np.ndarray],
                     memo: dict | None = None, *, max_elements: int = MAX_TENSOR_ELEMENTS,
                     where: str = "weight map operand"):
    """Evaluate an operand tree (see :mod:`refitcore.conversion.weight_map`) against a state_dict.

    The tree is first evaluated on the ``meta`` device (:func:`check_operand`): nothing is computed
    unless every op is allowed and every tensor it makes has at most ``max_elements`` elements."""
    def value(kind: str, name: str):
        return state[name] if kind == "key" else torch.from_numpy(np.asarray(constants[name]))

    check_operand(operand, lambda kind, name: allowed_ops.to_meta(value(kind, name)), max_elements=max_elements,
                  where=where)
    return _evaluate(operand, value, lambda op, args, kwargs, _here: op(*args, **kwargs),
                     {} if memo is None else memo, where)


def apply_recipe(recipe: str, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> torch.Tensor:
    try:
        fn = RECIPES[recipe]
    except (KeyError, TypeError):
        raise BundleContentError(f"unknown recipe {str(recipe)[:80]!r}; known recipes: {sorted(RECIPES)}") from None
    return fn(**inputs, **params)
