"""Read an INetworkDefinition into a plain-data plan: the reference backend's "engine plan", and the
fallback mapping's way of reading weights back off a freshly converted network.

Everything here is read off the TensorRT objects (layer type, attributes, weights, tensor
names and shapes), never from our own side tables, so the interpreter executes exactly the
network that TensorRT would be given. One exception: TensorRT's Python API cannot hand back the
values of BF16 weights (``Weights.numpy()`` has no bfloat16), so those come from ``host`` (the
values the converter made, by engine weight name: ``ConversionResult.weights``), checked against
the type and count TensorRT reports for the layer's weights.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from refitcore import _trt

__all__ = ["read_network", "network_weights", "WEIGHT_ROLES", "SHAPE_DTYPES", "LOOP_BOUNDARIES"]

# layer type -> (binding class, attributes to read, {ROLE: attribute holding weights})
_LAYERS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "CONVOLUTION": ("IConvolutionLayer", ("num_output_maps", "kernel_size_nd", "stride_nd", "padding_nd",
                                          "pre_padding", "post_padding", "dilation_nd", "num_groups",
                                          "padding_mode"), {"KERNEL": "kernel", "BIAS": "bias"}),
    "DECONVOLUTION": ("IDeconvolutionLayer", ("num_output_maps", "kernel_size_nd", "stride_nd", "padding_nd",
                                              "pre_padding", "post_padding", "dilation_nd", "num_groups",
                                              "padding_mode"), {"KERNEL": "kernel", "BIAS": "bias"}),
    "ACTIVATION": ("IActivationLayer", ("type", "alpha", "beta"), {}),
    "POOLING": ("IPoolingLayer", ("type", "window_size_nd", "stride_nd", "padding_nd", "pre_padding",
                                  "post_padding", "padding_mode", "average_count_excludes_padding",
                                  "blend_factor"), {}),
    "SCALE": ("IScaleLayer", ("mode", "channel_axis"), {"SCALE": "scale", "SHIFT": "shift", "POWER": "power"}),
    "ELEMENTWISE": ("IElementWiseLayer", ("op",), {}),
    "SHUFFLE": ("IShuffleLayer", ("first_transpose", "reshape_dims", "second_transpose", "zero_is_placeholder"), {}),
    "MATRIX_MULTIPLY": ("IMatrixMultiplyLayer", ("op0", "op1"), {}),
    "CONSTANT": ("IConstantLayer", ("shape",), {"CONSTANT": "weights"}),
    "REDUCE": ("IReduceLayer", ("op", "axes", "keep_dims"), {}),
    "NORMALIZATION": ("INormalizationLayer", ("axes", "epsilon", "num_groups"), {}),
    "CONCATENATION": ("IConcatenationLayer", ("axis",), {}),
    "SLICE": ("ISliceLayer", ("start", "shape", "stride", "mode", "axes"), {}),
    "SOFTMAX": ("ISoftMaxLayer", ("axes",), {}),
    "UNARY": ("IUnaryLayer", ("op",), {}),
    "IDENTITY": ("IIdentityLayer", (), {}),
    "CUMULATIVE": ("ICumulativeLayer", ("op", "exclusive", "reverse"), {}),
    "TOPK": ("ITopKLayer", ("op", "k", "axes"), {}),
    "CAST": ("ICastLayer", ("to_type",), {}),
    "GATHER": ("IGatherLayer", ("axis", "mode", "num_elementwise_dims"), {}),
    "SELECT": ("ISelectLayer", (), {}),
    "EINSUM": ("IEinsumLayer", ("equation",), {}),
    "PADDING": ("IPaddingLayer", ("pre_padding_nd", "post_padding_nd"), {}),
    "SHAPE": ("IShapeLayer", (), {}),
    "FILL": ("IFillLayer", ("operation", "alpha", "beta", "to_type"), {}),
    "RESIZE": ("IResizeLayer", ("shape", "scales", "resize_mode", "coordinate_transformation",
                                "nearest_rounding", "cubic_coeff", "exclude_outside",
                                "selector_for_single_pixel"), {}),
    "GRID_SAMPLE": ("IGridSampleLayer", ("interpolation_mode", "sample_mode", "align_corners"), {}),
    "SCATTER": ("IScatterLayer", ("mode", "axis"), {}),
    "NON_ZERO": ("INonZeroLayer", ("indices_type",), {}),
    "UNSQUEEZE": ("IUnsqueezeLayer", (), {}),
    "SQUEEZE": ("ISqueezeLayer", (), {}),
    "PARAMETRIC_RELU": ("IParametricReLULayer", (), {}),
    # IAttention is two layers: ATTENTION_INPUT (inputs query, key, value, mask, ...) computes the
    # attention, ATTENTION_OUTPUT hands its result on; the attributes live on the IAttention object.
    "ATTENTION_INPUT": ("IAttentionInputLayer", ("norm_op", "causal_kind", "decomposable", "query_form",
                                                 "key_value_form", "num_ranks"), {}),
    "ATTENTION_OUTPUT": ("IAttentionOutputLayer", (), {}),
    # a loop (ILoop) is delimited by these layers, each naming its loop in attrs["loop"]
    "TRIP_LIMIT": ("ITripLimitLayer", ("kind",), {}),
    "ITERATOR": ("IIteratorLayer", ("axis", "reverse"), {}),
    "RECURRENCE": ("IRecurrenceLayer", (), {}),
    "LOOP_OUTPUT": ("ILoopOutputLayer", ("kind", "axis"), {}),
}
LOOP_BOUNDARIES = ("TRIP_LIMIT", "ITERATOR", "RECURRENCE", "LOOP_OUTPUT")
# layer types whose attributes are read off another object the layer holds
_ATTRS_OF = {"ATTENTION_INPUT": "attention"}

# attributes that a layer input replaces when it is set: reshape_dims by a shuffle's input 1, a
# fill's alpha and beta by its inputs 1 and 2, a slice's axes by its input 5
_FROM_INPUT = {"reshape_dims": 1, "alpha": 1, "beta": 2, "axes": 5}
WEIGHT_ROLES = {t: tuple(roles) for t, (_, _, roles) in _LAYERS.items() if roles}
SHAPE_DTYPES = ("INT64", "INT32")


def _plain(value: Any, rank: int | None = None):
    """TensorRT attribute values -> JSON-able values."""
    t = _trt.trt()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, t.Permutation):
        n = rank if rank is not None else 8
        return [int(value[i]) for i in range(n)]
    if isinstance(value, t.Dims) or type(value).__name__.startswith("Dims"):
        return [int(v) for v in value]
    if hasattr(value, "name") and hasattr(value, "value") and type(value).__module__.startswith("tensorrt"):
        return value.name  # an enum
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tensor_info(tensor) -> dict:
    return {"name": tensor.name, "shape": [int(s) for s in tensor.shape], "dtype": tensor.dtype.name}


def _weights_of(t, w, layer_name: str, role: str, host: Mapping[str, np.ndarray] | None,
                copy: bool = True) -> np.ndarray:
    """The values of a layer's ``trt.Weights`` (BF16: as ``uint16`` bit patterns, from ``host``); a
    copy unless ``copy=False``: then the very array the conversion gave TensorRT (``host``, which keeps
    its memory alive: a view NumPy makes of a ``trt.Weights`` does not, and dangles once the network
    is gone), else a copy all the same."""
    if getattr(w, "dtype", None) != t.DataType.BF16:   # an ndarray, or Weights NumPy can hold
        if not copy and host is not None:
            held = host.get(f"{layer_name} {role}")
            if held is not None and held.size == w.size and held.dtype == np.asarray(w).dtype:
                return held.reshape(-1) if held.flags.c_contiguous else np.array(held, copy=True).reshape(-1)
        arr = np.asarray(w)
        return np.array(arr, dtype=arr.dtype, copy=True)
    if not w.size:
        return np.zeros(0, np.uint16)
    name = f"{layer_name} {role}"
    held = None if host is None else host.get(name)
    if held is None or np.asarray(held).dtype != np.uint16 or np.asarray(held).size != w.size:
        raise RuntimeError(f"engine weight {name!r}: BF16 weights ({w.size} values) that TensorRT's Python API "
                           f"cannot read back, and no host copy of them of that size")
    return np.array(held, copy=True).reshape(-1) if copy else np.asarray(held).reshape(-1)


def read_network(network, host: Mapping[str, np.ndarray] | None = None, *, copy: bool = True) -> dict:
    """Plan = {"inputs", "outputs", "layers"}; each layer {name, type, inputs, outputs, attrs,
    weights: {ROLE: ndarray}} with empty weights left out. ``host``: the values of BF16 weights
    (see the module docstring). Weights are copies unless ``copy=False`` (views of the network's
    arrays: the caller must not keep them past the model's next write)."""
    t = _trt.trt()
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ltype = layer.type.name
        if ltype not in _LAYERS:
            raise NotImplementedError(
                f"the reference backend cannot interpret layer {layer.name!r} of type {ltype}; "
                f"add it to refitcore/conversion/network_reader.py and refitcore/backends/reference_ops.py")
        cls_name, attr_names, roles = _LAYERS[ltype]
        layer.__class__ = getattr(t, cls_name)
        inputs = []
        for k in range(layer.num_inputs):
            tensor = layer.get_input(k)
            inputs.append(None if tensor is None else tensor.name)
        outputs = [_tensor_info(layer.get_output(k)) for k in range(layer.num_outputs)]
        in_rank = len(layer.get_input(0).shape) if layer.num_inputs and layer.get_input(0) is not None else None
        attrs = {}
        holder = getattr(layer, _ATTRS_OF[ltype]) if ltype in _ATTRS_OF else layer
        for a in attr_names:
            if a in _FROM_INPUT and _FROM_INPUT[a] < len(inputs) and inputs[_FROM_INPUT[a]] is not None:
                continue   # given by a shape tensor (dynamic shapes): the attribute is meaningless
            if not hasattr(holder, a):
                continue
            try:
                raw = getattr(holder, a)
            except Exception:  # noqa: BLE001 - an attribute this TensorRT version does not expose for this layer
                continue
            rank = in_rank if a == "first_transpose" else len(outputs[0]["shape"]) if a == "second_transpose" else None
            attrs[a] = _plain(raw, rank)
        if ltype in LOOP_BOUNDARIES:
            attrs["loop"] = layer.loop.name
        weights = {}
        for role, attr in roles.items():
            arr = _weights_of(t, getattr(layer, attr), layer.name, role, host, copy)
            if arr.size:
                weights[role] = arr
        if ltype == "CONSTANT" and outputs[0]["dtype"] in SHAPE_DTYPES:
            # Integer constants are shape arithmetic (dynamic shapes): structure, not refittable weights.
            attrs["values"] = [int(v) for v in np.asarray(weights.pop("CONSTANT", np.zeros(0))).reshape(-1)]
        layers.append({"name": layer.name, "type": ltype, "inputs": inputs, "outputs": outputs,
                       "attrs": attrs, "weights": weights})
    inputs = [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)]
    return {"inputs": inputs, "outputs": outputs, "layers": layers}


