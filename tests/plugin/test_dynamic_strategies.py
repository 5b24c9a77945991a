"""Input strategies over shape ranges: every drawn shape lies inside the profile, the range's
corners (min, opt, max) are drawn, shared dimensions share a size."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from pytest_trtrefit.strategies import boundary_samples, inputs, profile_shapes
from refitcore.capture.shapes import DimRange, resolve_dynamic_shapes


class Pair(torch.nn.Module):
    def forward(self, ids, mask):
        return ids * mask


EXAMPLE = (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
SEQ = DimRange(4, 32, name="seq")
_, PROFILES = resolve_dynamic_shapes(Pair(), EXAMPLE, {0: {1: SEQ}, 1: {1: SEQ}})


@settings(max_examples=30, database=None)
@given(sample=inputs(list(EXAMPLE), profiles=PROFILES))
def test_drawn_inputs_lie_inside_the_profile_with_shared_lengths(sample):
    ids, mask = sample
    assert ids.shape[0] == 2 and 4 <= ids.shape[1] <= 32
    assert mask.shape == ids.shape   # one name, one size
    assert ids.dtype == torch.long and "shapes=" in repr(sample)


def test_corners_are_drawn():
    seen = set()

    @settings(max_examples=60, database=None)
    @given(shapes=profile_shapes(PROFILES))
    def collect(shapes):
        seen.add(shapes[0][1])

    collect()
    assert {4, 8, 32} <= seen and len(seen) > 3


def test_boundary_samples_are_min_and_max():
    samples = boundary_samples(list(EXAMPLE), PROFILES)
    assert [tuple(s[0].shape) for s in samples] == [(2, 4), (2, 32)]
    assert all(s[0].shape == s[1].shape for s in samples)


def test_a_dynamic_shapes_spec_works_in_place_of_profiles():
    x = torch.zeros(2, 3)

    @settings(max_examples=20, database=None)
    @given(sample=inputs(x, profiles={0: {0: (1, 5)}}), data=st.data())
    def check(sample, data):
        assert 1 <= sample[0].shape[0] <= 5 and sample[0].shape[1] == 3

    check()
