"""Dynamic input shapes on the TensorRT backend: optimization profiles at build time, input shapes
on the execution context at run time.

Written to NVIDIA's documentation (this code cannot run an engine on the machines that wrote it):
- "Working with Dynamic Shapes", TensorRT Developer Guide,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html:
  a network input has -1 for each run-time dimension; the builder config needs at least one
  optimization profile giving every dynamic input's min/opt/max
  (``profile = builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt, max)``,
  ``config.add_optimization_profile(profile)``); at run time the context's input shapes must be set
  before enqueueing (``context.set_input_shape(name, shape)``), after which
  ``context.get_tensor_shape(output)`` gives the output's concrete shape.
- IExecutionContext, Python API,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html:
  ``set_optimization_profile_async(profile_index, stream_handle)`` selects another profile (a new
  context starts on profile 0); ``set_input_shape`` returns False for a shape outside the profile.
- IOptimizationProfile, https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refitcore.capture.shapes import ShapeProfiles

__all__ = ["add_profiles", "set_input_shapes"]


def add_profiles(builder, config, profiles: ShapeProfiles | None) -> int:
    """One optimization profile per entry of ``profiles.profiles``; returns how many were added."""
    if profiles is None:
        return 0
    for table in profiles.profiles:
        profile = builder.create_optimization_profile()
        for name, ranges in zip(profiles.input_names, table):
            lo = tuple(r[0] for r in ranges)
            opt = tuple(r[1] for r in ranges)
            hi = tuple(r[2] for r in ranges)
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise RuntimeError(f"TensorRT refused the optimization profile {table} (inputs {profiles.input_names})")
    return len(profiles.profiles)


def set_input_shapes(context, profiles: ShapeProfiles, names: Sequence[str], shapes: Sequence[Sequence[int]],
                     *, current: int, stream_handle: Any, said=list) -> int:
    """Select the profile that contains ``shapes`` (raising :class:`refitcore.capture.shapes.ShapeRangeError`
    naming the input, dimension and range when none does) and set each input's shape on
    ``context``. Returns the selected profile index."""
    by_name = dict(zip(names, shapes))
    index = profiles.profile_for([by_name[n] for n in profiles.input_names])
    if index != current and not context.set_optimization_profile_async(index, stream_handle):
        raise RuntimeError(f"TensorRT could not select optimization profile {index}: "
                           + ("; ".join(said()) or "no message"))
    for name, shape in zip(names, shapes):
        if not context.set_input_shape(name, tuple(int(s) for s in shape)):
            raise RuntimeError(f"TensorRT refused shape {list(shape)} for input {name!r}: "
                               + ("; ".join(said()) or "no message"))
    return index
