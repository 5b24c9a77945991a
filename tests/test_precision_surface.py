"""Reduced-precision engines (float16, bfloat16): what validation refuses before an engine is touched,
the per-precision tolerances, the options that choose a precision, and the strategies' special values.

Weight maps here are made by hand (engine dtype in ``WeightSource.dtype``), so each check is shown on
the smallest map that exercises it; ``refitcore.cached_mapping`` is the step that refuses.
"""
from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import refitcore
from pytest_trtrefit.config import RefitConfig
from pytest_trtrefit.declarative import DeclarationError, parse_specs
from pytest_trtrefit.service import RefitSession
from pytest_trtrefit.strategies import InvalidStrategyArgument, state_dicts, weight_set
from refitcore.conversion.recipes import apply_recipe, evaluate_operand
from refitcore.conversion.weight_map import WeightMap, WeightSource
from refitcore.options import DEFAULT_ATOL, DEFAULT_RTOL, PRECISION_TOLERANCES, parse_precision, tolerances_for
from refitcore.refitting.validate import precision_problems

pytest_plugins = ["pytester"]


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
        out += precision_problems(wm, name, exact, refitcore.dtypes.round_to(exact, getattr(torch, src.dtype)), state)
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


def test_a_subnormal_is_refused_only_where_losing_it_costs_more_than_flush_ulps_of_the_largest_value():
    # 5.5e-5 is subnormal in float16. Next to values of 0.05, losing it costs 1.1 eps * 0.05: accepted.
    # Next to values of 2e-3 it costs 28 eps * 2e-3 (more than FLUSH_ULPS = 16): refused.
    for top, refused in ((0.05, False), (2e-3, True)):
        w = torch.full((2, 3), top)
        w[0, 0] = 5.5e-5
        problems = _problems(_copy_map("float16"), {"fc.weight": w})
        assert bool(problems) == refused, (top, problems)
    assert "1 value(s) below float16's smallest normal" in problems[0]


def test_a_fold_that_flushes_although_its_inputs_are_normal_says_the_recipe_made_it_small():
    # gamma 1e-3 and var 1e4: factor 1e-5, kernel values 5e-6 and 2.5e-6 (subnormal in float16).
    state = _fold_state(**{"bn.weight": [1e-3, 1e-3], "bn.running_var": [1e4, 1e4]})
    text = _refused(_fold_map("float16"), state)
    assert "engine weight 'conv/conv2d KERNEL' (float16)" in text
    assert "the bn_fold_kernel result is that small although its inputs are not" in text


def test_bfloat16_overflow_of_a_fold_is_refused():
    # bfloat16 has float32's range: only a fold can overflow it, here 1e38 * 20 / sqrt(1 + eps).
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.cached_mapping(_fold_map("bfloat16"), _fold_state(**{"conv.weight": [[[[1e38]]], [[[0.5]]]],
                                                                       "bn.weight": [20.0, 1.0]}))
    assert "'conv/conv2d KERNEL'" in str(info.value) and "'conv.weight'" in str(info.value)


def test_float32_mask_sentinel_in_a_weight_becomes_bfloat16_s_own():
    # 3.4e38 (float32's finfo.max) is above bfloat16's largest finite value (~3.39e38): a mask's
    # sentinel, not a number (refitcore.dtypes.SENTINEL_MAGNITUDE), stored as bfloat16's own finfo.max.
    w = torch.zeros(2, 3)
    w[0, 1] = torch.finfo(torch.float32).max
    w[1, 0] = -3.0e38
    assert _problems(_copy_map("bfloat16"), {"fc.weight": w}) == []
    (got,) = refitcore.cached_mapping(_copy_map("bfloat16"), {"fc.weight": w}).values()
    got = refitcore.dtypes.as_torch(got).float()
    assert got[0, 1] == torch.finfo(torch.bfloat16).max and got[1, 0] == torch.finfo(torch.bfloat16).min


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


# ----------------------------------------------------------------------------- tolerances per precision

def test_each_precision_has_tolerances_no_tighter_than_assert_close_for_one_op():
    # torch.testing.assert_close's per-dtype defaults hold for ONE op; a network rounds at every layer.
    one_op = {"fp16": (1e-3, 1e-5), "bf16": (1.6e-2, 1e-5)}
    for precision, (rtol, atol) in one_op.items():
        got = PRECISION_TOLERANCES[precision]
        assert got[0] >= rtol and got[1] >= atol
    assert PRECISION_TOLERANCES["fp32"] == (DEFAULT_RTOL, DEFAULT_ATOL)
    assert PRECISION_TOLERANCES["bf16"][0] > PRECISION_TOLERANCES["fp16"][0]   # bf16 keeps 8 bits, fp16 11


