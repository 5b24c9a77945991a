"""An in-place refit either succeeds or leaves the engine exactly as it was: everything that can
fail (verification inputs, the eager reference model's state_dict) is checked before the engine
is touched (refitcore.refitting.validate)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.capture.eager import EagerModelError
from refitcore.refitting.validate import check_samples, eager_weights
from tests.conftest import bit_identical, outputs

MODEL = "conv_bias_bn"


@pytest.fixture
def own(compiled):
    """A private in-place target: a copy of the session's compiled engine (which must not change)."""
    def get(name: str):
        c = compiled(name)
        return c, c.engine.clone()
    return get


@pytest.mark.parametrize("bad, message", [
    (lambda x: torch.randn(1, 3, 32, 32), "shape [1, 3, 32, 32] where the engine takes [1, 3, 64, 64]"),
    (lambda x: x.double(), "dtype torch.float64 where the engine takes float32"),
    (lambda x: (x, x), "2 input(s) where the engine takes 1"),
    (lambda x: [x, x[:, :2]], "sample 1, input 0 ('x'): shape [1, 2, 64, 64]"),
], ids=["shape", "dtype", "count", "second_sample"])
def test_wrong_verify_inputs_are_refused_before_the_engine_changes(own, bad, message):
    c, engine = own(MODEL)
    before = outputs(engine, c.x)
    with pytest.raises(ValueError) as info:
        refitcore.refit(engine, c.fresh(3).state_dict(), verify_inputs=bad(c.x), in_place=True)
    assert message in str(info.value) and "nothing was refitted" in str(info.value)
    assert bit_identical(before, outputs(engine, c.x))


def test_missing_num_batches_tracked_verifies_in_place(own):
    c, engine = own(MODEL)
    new = c.fresh(3)
    state = {k: v for k, v in new.state_dict().items() if not k.endswith("num_batches_tracked")}
    result = refitcore.refit(engine, state, verify_inputs=[c.x], in_place=True)
    assert result.ok and result.engine is engine, str(result)
    assert torch.allclose(engine(c.x), new(c.x), rtol=1e-4, atol=1e-4)


def test_an_eager_model_that_cannot_load_is_found_before_the_engine_changes(own):
    """A wrong value for a key the engine never reads passes the mapping but not load_state_dict."""
    c, engine = own(MODEL)
    before = outputs(engine, c.x)
    state = c.fresh(3).state_dict()
    state["bn.num_batches_tracked"] = torch.zeros(3)
    with pytest.raises(EagerModelError, match="num_batches_tracked"):
        refitcore.refit(engine, state, verify_inputs=[c.x], in_place=True)
    assert bit_identical(before, outputs(engine, c.x))


def test_no_eager_model_at_all_is_found_before_the_engine_changes(compiled, tmp_path):
    """A loaded engine without a model factory cannot build the eager reference: say so first."""
    c = compiled(MODEL)
    c.engine.save(tmp_path / "m.trtrefit")
    engine = refitcore.load(tmp_path / "m.trtrefit")
    before = outputs(engine, c.x)
    with pytest.raises(ValueError, match="pass the model"):
        refitcore.refit(engine, c.fresh(3).state_dict(), verify_inputs=[c.x], in_place=True)
    assert bit_identical(before, outputs(engine, c.x))


@pytest.mark.parametrize("keep", ["fc1.weight", "fc2.weight"])
def test_tied_weight_under_one_name_verifies_in_place(own, keep):
    c, engine = own("tied_mlp")
    new = c.fresh(2)
    state = {k: v for k, v in new.state_dict().items() if k not in ("fc1.weight", "fc2.weight") or k == keep}
    result = refitcore.refit(engine, state, verify_inputs=[c.x], in_place=True)
    assert result.ok and result.engine is engine, str(result)
    assert torch.allclose(engine(c.x), new(c.x), rtol=1e-4, atol=1e-4)


