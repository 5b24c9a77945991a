"""Sample inputs for comparing an engine with eager PyTorch: ``random:N[:SEED]``, a ``.pt`` file
(read with ``torch.load(weights_only=True)``) or a ``.npy`` file (read without pickle), each
checked against the engine's input shapes and dtypes."""
from __future__ import annotations

import os
from typing import Any

from refitcore.capture.shapes import ShapeRangeError, sample_shapes

__all__ = ["load_samples", "SampleError"]


class SampleError(ValueError):
    """The samples cannot be used (bad spec, unreadable file, wrong shapes); the message says why."""


def load_samples(spec: str, io) -> list[tuple]:
    """Sample inputs from ``random:N[:SEED]``, a ``.pt`` file (weights-only) or a ``.npy`` file,
    checked against the engine's input shapes and dtypes (``io``: an :class:`refitcore.IOSpec`).

    Example::

        samples = load_samples("random:4:123", engine.io)
    """
    import torch

    shapes = [tuple(s) for s in io.input_shapes]
    dtypes = [getattr(torch, d) for d in io.input_dtypes]
    if spec.startswith("random:"):
        return _random(spec, shapes, dtypes, io.profiles)
    if not os.path.exists(spec):
        raise SampleError(f"samples file {spec!r}: no such file")
    if os.path.isdir(spec):
        raise SampleError(f"samples file {spec!r} is a directory, not a file")
    obj = _read(spec)
    if isinstance(obj, torch.Tensor):
        if len(shapes) != 1:
            raise SampleError(f"samples file {spec!r} holds one tensor but the engine has {len(shapes)} inputs; "
                              f"save a list of samples, each a list of {len(shapes)} tensors")
        dynamic = io.profiles is not None   # then any shape inside the profile, checked below
        if tuple(obj.shape) == shapes[0] or (dynamic and obj.dim() == len(shapes[0])):
            raw = [(obj,)]
        elif obj.dim() == len(shapes[0]) + 1 and (dynamic or tuple(obj.shape[1:]) == shapes[0]):
            raw = [(t,) for t in obj]
        else:
            raise SampleError(f"samples file {spec!r}: tensor of shape {list(obj.shape)} where the engine takes "
                              f"{list(shapes[0])} (or N x {list(shapes[0])} for N samples); recompile for this "
                              f"shape or give samples of the compiled shape")
    elif isinstance(obj, (list, tuple)) and obj:
        raw = [(s,) if isinstance(s, torch.Tensor) else tuple(s) for s in obj]
    else:
        raise SampleError(f"samples file {spec!r}: expected a tensor or a non-empty list of samples, "
                          f"got {type(obj).__name__}")
    samples = []
    for i, sample in enumerate(raw):
        if len(sample) != len(shapes) or not all(isinstance(t, torch.Tensor) for t in sample):
            raise SampleError(f"samples file {spec!r}: sample {i} has {len(sample)} entries, the engine takes "
                              f"{len(shapes)} tensor input(s)")
        if io.profiles is not None:
            try:
                io.profiles.profile_for([tuple(t.shape) for t in sample])
            except ShapeRangeError as err:
                raise SampleError(f"samples file {spec!r}: sample {i}: {err}") from None
        fixed = []
        for j, (t, shape, dtype) in enumerate(zip(sample, shapes, dtypes)):
            if io.profiles is None and tuple(t.shape) != shape:
                raise SampleError(f"samples file {spec!r}: sample {i} input {j} has shape {list(t.shape)}, the "
                                  f"engine was compiled for {list(shape)}")
            fixed.append(t.to(dtype))
        samples.append(tuple(fixed))
    return samples


def _random(spec: str, shapes, dtypes, profiles=None) -> list[tuple]:
    """N random samples of the engine's shapes; for a dynamic engine, every profile's min, opt and
    max shapes first, then N shapes drawn inside the ranges."""
    import torch

    fields = spec.split(":")[1:]
    try:
        n = int(fields[0])
        seed = int(fields[1]) if len(fields) > 1 else 0
        if n <= 0 or len(fields) > 2:
            raise ValueError
    except (ValueError, IndexError):
        raise SampleError(f"--inputs {spec!r}: expected random:N or random:N:SEED with N >= 1") from None
    for dtype in dtypes:
        if not dtype.is_floating_point:
            raise SampleError(f"--inputs random: the engine has a {dtype} input; give a samples file instead")
    g = torch.Generator().manual_seed(seed)
    per_sample = [shapes] * n if profiles is None else sample_shapes(profiles, n, seed=seed)
    return [tuple(torch.randn(shape, generator=g).to(dtype) for shape, dtype in zip(sample, dtypes))
            for sample in per_sample]


def _read(spec: str) -> Any:
    import numpy as np
    import torch

    try:
        if spec.endswith(".npy"):
            return torch.from_numpy(np.load(spec, allow_pickle=False))
        return torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SampleError(f"samples file {spec!r} cannot be read (expected a torch.save'd tensor or list of "
                          f"tensors, or a .npy array): {type(err).__name__}: {err}") from err
