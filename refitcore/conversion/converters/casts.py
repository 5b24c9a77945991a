"""Type conversions (ICastLayer) and the metadata assertions torch.export leaves in the graph.

TensorRT's cast (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Cast.html)
converts float to integer by truncation toward zero, as ``Tensor.to`` does; a cast to bool maps
nonzero to true. float64 has no TensorRT tensor type: a cast to it is refused.
"""
from __future__ import annotations

import torch

from refitcore.conversion.converters._util import cast
from refitcore.conversion.registry import converter

aten = torch.ops.aten


def _dtype_ok(node) -> str | None:
    dtype = node.meta["val"].dtype
    return "cast to torch.float64 (TensorRT has no float64 tensors)" if dtype == torch.float64 else None


@converter(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.other, aten.type_as.default,
           capability=_dtype_ok)
def to_copy(ctx, node, args, kwargs):
    """Tensor.to(dtype): a cast to the output's dtype (device, layout and memory format are moot)."""
    return cast(ctx, args[0], node.meta["val"].dtype)


@converter(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default, aten._assert_async.msg, aten._assert_async.default)
def assert_metadata(ctx, node, args, kwargs):
    """Checks of dtype, shape or a scalar that held when the graph was exported (static shapes):
    nothing to compute."""
    return None


__all__ = ["to_copy", "assert_metadata"]
