"""Input samples shaped like a model's example inputs: :func:`inputs` (a Hypothesis strategy) and
:func:`boundary_samples` (fixed samples at every shape range's ends)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from refitcore.capture.structured import Inputs

from .recipes import SEED_MAX, InputCall, InputSample
from .shapes import as_profiles, profile_shapes
from .specials import LARGE
from .validation import check_argument, check_some_of

__all__ = ["INPUT_FAMILIES", "inputs", "boundary_samples"]

INPUT_FAMILIES = ("normal", "uniform", "positive", "zeros", "large")


def _int_range(t) -> tuple[int, int] | None:
    """The observed [min, max] of an integer example tensor (None when it has no elements)."""
    if t.numel() == 0:
        return None
    return int(t.min()), int(t.max())


def _is_shape(s) -> bool:
    import torch

    return isinstance(s, torch.Size) or (isinstance(s, (tuple, list)) and all(isinstance(d, int) for d in s))


def _specs(spec) -> list[tuple[tuple[int, ...], Any, Any]]:
    """(shape, dtype, example) per input: the example tensor, or None for a bare shape."""
    import torch

    def one(s):
        if isinstance(s, torch.Tensor):
            return tuple(s.shape), s.dtype, s
        check_argument(_is_shape(s), f"inputs(spec): expected a tensor or a shape, got {s!r}")
        return tuple(int(d) for d in s), torch.float32, None

    if isinstance(spec, torch.Tensor) or _is_shape(spec):
        return [one(spec)]
    return [one(s) for s in spec]


def _input_tensors(specs, shapes, seed: int, family: str, int_high: int | None) -> list:
    """Float inputs drawn from ``family``; integer inputs in [0, int_high) when given, else inside the
    example tensor's observed [min, max] (kept when that cannot be known: no elements); bool
    example tensors kept at their shape (masks), drawn in {False, True} at other shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for (_, dtype, example), shape in zip(specs, shapes):
        if dtype == torch.bool:
            same = example is not None and tuple(example.shape) == tuple(shape)
            out.append(example.clone() if same else torch.randint(0, 2, shape, generator=g).bool())
        elif not dtype.is_floating_point and not dtype.is_complex:
            lo_hi = (0, int_high - 1) if int_high is not None else (
                _int_range(example) if example is not None else (0, 1))
            if lo_hi is None:   # an empty example: nothing to learn the range from
                out.append(example.clone() if tuple(example.shape) == tuple(shape) else torch.zeros(shape, dtype=dtype))
            else:
                out.append(torch.randint(lo_hi[0], lo_hi[1] + 1, shape, generator=g, dtype=dtype))
        elif family == "normal":
            out.append(torch.randn(shape, generator=g).to(dtype))
        elif family == "uniform":
            out.append((torch.rand(shape, generator=g) * 2 - 1).to(dtype))
        elif family == "positive":
            out.append(torch.rand(shape, generator=g).to(dtype))
        elif family == "zeros":
            out.append(torch.zeros(shape, dtype=dtype))
        else:
            out.append((torch.randn(shape, generator=g) * LARGE).to(dtype))
    return out


def _structured(spec) -> bool:
    """True for a sample that is not a flat list of tensors/shapes: a ``refitcore.Inputs``, or a
    sequence holding None, Python scalars, dicts or nested containers."""
    import torch

    if isinstance(spec, Inputs):
        return True
    if isinstance(spec, (torch.Tensor, torch.Size)) or not isinstance(spec, (tuple, list)):
        return False
    if all(isinstance(d, int) and not isinstance(d, bool) for d in spec):
        return False   # one shape
    return not all(isinstance(s, (torch.Tensor, torch.Size)) or (
        isinstance(s, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, bool) for d in s))
        for s in spec)


