"""The conversion context: the network being built, and the weight map recorded as each
refittable weight is created.

Converters make weights with :meth:`ConversionContext.new_weights` and then add the layer that
uses them through :meth:`ConversionContext.name`, the one place that names a layer and records
its weights as ``"<layer name> <ROLE>"`` (names are a contract: refit matches them)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from refitcore import _trt, dtypes
from refitcore.conversion.weight_map import WeightMap, WeightSource, has_key, operand_constants

__all__ = ["StaticValue", "ConversionContext", "ROLES"]

ROLES = ("KERNEL", "BIAS", "SCALE", "SHIFT", "POWER", "CONSTANT")


@dataclasses.dataclass
class StaticValue:
    """A value known at conversion time (weights and what the graph computes from them only).

    ``operand`` says how it derives from the state_dict (see :mod:`refitcore.weight_map`).
    ``stored`` is the value as held; with ``widen`` (a float16/bfloat16 tensor of the state_dict)
    :attr:`tensor` reads it as float32 (exact), widened anew at each read and never kept, so the
    conversion computes from the float32 operands the refit paths use without a float32 copy of
    the whole state_dict."""

    stored: torch.Tensor
    operand: Any
    # The model tensor this value is, by attribute path, when a state_dict lacks it (a tensor
    # attribute or non-persistent buffer): recorded with its literal so that refit can read it anew.
    origin: str | None = None
    widen: bool = False

    @property
    def tensor(self) -> torch.Tensor:
        return self.stored.to(torch.float32) if self.widen else self.stored

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stored.shape)


@dataclasses.dataclass
class ConversionContext:
    network: Any
    weight_map: WeightMap
    layer_names: dict[str, str]          # fx node name -> base layer name
    fusions_conv_to_bn: dict[str, str]
    node: fx.Node | None = None
    values: dict = dataclasses.field(default_factory=dict)   # fx node name -> converted value
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    symbols: Any = None                  # shape_tensors.SymbolTable: dynamic sizes in the network
    shape_constants: list = dataclasses.field(default_factory=list)   # INT64 constants (structure, not weights)
    _used_names: set = dataclasses.field(default_factory=set)
    keepalive: list = dataclasses.field(default_factory=list)
    _pending: list = dataclasses.field(default_factory=list)   # weights awaiting their layer's name
    _n_constants: int = 0
    # The engine's floating type (compile's precision): every floating tensor of the network and every
    # floating weight has it (a strongly typed network); the graph's own float dtypes map onto it.
    float_dtype: torch.dtype = torch.float32
    # A program read from a file (refitcore.engine.program_record): every op folded on known values is
    # first run on meta and refused when it would make a tensor of more than MAX_TENSOR_ELEMENTS.
    bounded: bool = False

    @property
    def trt(self):
        return _trt.trt()

    def engine_type(self, dtype: torch.dtype) -> torch.dtype:
        """The network's type for a graph tensor of ``dtype``: float32 (the default type) and float64
        are the engine's float type; float16/bfloat16 (a model in that type, or a cast the graph
        makes on purpose) and non-float types stay as the graph has them."""
        return self.float_dtype if dtype in (torch.float32, torch.float64) else dtype

    @property
    def current_node(self) -> fx.Node:
        """The node being converted (converters run only while :func:`convert` has one)."""
        if self.node is None:
            raise RuntimeError("internal error: no node is being converted")
        return self.node

    @property
    def constant_origins(self) -> dict[str, str]:
        """The map's constant origins (None marks a map read from an old file, never one being built)."""
        if self.weight_map.constant_origins is None:
            raise RuntimeError("internal error: converting into a weight map without constant origins")
        return self.weight_map.constant_origins

    def fused_bn(self, node: fx.Node) -> fx.Node | None:
        """The BatchNorm node folded into conv ``node``, if any."""
        bn_name = self.fusions_conv_to_bn.get(node.name)
        if bn_name is None:
            return None
        return next(u for u in node.users if u.name == bn_name)

    def value(self, arg):
        """The converted value of an fx argument (node -> value; literals unchanged)."""
        if isinstance(arg, fx.Node):
            return self.values[arg.name]
        return arg

    # ---- naming: the one place that names layers and records their weights ----------
    def new_weights(self, role: str, value: torch.Tensor | np.ndarray, recipe: str = "copy", inputs: dict | None = None,
                    params: dict | None = None, *, dtype: torch.dtype | None = None):
        """TensorRT weights for the next layer :meth:`name` names: ``value`` (computed in float32 or
        wider) rounded once to ``dtype`` (default: the engine's float type; float32 for the float
        stand-ins of integer and boolean constants), derived from the state_dict by
        ``recipe(inputs, **params)``. Recorded in the weight map as ``"<layer name> <role>"``, with
        that dtype, when the layer is named."""
        assert role in ROLES, role
        want = self.float_dtype if dtype is None else dtype
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        tensor = dtypes.round_to(tensor.cpu(), want).contiguous()
        arr = np.ascontiguousarray(dtypes.to_numpy(tensor))
        self.keepalive.append(arr)
        if want == torch.bfloat16:   # no NumPy bfloat16: TensorRT reads the bit patterns by pointer
            w = self.trt.Weights(self.trt.DataType.BF16, arr.ctypes.data, arr.size)
        else:
            w = self.trt.Weights(arr)
        self._pending.append((w, role, arr, recipe, dict(inputs or {}), dict(params or {}),
                              str(want).replace("torch.", "")))
        return w

    def name(self, layer, suffix: str | None = None, *, full: str | None = None):
        """Name ``layer`` and record the weights created for it since the last layer named; return it.

        The name is the node's base name (see ``layer_names_for``), ``"<base>.<suffix>"`` with a
        suffix, or ``full`` as given (layers that belong to no node, e.g. output copies). Every
        weight made by :meth:`new_weights` before this call belongs to ``layer``: TensorRT matches
        weight names to weights by pointer, so naming must follow the layer's creation."""
        if layer is None:
            node = self.node
            raise RuntimeError(f"TensorRT rejected a layer for node {node.name} ({node.target}); see the TensorRT log"
                               if node is not None else f"TensorRT rejected layer {full!r}; see the TensorRT log")
        if full is None:
            base = self.layer_names[self.current_node.name]
            full = base if suffix is None else f"{base}.{suffix}"
        if full in self._used_names:
            raise RuntimeError(f"internal error: layer name {full!r} used twice")
        self._used_names.add(full)
        layer.name = full
        for w, role, arr, recipe, inputs, params, dtype in self._pending:
            wname = f"{full} {role}"
            if wname in self.weight_map.sources:
                raise RuntimeError(f"internal error: engine weight {wname!r} recorded twice")
            if recipe == "copy" and not any(has_key(v) for v in inputs.values()):
                recipe = "constant"
            self.weight_map.sources[wname] = WeightSource(
                recipe=recipe, inputs=inputs, params=params,
                shape=tuple(int(s) for s in arr.shape), dtype=dtype)
            self.weights[wname] = arr
            if not self.network.set_weights_name(w, wname):
                raise RuntimeError(f"TensorRT refused the weight name {wname!r}")
        self._pending.clear()
        return layer

    def check_all_named(self) -> None:
        """After a converter: every weight it made went to a layer it named (else the next
        node's layer would claim them under the wrong name)."""
        if self._pending:
            roles = [p[1] for p in self._pending]
            self._pending.clear()
            node = self.current_node
            raise RuntimeError(f"internal error: the converter of node {node.name} ({node.target}) made "
                               f"{roles} weights but named no layer after them")

    # ---- weights ----------------------------------------------------------------
    def literal(self, value: torch.Tensor | np.ndarray, origin: str | None = None) -> dict:
        """Record a literal (not from the state_dict) in the map; return its operand. ``origin``
        names the model tensor it holds, if any (see :attr:`StaticValue.origin`)."""
        cid = f"c{self._n_constants}"
        self._n_constants += 1
        arr = dtypes.to_numpy(value.detach().cpu()) if isinstance(value, torch.Tensor) else np.asarray(value)
        self.weight_map.constants[cid] = np.ascontiguousarray(arr).copy()
        if origin is not None:
            self.constant_origins[cid] = origin
        return {"const": cid}

    def operand(self, value: StaticValue) -> Any:
        """How ``value`` derives from the model: its operand, recording it as a literal on first use."""
        if value.operand is None:
            value.operand = self.literal(value.tensor, value.origin)
        return value.operand

    def refittable(self, value: StaticValue) -> bool:
        """Whether ``value`` depends on the state_dict or on a model tensor that refit reads anew."""
        if value.origin is not None:
            return True
        op = value.operand
        return op is not None and (has_key(op) or any(c in self.constant_origins
                                                      for c in operand_constants(op)))

    def constant(self, value: StaticValue | torch.Tensor | float | int, *, rank: int | None = None,
                 shape: Sequence[int] | None = None, suffix: str = "const", dtype: torch.dtype | None = None):
        """A named constant layer holding ``value`` (broadcast-ready: leading 1s up to ``rank``), of
        the engine's float type, or of the floating ``dtype`` given (float32 where an op runs in
        float32 inside a reduced-precision engine)."""
        origin = None
        if isinstance(value, StaticValue):
            # A float16/bfloat16 weight into an engine weight of its own dtype: its stored bits (widening
            # and rounding back is the identity), a view of the model's tensor, never a new array.
            own = value.widen and value.stored.dtype == (dtype or self.float_dtype)
            tensor, operand, origin = value.stored if own else value.tensor, value.operand, value.origin
        elif isinstance(value, torch.Tensor):
            tensor, operand = value, None
        else:
            tensor = torch.tensor(value)   # a Python int or bool stays integral (a float32 stand-in below)
            operand = None
        # Floating values in the engine's type (rounded once from what the graph computed); integers
        # and booleans as float32 (exact below 2**24), which the converter casts to their type
        # (``typed_constant``).
        floating = tensor.is_floating_point()
        tensor = tensor.detach() if floating else tensor.detach().to(torch.float32)
        if shape is None:
            shape = tuple(tensor.shape)
            if rank is not None:
                if len(shape) > rank:
                    raise RuntimeError(f"constant of rank {len(shape)} cannot broadcast to rank {rank}")
                shape = (1,) * (rank - len(shape)) + shape
        tensor = tensor.reshape(tuple(shape))
        if operand is None:
            operand = self.literal(tensor, origin)
        w = self.new_weights("CONSTANT", tensor, "copy", {"x": operand},
                             dtype=(dtype or self.float_dtype) if floating else torch.float32)
        return self.name(self.network.add_constant(self.trt.Dims(tuple(shape)), w), suffix).get_output(0)
