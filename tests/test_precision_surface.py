"""Reduced-precision engines (float16, bfloat16): what validation refuses before an engine is touched,
the per-precision tolerances, the options that choose a precision, and the strategies' special values.

Weight maps here are made by hand (engine dtype in ``WeightSource.dtype``), so each check is shown on
the smallest map that exercises it; ``refitcore.cached_mapping`` is the step that refuses.
"""
from __future__ import annotations

import pytest
import torch

import refitcore
from refitcore.conversion.recipes import apply_recipe, evaluate_operand
from refitcore.conversion.weight_map import WeightMap, WeightSource
from refitcore.refitting.validate import precision_problems


def _copy_map(dtype: str, shape=(2, 3)) -> WeightMap:
    wm = WeightMap()
    wm.sources["fc/linear KERNEL"] = WeightSource("copy", {"x": {"key": "fc.weight"}}, {}, tuple(shape), dtype)
    wm.key_specs = {"fc.weight": [list(shape), "float32"]}
    return wm


def _fold_map(dtype: str) -> WeightMap:
    """conv (2 out channels, 1x1) followed by BatchNorm, folded into the kernel and the bias."""
    wm = WeightMap()
    bn = {"gamma": {"key": "bn.weight"}, "var": {"key": "bn.running_var"}}
    wm.sources["conv/conv2d KERNEL"] = WeightSource("bn_fold_kernel", {"weight": {"key": "conv.weight"}, **bn},
                                                    {"eps": 1e-5}, (2, 1, 1, 1), dtype)
    wm.sources["conv/conv2d BIAS"] = WeightSource("bn_fold_bias", {"bias": None, "beta": {"key": "bn.bias"},
                                                                   "mean": {"key": "bn.running_mean"}, **bn},
                                                  {"eps": 1e-5}, (2,), dtype)
    wm.key_specs = {k: [[2, 1, 1, 1] if k == "conv.weight" else [2], "float32"]
                    for k in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")}
    return wm


def _fold_state(**changes) -> dict[str, torch.Tensor]:
    state = {"conv.weight": torch.tensor([[[[0.5]]], [[[-0.25]]]]), "bn.weight": torch.tensor([1.0, 2.0]),
             "bn.bias": torch.tensor([0.1, -0.1]), "bn.running_mean": torch.tensor([0.0, 0.5]),
             "bn.running_var": torch.tensor([1.0, 4.0])}
    state.update({k: torch.tensor(v) for k, v in changes.items()})
    return state


def _problems(wm: WeightMap, state) -> list[str]:
    """What :func:`precision_problems` says of every weight of ``wm`` (the recipes applied as the cached
    mapping applies them; used where the mapping itself cannot hand out the array: NumPy has no bfloat16)."""
    out = []
    for name, src in wm.sources.items():
        exact = apply_recipe(src.recipe, {k: evaluate_operand(v, state, {}) for k, v in src.inputs.items()},
                             src.params)
        out += precision_problems(wm, name, exact, exact.to(getattr(torch, src.dtype)), state)
    return out


def _refused(wm: WeightMap, state) -> str:
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.cached_mapping(wm, state)
    return str(info.value)


# ----------------------------------------------------------------------------- validation

def test_a_fine_tuned_weight_beyond_float16_is_refused_naming_key_weight_index_value_and_fix():
    w = torch.randn(2, 3) * 0.1
    w[1, 2] = 1e5
    text = _refused(_copy_map("float16"), {"fc.weight": w})
    assert "engine weight 'fc/linear KERNEL' (float16)" in text
    assert "first at [1, 2]: 100000 becomes inf" in text
    assert "state_dict key 'fc.weight' holds 100000 at [1, 2], beyond float16's largest finite value 65504" in text
    assert "rescale" in text and "keep this layer in float32" in text
    assert "np." not in text and "tensor(" not in text


def test_the_same_weight_fits_a_bfloat16_and_a_float32_engine():
    w = torch.randn(2, 3) * 0.1
    w[1, 2] = 1e5
    assert _problems(_copy_map("bfloat16"), {"fc.weight": w}) == []
    assert refitcore.cached_mapping(_copy_map("float32"), {"fc.weight": w})["fc/linear KERNEL"][1, 2] == 1e5


def test_the_largest_float16_values_are_accepted_and_the_first_that_rounds_to_inf_is_not():
    fits = torch.full((2, 3), 65519.0)         # rounds to 65504, the largest finite float16
    refitcore.cached_mapping(_copy_map("float16"), {"fc.weight": fits})
    over = torch.full((2, 3), 65520.0)         # rounds to inf
    assert "6 value(s) overflow float16" in _refused(_copy_map("float16"), {"fc.weight": over})


def test_a_batchnorm_fold_that_overflows_float16_although_its_inputs_fit_says_fold_in_float32():
    # Every input fits float16; gamma / sqrt(var + eps) = 3e4 / 0.0032 makes the kernel ~4.7e6.
    state = _fold_state(**{"bn.weight": [3e4, 1.0], "bn.running_var": [0.0, 1.0]})
    assert all(float(t.abs().max()) < 65504 for t in state.values())
    text = _refused(_fold_map("float16"), state)
    assert "engine weight 'conv/conv2d KERNEL' (float16) = bn_fold_kernel(...)" in text
    assert "first at [0, 0, 0, 0]" in text
    assert "overflows although every input fits float16" in text and "'bn.weight' in [1, 3e+04]" in text
    assert "fold in float32" in text
    # The same fold in a float32 engine is fine.
    refitcore.cached_mapping(_fold_map("float32"), state)


def test_a_weight_whose_every_value_is_below_float16_s_normal_range_is_refused():
    # A layer scale of 1e-6 (ConvNeXt's initial value): subnormal in float16, 3 of 11 bits left.
    text = _refused(_copy_map("float16"), {"fc.weight": torch.full((2, 3), 1e-6)})
    assert "6 value(s) below float16's smallest normal 6.104e-05 (0 rounding to 0)" in text
    assert "first at [0, 0]: 1e-06 becomes the subnormal" in text and "may flush to zero" in text
    assert "state_dict key(s) 'fc.weight' hold such values themselves" in text
    assert "use bfloat16" in text
    assert _problems(_copy_map("bfloat16"), {"fc.weight": torch.full((2, 3), 1e-6)}) == []


def test_a_weight_that_loses_all_its_bits_is_refused():
    text = _refused(_copy_map("float16"), {"fc.weight": torch.full((2, 3), 1e-8)})
    assert "(6 rounding to 0)" in text and "becomes 0 (all its bits lost)" in text


def test_tiny_values_beneath_the_tensor_s_own_resolution_are_accepted():
    # A typical weight: most values ~0.02, a few far below float16's smallest normal. They are below the
    # resolution the largest values leave (eps * max|w|), so rounding them to 0 costs nothing measurable.
    w = torch.randn(64, 64) * 0.02
    w[0, :8] = torch.tensor([1e-9, -3e-8, 2e-6, 5e-5, 0.0, 1e-7, -1e-6, 4e-5])
    refitcore.cached_mapping(_copy_map("float16", (64, 64)), {"fc.weight": w})


def test_a_fold_that_flushes_although_its_inputs_are_normal_says_the_recipe_made_it_small():
    # gamma 1e-3 and var 1e4: factor 1e-5, kernel values 5e-6 and 2.5e-6 (subnormal in float16).
    state = _fold_state(**{"bn.weight": [1e-3, 1e-3], "bn.running_var": [1e4, 1e4]})
    text = _refused(_fold_map("float16"), state)
    assert "engine weight 'conv/conv2d KERNEL' (float16)" in text
    assert "the bn_fold_kernel result is that small although its inputs are not" in text


def test_bfloat16_overflow_of_a_value_float32_holds_is_refused():
    # 3.4e38 is finite in float32 but above bfloat16's largest finite value (~3.39e38).
    w = torch.zeros(2, 3)
    w[0, 1] = 3.4e38
    text = _refused(_copy_map("bfloat16"), {"fc.weight": w})
    assert "engine weight 'fc/linear KERNEL' (bfloat16)" in text and "first at [0, 1]" in text
    assert "beyond bfloat16's largest finite value" in text


def test_bfloat16_flush_of_a_weight_at_the_bottom_of_float32_s_range_is_refused():
    text = _refused(_copy_map("bfloat16"), {"fc.weight": torch.full((2, 3), 1e-39)})
    assert "below bfloat16's smallest normal" in text


def test_a_wrong_dtype_range_check_would_be_seen():
    # The check is a function of (exact, rounded): handing it a rounding that lost nothing accepts,
    # the real float16 rounding refuses (the checker can fail).
    wm = _copy_map("float16")
    exact = torch.full((2, 3), 1e5)
    state = {"fc.weight": exact}
    assert precision_problems(wm, "fc/linear KERNEL", exact, exact.double(), state) == []
    assert precision_problems(wm, "fc/linear KERNEL", exact, exact.half(), state)


def test_a_literal_constant_is_structure_never_range_checked():
    wm = WeightMap()
    wm.sources["mask CONSTANT"] = WeightSource("constant", {"x": {"const": "c0"}}, {}, (2,), "float16")
    value = torch.tensor([1e5, float("-inf")])
    assert precision_problems(wm, "mask CONSTANT", value, value.half(), {}) == []


def test_a_nonfinite_fold_in_float32_still_says_it_is_derived_from_the_state_dict():
    state = _fold_state(**{"bn.weight": [3e38, 1.0], "bn.running_var": [1e-3, 1.0]})
    text = _refused(_fold_map("float16"), state)
    assert "is derived from the state_dict" in text and "overflows float32" in text