def _structured_inputs(spec, families, int_high) -> st.SearchStrategy:
    """Samples shaped like a structured example (:func:`inputs`): tensors redrawn leaf by leaf,
    every other leaf (None, bool, numbers, strings) kept; the same container types come back."""
    import torch
    import torch.utils._pytree as pytree

    call = spec if isinstance(spec, Inputs) else None
    tree = (call.args, call.kwargs) if call is not None else tuple(spec)
    leaves, treespec = pytree.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    check_argument(bool(where), f"inputs(spec): the example {spec!r} holds no tensor to draw; give an example "
                                f"with at least one tensor")
    specs = [(tuple(leaves[i].shape), leaves[i].dtype, leaves[i]) for i in where]

    def make(seed: int, family: str):
        drawn = _input_tensors(specs, [s for s, _, _ in specs], seed, family, int_high)
        new = list(leaves)
        for i, t in zip(where, drawn):
            new[i] = t
        text = f"inputs(seed={seed}, family={family!r})"
        out = pytree.tree_unflatten(new, treespec)
        return InputCall(out[0], out[1], text) if call is not None else InputSample(out, text)

    return st.builds(make, st.integers(0, SEED_MAX), st.sampled_from(tuple(families)))


def boundary_samples(spec, profiles, *, seed: int = 0, int_high: int | None = None) -> list:
    """Samples at every profile's min and max shapes (normal values from ``seed``): a property test
    checks them in every example, next to the example input (opt) and a drawn shape."""
    import torch

    tensors = [spec] if isinstance(spec, torch.Tensor) else list(spec)
    profiles = as_profiles(tensors, profiles)
    specs = _specs(tensors)
    out, seen = [], []
    for p in range(len(profiles.profiles)):
        for shapes in (profiles.min_shapes(p), profiles.max_shapes(p)):
            if shapes in seen:
                continue
            seen.append(shapes)
            out.append(InputSample(_input_tensors(specs, shapes, seed, "normal", int_high),
                                   f"inputs(seed={seed}, family='normal', shapes={[list(s) for s in shapes]})"))
    return out


def inputs(spec, *, families: Sequence[str] = INPUT_FAMILIES, int_high: int | None = None,
           profiles=None) -> st.SearchStrategy[InputSample]:
    """Input samples shaped like ``spec``: a tensor, a shape, or a sequence of them (one per model
    input), or a structured example: a ``refitcore.Inputs`` (positional and keyword inputs) or a
    tuple holding ``None``, Python scalars, dicts or lists beside its tensors. Draws a seed and a
    value family (``normal``, ``uniform`` in [-1, 1], ``positive`` in [0, 1], ``zeros``, ``large``
    (normal x100)) for floating-point tensors. Integer tensors (token ids) are drawn inside the
    example tensor's observed ``[min, max]`` (kept when it has no elements; ``[0, 2)`` for a bare
    shape), or in ``[0, int_high)`` when ``int_high`` is given; bool tensors (masks), ``None`` and
    Python scalars are kept. A structured example gives samples of the same structure
    (:class:`InputCall`, a ``refitcore.Inputs``, for an ``Inputs``), checked at the example's shapes.

    ``profiles``: an engine's shape ranges (``engine.io.profiles``, or a ``dynamic_shapes`` spec keyed
    by input index): each sample then has shapes drawn inside them (:func:`profile_shapes`: min,
    opt, max or sizes in between)."""
    check_some_of("families", families, INPUT_FAMILIES)
    check_argument(int_high is None or int_high >= 1,
                   f"int_high={int_high!r}: give an integer >= 1 (integer inputs are drawn in [0, int_high))")
    if _structured(spec):
        check_argument(profiles is None, "inputs(spec, profiles=...): shape ranges need positional tensor inputs (as "
                                         "refitcore.compile's dynamic_shapes do); give a tensor or a tuple of tensors")
        return _structured_inputs(spec, families, int_high)
    specs = _specs(spec)
    if profiles is not None:
        import torch

        tensors = [spec] if isinstance(spec, torch.Tensor) else list(spec)
        profiles = as_profiles([t if isinstance(t, torch.Tensor) else torch.zeros(t) for t in tensors], profiles)
    shape_st = st.just([s for s, _, _ in specs]) if profiles is None else profile_shapes(profiles)

    def make(seed: int, family: str, shapes) -> InputSample:
        out = _input_tensors(specs, shapes, seed, family, int_high)
        return InputSample(out, f"inputs(seed={seed}, family={family!r}, shapes={[list(s) for s in shapes]})")

    return st.builds(make, st.integers(0, SEED_MAX), st.sampled_from(tuple(families)), shape_st)
