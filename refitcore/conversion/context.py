"""The conversion context: the network being built, and the weight map recorded as each
refittable weight is created."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx

from .. import _trt
from ..weight_map import WeightMap, WeightSource

__all__ = ["StaticValue", "ConversionContext", "ROLES"]

ROLES = ("KERNEL", "BIAS", "SCALE", "SHIFT", "POWER", "CONSTANT")


@dataclasses.dataclass
class StaticValue:
    """A value known at conversion time (weights and what the graph computes from them only).

    ``operand`` says how it derives from the state_dict (see :mod:`refitcore.weight_map`)."""

    tensor: torch.Tensor
    operand: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


def to_engine_array(t: torch.Tensor, dtype: np.dtype = np.float32) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu").numpy().astype(dtype, copy=False))


@dataclasses.dataclass
class ConversionContext:
    network: Any
    weight_map: WeightMap
    layer_names: dict[str, str]          # fx node name -> base layer name
    fusions_conv_to_bn: dict[str, str]
    node: fx.Node | None = None
    values: dict = dataclasses.field(default_factory=dict)   # fx node name -> converted value
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _used_names: set = dataclasses.field(default_factory=set)
    _keepalive: list = dataclasses.field(default_factory=list)
    _n_constants: int = 0

    @property
    def trt(self):
        return _trt.trt()

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

    # ---- naming -----------------------------------------------------------------
    def layer_name(self, suffix: str | None = None) -> str:
        base = self.layer_names[self.node.name]
        name = base if suffix is None else f"{base}.{suffix}"
        if name in self._used_names:
            raise RuntimeError(f"internal error: layer name {name!r} used twice")
        self._used_names.add(name)
        return name

    def name(self, layer, suffix: str | None = None):
        """Give ``layer`` its deterministic name and return it."""
        if layer is None:
            raise RuntimeError(f"TensorRT rejected a layer for node {self.node.name} ({self.node.target}); "
                               f"see the TensorRT log")
        layer.name = self.layer_name(suffix)
        self.commit_weight_names()
        return layer

    # ---- weights ----------------------------------------------------------------
    def literal(self, value: torch.Tensor | np.ndarray) -> dict:
        """Record a literal (not from the state_dict) in the map; return its operand."""
        cid = f"c{self._n_constants}"
        self._n_constants += 1
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self.weight_map.constants[cid] = np.ascontiguousarray(arr).copy()
        return {"const": cid}

    def weights_for(self, layer_name: str, role: str, value: np.ndarray, recipe: str,
                    inputs: dict, params: dict | None = None):
        """Create named TensorRT weights for ``layer_name``/``role`` and record their source."""
        assert role in ROLES, role
        t = self.trt
        arr = np.ascontiguousarray(value, dtype=np.float32)
        name = f"{layer_name} {role}"
        if name in self.weight_map.sources:
            raise RuntimeError(f"internal error: engine weight {name!r} recorded twice")
        recipe = "constant" if recipe == "copy" and not any(
            _has_key(v) for v in inputs.values()) else recipe
        self.weight_map.sources[name] = WeightSource(
            recipe=recipe, inputs=dict(inputs), params=dict(params or {}),
            shape=tuple(int(s) for s in arr.shape), dtype="float32")
        self._keepalive.append(arr)
        w = t.Weights(arr)
        self._pending_names.append((w, name))
        self.weights[name] = arr
        return w

    def commit_weight_names(self) -> None:
        """Name the weights of the layer just added (TensorRT matches names to weights by pointer,
        so this must follow the layer creation)."""
        for w, name in self._pending_names:
            if not self.network.set_weights_name(w, name):
                raise RuntimeError(f"TensorRT refused the weight name {name!r}")
        self._pending_names.clear()

    def __post_init__(self):
        self._pending_names: list = []

    def constant(self, value: StaticValue | torch.Tensor | float | int, *, rank: int | None = None,
                 shape: Sequence[int] | None = None, suffix: str = "const"):
        """A named constant layer holding ``value`` (broadcast-ready: leading 1s up to ``rank``)."""
        if isinstance(value, StaticValue):
            tensor, operand = value.tensor, value.operand
        elif isinstance(value, torch.Tensor):
            tensor, operand = value, None
        else:
            tensor = torch.tensor(value, dtype=torch.float32)
            operand = None
        tensor = tensor.detach().to(torch.float32)
        if shape is None:
            shape = tuple(tensor.shape)
            if rank is not None:
                if len(shape) > rank:
                    raise RuntimeError(f"constant of rank {len(shape)} cannot broadcast to rank {rank}")
                shape = (1,) * (rank - len(shape)) + shape
        tensor = tensor.reshape(tuple(shape))
        if operand is None:
            operand = self.literal(tensor)
        layer_name = self.layer_name(suffix)
        w = self.weights_for(layer_name, "CONSTANT", tensor.numpy(), "copy", {"x": operand})
        layer = self.network.add_constant(self.trt.Dims(tuple(shape)), w)
        layer.name = layer_name
        self.commit_weight_names()
        return layer.get_output(0)

    def finish(self, layer, name: str):
        """Apply a reserved name to ``layer`` and name its pending weights."""
        if layer is None:
            raise RuntimeError(f"TensorRT rejected layer {name!r} (node {self.node.name}, {self.node.target})")
        layer.name = name
        self.commit_weight_names()
        return layer


def _has_key(operand: Any) -> bool:
    from ..weight_map import operand_keys

    return next(iter(operand_keys(operand)), None) is not None