def network_weights(network, shapes: Mapping[str, tuple[int, ...]], prefix: str = "",
                    host: Mapping[str, np.ndarray] | None = None, *, copy: bool = True) -> dict[str, np.ndarray]:
    """Every refittable weight read off a converted network's layers (the fallback mapping), named
    ``prefix + "<layer name> <ROLE>"``, in its engine dtype (BF16 as ``uint16`` bit patterns, from
    ``host``; bool and integer weights, such as the boolean attention masks and integer tables
    Torch-TensorRT's networks hold as CONSTANT weights, in theirs) and shaped as ``shapes`` (engine
    weight name -> shape) says. Copies, unless ``copy=False``: then views of the network's arrays where
    they are contiguous (a weight the conversion took from the state_dict as it is: that tensor's memory)."""
    out: dict[str, np.ndarray] = {}
    for layer in read_network(network, host, copy=copy)["layers"]:
        for role in WEIGHT_ROLES.get(layer["type"], ()):
            arr = layer["weights"].get(role)
            if arr is None:
                continue
            name = f"{prefix}{layer['name']} {role}"
            arr = np.ascontiguousarray(arr)
            shape = shapes.get(name)
            if shape is not None and math.prod(shape) == arr.size:
                arr = arr.reshape(shape)  # TensorRT hands kernels back flat
            out[name] = arr
    return out
