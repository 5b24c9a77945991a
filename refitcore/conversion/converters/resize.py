"""Upsampling (F.interpolate) as TensorRT's IResizeLayer.

TensorRT's Resize (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Resize.html)
maps an output coordinate back to the input with ``coordinate_transformation``:
ALIGN_CORNERS ``x_in = x_out * (len_in - 1) / (len_out - 1)``, ASYMMETRIC ``x_in = x_out * len_in / len_out``,
HALF_PIXEL ``x_in = (x_out + 0.5) * len_in / len_out - 0.5``; NEAREST rounds with ``nearest_rounding``
(default FLOOR). PyTorch's modes map onto these exactly:

- ``nearest``: ``src = floor(dst * scale)`` -> ASYMMETRIC + FLOOR (set explicitly, not left to the default);
- ``nearest-exact``: ``src = floor((dst + 0.5) * scale)`` -> HALF_PIXEL + HALF_UP;
- ``(bi|tri)linear``: align_corners=True -> ALIGN_CORNERS (single-pixel outputs read pixel 0, as
  PyTorch's scale 0 does: selector UPPER); False -> HALF_PIXEL (PyTorch clamps negative source
  coordinates to 0; linear interpolation at the clamped edge gives the same value).

PyTorch's ``scale`` is ``len_in / len_out`` when an output size is given, but ``1 / scale_factor``
when a scale factor is: the two differ when ``len_in * scale_factor`` is not a whole number, and
TensorRT's formulas use the lengths, so such calls are refused. The output shape is always set
explicitly. Bicubic is refused: the operator page does not say how TensorRT reads the pixels a
cubic kernel needs beyond the border (PyTorch clamps them to the edge).

``F.grid_sample`` is TensorRT's IGridSampleLayer
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/GridSample.html): 4-D
input [N, C, H, W], grid [N, H_out, W_out, 2] of coordinates normalized to [-1, 1],
``align_corners`` as PyTorch's, interpolation NEAREST / LINEAR and ``sample_mode`` FILL (zeros),
CLAMP (border), REFLECT (reflection). Volumetric (5-D) sampling is refused (the layer takes
[N, C, H, W]), and so is bicubic, for the reason above: the page does not say which cubic
coefficient the layer uses nor how it reads the taps beyond the border.
"""
from __future__ import annotations

import torch

from refitcore.conversion.context import ConversionContext
from refitcore.conversion.converters._util import arg, as_tensor, out_shape
from refitcore.conversion.registry import converter

aten = torch.ops.aten

# ATen op -> (PyTorch mode, has align_corners argument)
_OPS = {}
for _n, _mode in ((1, "nearest"), (2, "nearest"), (3, "nearest")):
    _OPS[getattr(aten, f"upsample_nearest{_n}d").vec] = (_mode, False)
    _OPS[getattr(aten, f"upsample_nearest{_n}d").default] = (_mode, False)
    _OPS[getattr(aten, f"_upsample_nearest_exact{_n}d").vec] = ("nearest-exact", False)
    _OPS[getattr(aten, f"_upsample_nearest_exact{_n}d").default] = ("nearest-exact", False)
for _op in (aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_trilinear3d):
    _OPS[_op.vec] = ("linear", True)
    _OPS[_op.default] = ("linear", True)


def _scales(node) -> list:
    """PyTorch's scale factors per resized axis as the call gives them (None: from the sizes)."""
    mode, has_align = _OPS[node.target]
    rest = list(node.args[2 if not has_align else 3:])
    n = node.meta["val"].dim() - 2
    if node.target._overloadname == "vec":
        factors = rest[0] if rest else node.kwargs.get("scale_factors")
        return list(factors) if factors is not None else [None] * n
    return (rest + [None] * n)[:n]


def _check(node) -> str | None:
    x = node.args[0].meta["val"]
    out = node.meta["val"]
    for d, s in enumerate(_scales(node)):
        size_in, size_out = int(x.shape[2 + d]), int(out.shape[2 + d])
        if s is not None and float(size_in) * float(s) != float(size_out):
            return (f"scale factor {s} on an axis of {size_in} gives {size_out} (not a whole multiple): PyTorch "
                    f"maps coordinates with 1/scale, TensorRT with the lengths; pass size= instead")
    return None


