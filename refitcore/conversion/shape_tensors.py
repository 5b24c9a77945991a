"""Shape arithmetic in the network, for dynamic input shapes.

torch.export describes every size that depends on a dynamic input dimension as a sympy
expression over the inputs' size symbols (``s0``, ``2*s0``, ``s0*s1``, ``FloorDiv(s0, 2)``). Here
each such expression becomes an INT64 shape tensor of shape ``(1,)`` computed by the network itself:
an ``IShapeLayer`` on the network input, an ``IGatherLayer`` picking the dimension, and
``IElementWiseLayer`` arithmetic. Converters then feed shape vectors (``IConcatenationLayer`` of
those) to an ``IShuffleLayer`` (``set_input(1, shape)``), an ``ISliceLayer`` (start/size inputs) or an
``IFillLayer``. Nothing takes its size from the example input.

Documentation relied on (NVIDIA, "Dynamic Shapes", Developer Guide:
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html):
shape tensors are INT32/INT64 tensors of rank 0 or 1 computed at run time; IShuffleLayer takes the
reshape dimensions as its second input, ISliceLayer its start, size and stride as inputs 1-3, and
IFillLayer its output shape as input 0 (LINSPACE start/delta as inputs 1 and 2).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import sympy
import torch
from torch.utils._sympy import functions as symfn

from refitcore.conversion.registry import Unsupported

__all__ = ["ShapeValue", "SymbolTable", "is_symbolic", "symbolic_dims", "sym_value", "int_constant",
           "shape_vector", "dim_of", "shape_of_tensor", "concrete_or_none"]


@dataclasses.dataclass
class ShapeValue:
    """A size known only at run time: an INT64 network tensor of shape (1,), and its expression."""

    tensor: Any
    expr: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return (1,)


@dataclasses.dataclass
class SymbolTable:
    """Where each size symbol lives (network input tensor, dimension), and the shape tensors
    already built for an expression (one network computation per expression)."""

    dims: dict = dataclasses.field(default_factory=dict)        # sympy.Symbol -> (ITensor, dim)
    cache: dict = dataclasses.field(default_factory=dict)       # str(expr) -> ITensor
    shapes: dict = dataclasses.field(default_factory=dict)      # tensor name -> IShapeLayer output
    count: int = 0


def is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and not size.node.expr.is_number


def concrete_or_none(size: Any) -> int | None:
    if isinstance(size, torch.SymInt):
        return int(size.node.expr) if size.node.expr.is_number else None
    return int(size)


def symbolic_dims(val) -> tuple[int, ...]:
    """A meta value's shape with -1 for each dimension that varies (TensorRT's notation)."""
    return tuple(-1 if is_symbolic(s) else int(s) for s in val.shape)


def _table(ctx) -> SymbolTable:
    return ctx.symbols


def _name(ctx, layer, what: str):
    table = _table(ctx)
    table.count += 1
    return ctx.name(layer, f"{what}{table.count}")


def int_constant(ctx, values: Sequence[int], shape: Sequence[int] | None = None):
    """An INT64 constant for shape arithmetic. It is structure, not a weight: its weights are named
    ``"<layer> SHAPE"`` and left out of the weight map and of refit (:data:`SHAPE_ROLE`)."""
    trt = ctx.trt
    # np.array, not np.ascontiguousarray: the latter turns a 0-d array (a scalar input) into 1-d.
    arr = np.array(values, dtype=np.int64).reshape(tuple(shape) if shape is not None else (len(values),)).copy()
    ctx.keepalive.append(arr)
    w = trt.Weights(arr)
    layer = ctx.network.add_constant(trt.Dims(arr.shape), w)
    _name(ctx, layer, "shape_const")
    if not ctx.network.set_weights_name(w, f"{layer.name} {SHAPE_ROLE}"):
        raise RuntimeError(f"TensorRT refused the weight name {layer.name!r}")
    ctx.shape_constants.append(f"{layer.name} {SHAPE_ROLE}")
    return layer.get_output(0)


SHAPE_ROLE = "SHAPE"


def shape_of_tensor(ctx, x):
    """The INT64 shape vector of network tensor ``x`` (one IShapeLayer per tensor)."""
    table = _table(ctx)
    if x.name not in table.shapes:
        table.shapes[x.name] = _name(ctx, ctx.network.add_shape(x), "shape").get_output(0)
    return table.shapes[x.name]


def dim_of(ctx, x, d: int):
    """Dimension ``d`` of network tensor ``x`` as a (1,) INT64 tensor."""
    shp = tuple(x.shape)
    if shp[d] >= 0:
        return int_constant(ctx, [shp[d]])
    idx = int_constant(ctx, [d % len(shp)])
    return _name(ctx, ctx.network.add_gather(shape_of_tensor(ctx, x), idx, 0), "dim").get_output(0)


def _binary(ctx, a, b, op: str):
    layer = ctx.network.add_elementwise(a, b, getattr(ctx.trt.ElementWiseOperation, op))
    return _name(ctx, layer, op.lower()).get_output(0)


def _build(ctx, expr):
    table = _table(ctx)
    key = str(expr)
    if key in table.cache:
        return table.cache[key]
    if expr.is_Integer:
        out = int_constant(ctx, [int(expr)])
    elif expr.is_Symbol:
        if expr not in table.dims:
            raise Unsupported(f"size {expr} is not a dimension of any network input (data-dependent size)")
        tensor, d = table.dims[expr]
        out = dim_of(ctx, tensor, d)
    elif isinstance(expr, (sympy.Add, sympy.Mul, symfn.Max, symfn.Min)):
        op = {sympy.Add: "SUM", sympy.Mul: "PROD", symfn.Max: "MAX", symfn.Min: "MIN"}[type(expr)]
        args = list(expr.args)
        out = _build(ctx, args[0])
        for a in args[1:]:
            out = _binary(ctx, out, _build(ctx, a), op)
    elif isinstance(expr, (symfn.FloorDiv, symfn.CleanDiv)):
        out = _binary(ctx, _build(ctx, expr.args[0]), _build(ctx, expr.args[1]), "FLOOR_DIV")
    elif isinstance(expr, (symfn.Mod, symfn.PythonMod)):
        a, b = _build(ctx, expr.args[0]), _build(ctx, expr.args[1])
        out = _binary(ctx, a, _binary(ctx, b, _binary(ctx, a, b, "FLOOR_DIV"), "PROD"), "SUB")
    elif isinstance(expr, symfn.CeilDiv):
        a, b = _build(ctx, expr.args[0]), _build(ctx, expr.args[1])
        one = int_constant(ctx, [1])
        out = _binary(ctx, _binary(ctx, _binary(ctx, a, b, "SUM"), one, "SUB"), b, "FLOOR_DIV")
    else:
        raise Unsupported(f"dynamic size expression {expr} ({type(expr).__name__}) has no shape-tensor form")
    table.cache[key] = out
    return out


def sym_value(ctx, size) -> ShapeValue:
    """A SymInt (or sympy expression) as a network shape value."""
    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.sympify(size)
    return ShapeValue(_build(ctx, expr), expr)


def shape_vector(ctx, dims: Sequence[Any]):
    """A rank-1 INT64 shape tensor from entries that are ints, SymInts, :class:`ShapeValue` or (1,)
    INT64 network tensors."""
    parts, run = [], []
    for d in dims:
        if isinstance(d, torch.SymInt) and not is_symbolic(d):
            d = int(d.node.expr)
        if isinstance(d, (int, np.integer)):
            run.append(int(d))
            continue
        if run:
            parts.append(int_constant(ctx, run))
            run = []
        if isinstance(d, ShapeValue):
            parts.append(d.tensor)
        elif isinstance(d, torch.SymInt):
            parts.append(sym_value(ctx, d).tensor)
        elif hasattr(d, "dtype") and tuple(d.shape) == (1,):   # a (1,) shape tensor (dim_of)
            parts.append(d)
        else:
            raise Unsupported(f"size {d!r} of type {type(d).__name__} in a dynamic shape")
    if run:
        parts.append(int_constant(ctx, run))
    if len(parts) == 1:
        return parts[0]
    layer = ctx.network.add_concatenation(parts)
    layer.axis = 0
    return _name(ctx, layer, "shape_cat").get_output(0)