def test_tolerances_come_from_the_precision_unless_given():
    assert tolerances_for("fp16") == PRECISION_TOLERANCES["fp16"]
    assert tolerances_for("bf16", rtol=1e-3) == (1e-3, PRECISION_TOLERANCES["bf16"][1])
    assert tolerances_for("fp16", 0.0, 0.0) == (0.0, 0.0)          # 0 is a given value, not "unset"
    assert tolerances_for(None) == tolerances_for("fp32") == (DEFAULT_RTOL, DEFAULT_ATOL)


@pytest.mark.parametrize("text, name", [("fp16", "fp16"), ("float16", "fp16"), ("HALF", "fp16"), ("bf16", "bf16"),
                                        ("bfloat16", "bf16"), (" float32 ", "fp32"), ("fp32", "fp32")])
def test_parse_precision_accepts_both_spellings(text, name):
    assert parse_precision(text) == name


def test_parse_precision_refuses_what_it_cannot_build():
    with pytest.raises(argparse.ArgumentTypeError, match="'int8' is not a precision; choose one of fp32, fp16, bf16"):
        parse_precision("int8")


def test_plugin_config_takes_the_user_s_tolerances_and_otherwise_the_engine_precision_s():
    fp16, bf16 = PRECISION_TOLERANCES["fp16"], PRECISION_TOLERANCES["bf16"]
    assert RefitConfig().tolerances("fp16") == fp16
    cfg = RefitConfig(precision="bf16", rtol=bf16[0], atol=bf16[1], sources={"trt_refit_rtol": "default"})
    assert cfg.tolerances() == bf16 and cfg.tolerances("fp32") == (DEFAULT_RTOL, DEFAULT_ATOL)
    given = RefitConfig(rtol=1e-3, sources={"trt_refit_rtol": "cli", "trt_refit_atol": "default"})
    assert given.tolerances("fp16") == (1e-3, fp16[1])


# ----------------------------------------------------------------------------- options: plugin, gate, CLI

class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


_X = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def compile_calls(monkeypatch):
    """refitcore.compile recording the precision each call asked for ('fp32' where it asked for none)."""
    real, seen = refitcore.compile, []

    def fake(model, *args, precision: str = "fp32", **kwargs):
        seen.append(precision)
        return real(model, *args, precision=precision, **kwargs)

    monkeypatch.setattr(refitcore, "compile", fake)
    return seen


def test_a_check_compiles_in_the_precision_asked_for_and_uses_its_tolerances(compile_calls):
    session = RefitSession(RefitConfig(enabled=True, backend="reference", paths=("cached",)))
    state = _Lin().state_dict()
    outcome = session.check(_Lin, state, _X, precision="float16")
    assert compile_calls == ["fp16"] and (outcome.rtol, outcome.atol) == PRECISION_TOLERANCES["fp16"]
    assert session.check(_Lin, state, _X, precision="fp16", rtol=1e-3).rtol == 1e-3
    assert compile_calls == ["fp16"]                                  # the same engine: compiled once
    plain = session.check(_Lin, state, _X)                            # the session's precision: fp32
    assert compile_calls == ["fp16", "fp32"] and (plain.rtol, plain.atol) == (DEFAULT_RTOL, DEFAULT_ATOL)
    with pytest.raises(ValueError, match="precision='fp8'"):
        session.check(_Lin, state, _X, precision="fp8")


def test_the_session_precision_and_tolerances_given_by_the_user_win(compile_calls):
    cfg = RefitConfig(enabled=True, backend="reference", paths=("cached",), precision="bf16", atol=1e-3,
                      sources={"trt_refit_atol": "ini"})
    outcome = RefitSession(cfg).check(_Lin, _Lin().state_dict(), _X)
    assert compile_calls == ["bf16"] and (outcome.rtol, outcome.atol) == (PRECISION_TOLERANCES["bf16"][0], 1e-3)


def test_a_declaration_takes_a_precision_and_refuses_an_unknown_one():
    spec = parse_specs({"lin": (_Lin, _X, {"precision": "bfloat16"})}, "conftest.py")[0]
    assert spec.precision == "bf16" and spec.compile_options == {}
    assert parse_specs({"lin": (_Lin, _X)}, "conftest.py")[0].precision is None
    with pytest.raises(DeclarationError, match="model 'lin': precision: 'fp64' is not a precision"):
        parse_specs({"lin": (_Lin, _X, {"precision": "fp64"})}, "conftest.py")