def resize(ctx: ConversionContext, x, shape, mode: str, align_corners: bool = False):
    """An IResizeLayer to ``shape`` with PyTorch ``mode``'s coordinate mapping (see the module doc)."""
    trt = ctx.trt
    layer = ctx.network.add_resize(x)
    layer.shape = trt.Dims(tuple(int(s) for s in shape))
    T, R = trt.ResizeCoordinateTransformation, trt.ResizeRoundMode
    if mode == "nearest":
        layer.resize_mode = trt.InterpolationMode.NEAREST
        layer.coordinate_transformation = T.ASYMMETRIC
        layer.nearest_rounding = R.FLOOR
    elif mode == "nearest-exact":
        layer.resize_mode = trt.InterpolationMode.NEAREST
        layer.coordinate_transformation = T.HALF_PIXEL
        layer.nearest_rounding = R.HALF_UP
    else:
        layer.resize_mode = trt.InterpolationMode.LINEAR
        layer.coordinate_transformation = T.ALIGN_CORNERS if align_corners else T.HALF_PIXEL
        if align_corners:
            layer.selector_for_single_pixel = trt.ResizeSelector.UPPER
    return ctx.name(layer).get_output(0)


@converter(*_OPS, capability=_check)
def upsample(ctx, node, args, kwargs):
    mode, has_align = _OPS[node.target]
    align = bool(args[2]) if has_align and len(args) > 2 else bool(kwargs.get("align_corners", False))
    return resize(ctx, args[0], out_shape(ctx), mode, align)


# PyTorch's enums (torch.nn.functional.grid_sample: mode bilinear=0, nearest=1, bicubic=2;
# padding_mode zeros=0, border=1, reflection=2) -> TensorRT's names
_GRID_MODES = {0: "LINEAR", 1: "NEAREST"}
_GRID_PADDING = {0: "FILL", 1: "CLAMP", 2: "REFLECT"}
_GRID_MODE_NAMES = {0: "bilinear", 1: "nearest", 2: "bicubic"}


def _check_grid_sample(node) -> str | None:
    x = node.args[0].meta["val"]
    mode = arg(node.args, node.kwargs, 2, "interpolation_mode")
    padding = arg(node.args, node.kwargs, 3, "padding_mode")
    if x.dim() != 4:   # NVIDIA's GridSample operator: input [N, C, H, W], grid [N, H_out, W_out, 2]; no 3-D form
        return (f"{x.dim()}-D grid_sample (TensorRT's GridSample takes 4-D [N, C, H, W] input and a "
                f"[N, H_out, W_out, 2] grid: it has no volumetric form)")
    if not x.dtype.is_floating_point:
        return f"grid_sample of {x.dtype} (TensorRT's GridSample takes floating-point input)"
    if mode not in _GRID_MODES:
        return (f"{_GRID_MODE_NAMES.get(mode, mode)} grid_sample (TensorRT documents no cubic coefficient nor "
                f"how cubic taps beyond the border are read; PyTorch's are A=-0.75, padded per tap)")
    if padding not in _GRID_PADDING:
        return f"grid_sample padding mode {padding}"
    return None


def grid_sample(ctx: ConversionContext, x, grid, mode: str, padding: str, align_corners: bool):
    """An IGridSampleLayer (TensorRT names: ``mode`` NEAREST/LINEAR, ``padding`` FILL/CLAMP/REFLECT)."""
    trt = ctx.trt
    x = as_tensor(ctx, x, rank_=4, suffix="input")
    grid = as_tensor(ctx, grid, rank_=4, suffix="grid")
    layer = ctx.network.add_grid_sample(x, grid)
    layer.interpolation_mode = getattr(trt.InterpolationMode, mode)
    layer.sample_mode = getattr(trt.SampleMode, padding)
    layer.align_corners = bool(align_corners)
    return ctx.name(layer).get_output(0)


@converter(aten.grid_sampler.default, aten.grid_sampler_2d.default, aten.grid_sampler_3d.default,
           capability=_check_grid_sample)
def grid_sampler(ctx, node, args, kwargs):
    return grid_sample(ctx, args[0], args[1], _GRID_MODES[arg(args, kwargs, 2, "interpolation_mode")],
                       _GRID_PADDING[arg(args, kwargs, 3, "padding_mode")],
                       arg(args, kwargs, 4, "align_corners"))


__all__ = ["resize", "grid_sample"]