def test_eager_weights_fill_only_what_the_engine_never_reads(compiled):
    c = compiled("tied_mlp")
    wm, keys = c.engine.weight_map, c.engine.state_keys
    new = c.fresh(2).state_dict()
    weights, keep = eager_weights(wm, {k: v for k, v in new.items() if k != "fc2.weight"}, keys)
    assert weights["fc2.weight"] is weights["fc1.weight"] and keep is False
    with pytest.raises(EagerModelError, match=r"lack \['norm.weight'\]"):
        eager_weights(wm, {k: v for k, v in new.items() if k != "norm.weight"}, keys)
    bn = compiled(MODEL)
    state = {k: v for k, v in bn.fresh(3).state_dict().items() if "num_batches" not in k}
    weights, keep = eager_weights(bn.engine.weight_map, state, bn.engine.state_keys)
    assert keep is True and "bn.num_batches_tracked" not in weights
    # without the compiled model's key list nothing may be kept: the eager loader names what is missing
    assert eager_weights(bn.engine.weight_map, state, ())[1] is False


def test_check_samples_accepts_the_forms_verify_takes(compiled):
    c = compiled(MODEL)
    io = c.engine.io
    assert check_samples(io, c.x) == [(c.x,)]
    assert check_samples(io, (c.x,)) == [(c.x,)]
    assert check_samples(io, [c.x, (c.x,)]) == [(c.x,), (c.x,)]
    with pytest.raises(ValueError, match="no samples"):
        check_samples(io, [])
    with pytest.raises(ValueError, match="expected a torch.Tensor, got ndarray"):
        check_samples(io, [(c.x.numpy(),)])


# ----------------------------------------------------------------------------- non-finite constants

class _MaskedSoftmax(nn.Module):
    """Linear -> masked_fill(pad, -inf) -> softmax: the ``-inf`` is a literal of the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, pad):
        return torch.softmax(self.fc(x).masked_fill(pad, float("-inf")), -1)


def _pad_inputs():
    pad = torch.zeros(2, 3, 4, dtype=torch.bool)
    pad[..., -1] = True
    return torch.randn(2, 3, 4), pad


def test_a_literal_minus_inf_is_structure_and_refits_through_both_paths():
    x, pad = _pad_inputs()
    engine = refitcore.compile(_MaskedSoftmax().eval(), (x, pad), backend="reference")
    literal = [n for n in engine.weight_map.constant_weights
               if not np.isfinite(engine.weight_map.constants[engine.weight_map[n].inputs["x"]["const"]]).all()]
    assert literal, engine.weight_map.sources
    new = _MaskedSoftmax().eval()
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, new, path=path, verify_inputs=(x, pad), audit=True)
        assert result, str(result)
    # A checkpoint never holds it: the literal keeps its value.
    result = refitcore.refit(engine, new.state_dict(), path="cached", verify_inputs=(x, pad))
    assert result, str(result)
    assert np.isneginf(refitcore.cached_mapping(engine.weight_map, new)[literal[0]]).all()


class _MaskedLogits(nn.Module):
    """Linear -> masked_fill(pad, -inf): the output itself holds eager's -inf at the padded positions."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, pad):
        return self.fc(x).masked_fill(pad, float("-inf"))


def test_an_output_with_eager_s_own_minus_inf_verifies_through_both_paths():
    x, pad = _pad_inputs()
    engine = refitcore.compile(_MaskedLogits().eval(), (x, pad), backend="reference")
    assert torch.isneginf(engine(x, pad)[pad]).all()
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, _MaskedLogits().eval(), path=path, verify_inputs=(x, pad), audit=True)
        assert result, str(result)


class _BiasPlusMask(nn.Module):
    """A weight derived from the state_dict that the graph adds a ``-inf`` constant to."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.randn(4))
        self.register_buffer("mask", torch.tensor([0.0, 0.0, 0.0, float("-inf")]), persistent=False)

    def forward(self, x):
        return torch.softmax(x + (self.b + self.mask), -1)


def test_a_state_dict_weight_made_non_finite_by_a_constant_says_so():
    x = torch.randn(2, 4)
    engine = refitcore.compile(_BiasPlusMask().eval(), (x,), backend="reference")
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.cached_mapping(engine.weight_map, _BiasPlusMask().eval())
    text = str(info.value)
    assert "is derived from the state_dict ('b') and must be finite" in text
    assert "constant(s) of the graph holding NaN/Inf" in text and "-inf" in text
    assert "overflows" not in text
    with pytest.raises(refitcore.WeightMappingError, match="in a weight derived from the state_dict"):
        refitcore.refit(engine, _BiasPlusMask().eval(), path="fallback")
