"""Input shapes inside an engine's optimization profiles: :func:`profile_shapes`."""
from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["profile_shapes", "as_profiles"]


def as_profiles(spec_tensors, profiles):
    """``profiles`` as a :class:`refitcore.capture.shapes.ShapeProfiles` (given one, or a ``dynamic_shapes``
    spec keyed by input index over the example tensors ``spec_tensors``); None stays None."""
    from refitcore.capture.shapes import ShapeProfiles, resolve_dynamic_shapes

    if profiles is None or isinstance(profiles, ShapeProfiles):
        return profiles
    import torch

    return resolve_dynamic_shapes(torch.nn.Module(), spec_tensors, profiles)[1]


def profile_shapes(profiles) -> st.SearchStrategy[list]:
    """Input shapes inside an engine's optimization profiles (``engine.io.profiles``): a profile's
    min, opt or max (drawn first, and where shrinking ends), or sizes drawn inside its ranges;
    dimensions that share a name get one size."""
    from refitcore.capture.shapes import draw_shapes

    corners = []
    for p in range(len(profiles.profiles)):
        for shapes in (profiles.min_shapes(p), profiles.opt_shapes(p), profiles.max_shapes(p)):
            if shapes not in corners:
                corners.append(shapes)

    @st.composite
    def inside(draw):
        p = draw(st.integers(0, len(profiles.profiles) - 1))
        return draw_shapes(profiles, lambda lo, hi: draw(st.integers(lo, hi)), profile=p)

    return st.one_of(st.sampled_from(corners), inside())