def test_the_gate_takes_the_bundle_s_precision_tolerances_unless_given():
    engine = refitcore.compile(_Lin().eval(), (_X,), backend="reference", precision="fp16")
    state = _Lin().state_dict()
    report = refitcore.gate(engine, state, [(_X,)], paths="cached", model=_Lin)
    assert report, str(report)
    assert (report.to_json()["rtol"], report.to_json()["atol"]) == PRECISION_TOLERANCES["fp16"]
    given = refitcore.gate(engine, state, [(_X,)], paths="cached", model=_Lin, rtol=1e-3)
    assert (given.to_json()["rtol"], given.to_json()["atol"]) == (1e-3, PRECISION_TOLERANCES["fp16"][1])


@pytest.mark.parametrize("dtype, precision", [("float16", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32")])
def test_cli_compile_dtype_is_compile_s_precision(monkeypatch, tmp_path, capsys, dtype, precision):
    import refitcore.compiler.native as native
    from refitcore.cli import main as cli

    seen = []

    def fake(model, inputs, *, precision: str = "fp32", **kwargs):
        seen.append((precision, [x.dtype for x in inputs]))
        raise refitcore.BackendUnavailableError("not built in this test")

    monkeypatch.setattr(native, "compile", fake)
    code = cli.main(["compile", "tests.cli_models:small_net", "--input", "1x3x32x32", "--backend", "reference",
                     "--dtype", dtype, "-q", "-o", str(tmp_path / "m.trtrefit")])
    assert code == 2 and "not built in this test" in capsys.readouterr().err
    assert seen == [(precision, [torch.float32])]      # the model and its inputs keep their own dtype


def test_cli_gate_tolerances_default_to_none_so_the_bundle_s_precision_decides():
    from refitcore.cli import main as cli

    args = cli.build_parser().parse_args(["gate", "b", "c", "--inputs", "random:1"])
    assert args.rtol is None and args.atol is None


# ----------------------------------------------------------------------------- strategies at the dtype's limits

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_max_puts_the_largest_finite_value_in_the_tensor(precision, dtype):
    w = weight_set(_Net(), seed=3, specials=[("fc.weight", "dtype_max")], precision=precision)["fc.weight"]
    base = weight_set(_Net(), seed=3)["fc.weight"]
    at = int(base.abs().argmax())
    assert float(w.reshape(-1)[at]) == torch.finfo(dtype).max * (1 if base.reshape(-1)[at] > 0 else -1)
    assert torch.equal(w.reshape(-1)[torch.arange(w.numel()) != at], base.reshape(-1)[torch.arange(w.numel()) != at])
    # The largest finite value fits the engine dtype: the range validation accepts it ...
    assert _problems(_copy_map(dtype_name(dtype)), {"fc.weight": w}) == []
    # ... and a finite float32 just past its rounding boundary (max + half an ulp) does not: in float16
    # an overflow; in bfloat16 (whose largest value is within 2**127 of float32's) a mask sentinel,
    # which is stored as bfloat16's largest value (refitcore.dtypes.SENTINEL_MAGNITUDE).
    over = w.clone()
    over.reshape(-1)[at] = over.reshape(-1)[at] * (1 + 0.3 * torch.finfo(dtype).eps)
    assert bool(torch.isfinite(over).all())
    said = " ".join(_problems(_copy_map(dtype_name(dtype)), {"fc.weight": over}))
    if dtype == torch.float16:
        assert "value(s) overflow float16" in said
    else:
        assert said == "" and torch.equal(refitcore.dtypes.round_to(over, dtype), w.to(dtype))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_min_normal_scales_the_tensor_to_the_bottom_of_the_normal_range(precision, dtype):
    w = weight_set(_Net(), seed=1, specials=[("fc.weight", "dtype_min_normal")], precision=precision)["fc.weight"]
    assert float(w.abs().max()) == torch.finfo(dtype).tiny
    problems = _problems(_copy_map(dtype_name(dtype)), {"fc.weight": w})
    assert problems and f"below {dtype_name(dtype)}'s smallest normal" in problems[0]


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_subnormal_draws_exact_subnormals_of_the_engine_dtype(precision, dtype):
    w = weight_set(_Net(), seed=2, specials=[("out.weight", "dtype_subnormal")], precision=precision)["out.weight"]
    info = torch.finfo(dtype)
    sub = (w != 0) & (w.abs() < info.tiny)
    assert bool(sub.any())
    assert torch.equal(w[sub].to(dtype).float(), w[sub])            # exactly representable: no rounding
    assert float(w[sub].abs().min()) >= info.tiny * info.eps         # not below the smallest subnormal
    # Beneath the weight's own resolution: the range validation lets them through.
    assert _problems(_copy_map(dtype_name(dtype), (2, 2)), {"fc.weight": w}) == []


def test_the_default_specials_stay_inside_every_dtype_and_precision_specials_are_opt_in():
    from pytest_trtrefit.strategies import ALL_SPECIALS, PRECISION_SPECIALS, SPECIALS, special_targets

    assert not set(PRECISION_SPECIALS) & set(SPECIALS) and ALL_SPECIALS == SPECIALS + PRECISION_SPECIALS
    assert ("fc.weight", "dtype_max") in special_targets(_Net(), PRECISION_SPECIALS)
    assert not any(kind in PRECISION_SPECIALS for _, kind in special_targets(_Net()))


def test_precision_strategies_validate_their_arguments_up_front():
    with pytest.raises(InvalidStrategyArgument, match="precision='fp8': choose one of"):
        state_dicts(_Net(), precision="fp8")
    with pytest.raises(InvalidStrategyArgument, match="precision='int8'"):
        weight_set(_Net(), precision="int8")
    with pytest.raises(InvalidStrategyArgument, match="unknown"):
        state_dicts(_Net(), specials=["dtype_huge"])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(ws=state_dicts(_Net(), specials=("dtype_max", "dtype_subnormal"), precision="fp16", max_specials=2))
def test_drawn_limit_values_are_accepted_by_a_float16_engine_s_validation(ws):
    assert "precision='fp16'" in repr(ws)
    for key in ("fc.weight", "out.weight"):
        wm = _copy_map("float16", tuple(ws[key].shape))
        assert _problems(wm, {"fc.weight": ws[key]}) == [], repr(ws)


_CONFIG_TEST = '''
def test_config(trt_refit):
    c = trt_refit.config
    print("RESOLVED", c.precision, c.rtol, c.atol, c.sources["trt_refit_precision"])
'''


@pytest.fixture
def keep_hypothesis_seed():
    """In-process pytest runs set Hypothesis's global seed (as --hypothesis-seed does); restore it."""
    from hypothesis import core

    saved = core.global_force_seed
    yield
    core.global_force_seed = saved


def test_the_precision_option_has_an_ini_mirror_and_sets_the_session_s_tolerances(pytester, keep_hypothesis_seed):
    pytester.makeini("""
        [pytest]
        trt_refit = true
        trt_refit_backend = reference
        trt_refit_precision = bfloat16
    """)
    pytester.makepyfile(test_cfg=_CONFIG_TEST)
    result = pytester.runpytest_inprocess("-s", "--trt-refit-seed=3")
    result.assert_outcomes(passed=1)
    rtol, atol = PRECISION_TOLERANCES["bf16"]
    result.stdout.fnmatch_lines([f"trt-refit: backend=reference, *, precision=bf16, rtol={rtol:g}, atol={atol:g}, *",
                                 f"*RESOLVED bf16 {rtol} {atol} ini"])
    result = pytester.runpytest_inprocess("-s", "--trt-refit-precision=fp16", "--trt-refit-rtol=1e-3")
    result.stdout.fnmatch_lines([f"*RESOLVED fp16 0.001 {PRECISION_TOLERANCES['fp16'][1]} cli"])
    result = pytester.runpytest_inprocess("--trt-refit-precision=fp8")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*'fp8' is not a precision; choose one of fp32, fp16, bf16*"])


def test_the_reproduce_line_repeats_the_precision_and_only_tolerances_the_user_changed():
    from pytest_trtrefit.outputs import reproduce_command

    fp16 = PRECISION_TOLERANCES["fp16"]
    line = reproduce_command(RefitConfig(precision="fp16", rtol=fp16[0], atol=fp16[1], seed=5), "t.py::x")
    assert line == "pytest --trt-refit --trt-refit-seed=5 --trt-refit-precision=fp16 t.py::x"
    changed = reproduce_command(RefitConfig(precision="fp16", rtol=1e-3, atol=fp16[1], seed=5), "t.py::x")
    assert "--trt-refit-rtol=0.001" in changed and "--trt-refit-atol" not in changed
