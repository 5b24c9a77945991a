"""``pytest_trtrefit.strategies.inputs`` on structured examples, and the plugin's sample handling."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from pytest_trtrefit.checks import as_samples, sample_tensors
from pytest_trtrefit.engines import input_spec
from pytest_trtrefit.strategies import InputCall, InputSample, inputs
from refitcore import Inputs

IDS = torch.tensor([[5, 17, 99, 3, 42, 8]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0]])
BOOL_MASK = torch.tensor([[True, False, True]])
EXAMPLE = Inputs(IDS, torch.randn(1, 4), attention_mask=MASK, token_type_ids=None, flag=True,
                 extra={"m": BOOL_MASK, "n": 2})
FAST = settings(max_examples=25, database=None, deadline=None)


@FAST
@given(sample=inputs(EXAMPLE))
def test_structured_samples_redraw_tensors_and_keep_the_rest(sample):
    assert isinstance(sample, InputCall) and isinstance(sample, Inputs)
    ids, x = sample.args
    assert ids.dtype == torch.long and ids.shape == IDS.shape
    assert int(ids.min()) >= 3 and int(ids.max()) <= 99          # the example's observed [min, max]
    assert x.dtype == torch.float32 and x.shape == (1, 4)
    assert sample.kwargs["token_type_ids"] is None and sample.kwargs["flag"] is True
    assert torch.equal(sample.kwargs["extra"]["m"], BOOL_MASK) and sample.kwargs["extra"]["n"] == 2
    assert set(sample.kwargs["attention_mask"].unique().tolist()) <= {0, 1}
    assert repr(sample).startswith("inputs(seed=")


def test_token_ids_vary_across_draws():
    seen = set()

    @FAST
    @given(sample=inputs(Inputs(IDS)))
    def draw(sample):
        seen.add(tuple(sample.args[0].flatten().tolist()))

    draw()
    assert len(seen) > 1


@FAST
@given(sample=inputs((torch.randn(2, 3), None, 0.5)))
def test_a_tuple_with_constants_stays_a_tuple(sample):
    assert isinstance(sample, InputSample) and len(sample) == 3
    assert sample[0].shape == (2, 3) and sample[1] is None and sample[2] == 0.5


@FAST
@given(sample=inputs([IDS], int_high=4))
def test_int_high_still_bounds_integer_inputs(sample):
    assert int(sample[0].min()) >= 0 and int(sample[0].max()) < 4


def test_structured_examples_refuse_shape_ranges_and_need_a_tensor():
    with pytest.raises(ValueError, match="shape ranges need positional tensor inputs"):
        inputs(EXAMPLE, profiles={0: {1: (2, 8)}})
    with pytest.raises(ValueError, match="holds no tensor"):
        inputs(Inputs(None, flag=True)).example()


def test_samples_keep_keyword_inputs_and_the_cache_key_tells_structures_apart():
    call = Inputs(IDS, attention_mask=MASK)
    assert as_samples(call) == [call] and as_samples([IDS, call])[1] is call
    assert as_samples((IDS, MASK)) == [(IDS, MASK)]
    assert [t.shape for t in sample_tensors(call)] == [IDS.shape, MASK.shape]
    positional = input_spec((IDS, MASK))
    keyword = input_spec(call)
    assert positional != keyword and keyword[:2] == positional
    assert input_spec(Inputs(IDS, attention_mask=MASK, flag=True)) != input_spec(Inputs(IDS, attention_mask=MASK,
                                                                                         flag=False))
