"""fp16 and bf16 engines end to end, at the DEFAULT tolerances of each precision
(refitcore.options.PRECISION_TOLERANCES; docs/precision-tolerances.md): one function decides them
everywhere, planted mapping bugs are caught (by the exact audit, and by output verification where the
bug moves outputs beyond the precision's noise), overflowing weights are refused before the engine is
touched, a bf16 LLM-style safetensors checkpoint refits and verifies, and random weights give no
false failure."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.options import PRECISION_TOLERANCES
from refitcore.refitting.pipeline import run_refit
from refitcore.refitting.prepare import prepare_weights
from tests.models import ConvBn, randomize_batchnorm
from tests.test_precision_surface import keep_hypothesis_seed  # noqa: F401 - a fixture

pytest_plugins = ["pytester"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP32 = PRECISION_TOLERANCES["fp32"]


def conv_bn(seed: int = 0, eps: float = 1e-5) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(ConvBn(eps).eval(), seed)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _tolerances(verdict) -> set[tuple[float, float]]:
    return {(c.rtol, c.atol) for sample in verdict.checks for c in sample}


# -- one place decides the tolerances ----------------------------------------------------------------
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_every_entry_point_takes_the_engine_precisions_tolerances(precision):
    """verify, refit, run_refit and MutableEngine: rtol/atol None is the engine precision's pair
    (refitcore.refitting.verify.engine_tolerances); a given one is kept."""
    want = PRECISION_TOLERANCES[precision]
    engine = refitcore.compile(conv_bn(0), X, backend="reference", precision=precision)
    new = conv_bn(1)
    assert _tolerances(refitcore.verify(engine, conv_bn(0), [X])) == {want}
    assert _tolerances(refitcore.verify(engine, conv_bn(0), [X], rtol=1e-3)) == {(1e-3, want[1])}
    result = refitcore.refit(engine, new, path="cached", verify_inputs=[X])
    assert result and _tolerances(result.verdict) == {want}
    report = run_refit(engine, prepare_weights(engine, new), paths=("cached",), reference=new, samples=[X])
    assert report and _tolerances(report.records["cached"].verdict) == {want}
    given = refitcore.refit(engine, new, path="cached", verify_inputs=[X], rtol=FP32[0], atol=FP32[1])
    assert _tolerances(given.verdict) == {FP32}

    model = conv_bn(0)
    fast = refitcore.MutableEngine(model, X, backend="reference", precision=precision)
    model.load_state_dict(new.state_dict())
    fast(X)
    assert fast.last_action == "refit" and _tolerances(fast.last_refit.verdict) == {want}
    with pytest.raises(ValueError, match="rtol=nan"):
        refitcore.MutableEngine(model, X, backend="reference", precision=precision, rtol=float("nan"))


def test_float32_engines_keep_float32s_tolerances():
    engine = refitcore.compile(conv_bn(0), X, backend="reference")
    result = refitcore.refit(engine, conv_bn(1), path="cached", verify_inputs=[X])
    assert result and _tolerances(result.verdict) == {FP32}


# -- models already in half or bfloat16 -----------------------------------------------------------------
class Masked(nn.Module):
    """A weight combined with a non-persistent buffer (a constant of the graph the map records)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4, 4), persistent=False)

    def forward(self, x):
        return nn.functional.linear(x, self.lin.weight * self.scale, self.lin.bias)


def test_model_precision_is_the_one_reduced_dtype_of_every_floating_parameter():
    from refitcore.dtypes import model_precision

    assert model_precision(conv_bn()) == "fp32"
    assert model_precision(conv_bn().half()) == "fp16"
    assert model_precision(conv_bn().to(torch.bfloat16)) == "bf16"
    assert model_precision(conv_bn().double()) == "fp32"
    mixed = conv_bn().half()
    mixed.head.float()
    assert model_precision(mixed) == "fp32"
    buffers_only = nn.Module()
    buffers_only.register_buffer("table", torch.ones(3, dtype=torch.bfloat16))
    assert model_precision(buffers_only) == "bf16"
    assert model_precision(nn.ReLU()) == "fp32"


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_a_reduced_precision_model_compiles_at_its_own_precision_by_default(precision):
    dt = DTYPES[precision]
    model, x = conv_bn(0).to(dt), X.to(dt)
    engine = refitcore.compile(model, x, backend="reference")
    assert engine.options.precision == precision
    assert {s.dtype for s in engine.weight_map.sources.values()} == {str(dt).replace("torch.", "")}
    assert engine(x).dtype == dt
    result = refitcore.refit(engine, conv_bn(1).to(dt), path="cached", verify_inputs=[x], audit=True)
    assert result and result.audit.ok and _tolerances(result.verdict) == {PRECISION_TOLERANCES[precision]}
    # a float32 model keeps float32 engines
    assert refitcore.compile(conv_bn(0), X, backend="reference").options.precision == "fp32"


@pytest.mark.parametrize(("model_dtype", "precision"), [(torch.float16, "fp32"), (torch.bfloat16, "fp32"),
                                                       (torch.bfloat16, "fp16"), (torch.float16, "bf16")])
def test_a_reduced_precision_model_at_another_precision_is_refused_saying_what_to_do(model_dtype, precision):
    """Its weights would sit in the engine's type next to activations in the model's own (a strongly
    typed network refuses such a layer): refused before anything is exported, with the fix."""
    own = {torch.float16: "fp16", torch.bfloat16: "bf16"}[model_dtype]
    with pytest.raises(ValueError, match=rf"precision='{precision}' for a model whose floating parameters are all "
                                         rf"torch.{str(model_dtype)[6:]}: compile it at '{own}'"):
        refitcore.compile(conv_bn(0).to(model_dtype), X.to(model_dtype), backend="reference", precision=precision)


@pytest.mark.parametrize("check", ["content", "version"])
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_mutable_engine_follows_a_reduced_precision_model(precision, check):
    dt = DTYPES[precision]
    model, x = conv_bn(0).to(dt), X.to(dt)
    fast = refitcore.MutableEngine(model, x, backend="reference", check=check)
    assert fast.engine.options.precision == precision and fast(x).dtype == dt
    with torch.no_grad():
        model.head.weight.mul_(-2)               # in place through the tensor: both checks see it
    y = fast(x)
    assert fast.last_action == "refit" and fast.refits == 1
    assert _tolerances(fast.last_refit.verdict) == {PRECISION_TOLERANCES[precision]}
    assert torch.equal(y, fast.engine(x)) and fast(x) is not None and fast.last_action == "none"


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_a_non_finite_reduced_precision_constant_is_named_with_its_value(precision):
    """The map stores bfloat16 constants as their uint16 bit patterns: validation reads them as
    bfloat16 values (an inf in the constant, not an integer that hides it)."""
    dt = DTYPES[precision]
    torch.manual_seed(0)
    engine = refitcore.compile(Masked().eval().to(dt), torch.randn(2, 4, dtype=dt), backend="reference")
    new = Masked().eval().to(dt)
    new.scale[1, 2] = float("inf")
    before = {k: v.copy() for k, v in engine.impl.current_weights().items()}
    with pytest.raises(refitcore.errors.WeightMappingError) as err:
        refitcore.refit(engine, new, path="cached", in_place=True)
    assert "constant(s) of the graph holding NaN/Inf" in str(err.value) and "inf at [1, 2]" in str(err.value)
    after = engine.impl.current_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)


# -- planted map bugs at the default tolerances -----------------------------------------------------------
class Net(nn.Module):
    """Conv + BatchNorm (a fold) and two same-shaped square projections (to swap and to transpose)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, d, 3, padding=1)
        self.bn = nn.BatchNorm2d(d)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(h + self.fc2(torch.tanh(self.fc1(h))))


def net(seed: int, small_variances: bool = False) -> nn.Module:
    """``small_variances``: running variances in [1e-4, 1e-3], where a BatchNorm's eps matters."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(Net().eval(), seed)
    if small_variances:
        with torch.no_grad():
            model.bn.running_var.uniform_(1e-4, 1e-3)
    return model


def weight_of(engine, module: str, role: str) -> str:
    """The engine weight a module's parameter becomes (e.g. 'fc1', 'weight'); recipes name their keys."""
    (name,) = [n for n, s in engine.weight_map.sources.items() if s.keys and s.keys[0] == f"{module}.{role}"]
    return name


def plant(engine, bug: str) -> str:
    """Corrupt ``engine``'s recorded weight map (compile recorded a wrong map): the cached path then
    computes wrong weights; the fallback converts again and stays right. Returns the planted weight."""
    sources = engine.weight_map.sources
    if bug == "swap":            # two same-shaped weights exchanged
        a, b = weight_of(engine, "fc1", "weight"), weight_of(engine, "fc2", "weight")
        sources[a], sources[b] = sources[b], sources[a]
        return a
    if bug == "transpose":       # a square weight read transposed
        a = weight_of(engine, "fc1", "weight")
        src = sources[a]
        (role, operand), = src.inputs.items()
        sources[a] = dataclasses.replace(src, inputs={role: {"op": "aten.t.default", "args": [operand]}})
        return a
    eps = {"eps": 1e-1, "eps_small": 1e-3}[bug]   # the model's eps is 1e-5
    folds = [n for n, s in sources.items() if s.recipe in ("bn_fold_kernel", "bn_fold_bias")]
    for n in folds:
        sources[n] = dataclasses.replace(sources[n], params={**sources[n].params, "eps": eps})
    return sorted(folds, key=list(engine.weight_names).index)[0]


BUGS = ["swap", "transpose", "eps", "eps_small"]
# Bugs that move the outputs beyond the precision's noise: output verification alone catches them at the
# default tolerances. 'eps_small' (eps 1e-3 in the map for the model's 1e-5, variances 0.5-2) moves the
# outputs by less than the rounding noise of either precision: only the exact audit sees it.
SEEN_BY_OUTPUTS = {"swap", "transpose", "eps"}


def new_weights(bug: str) -> nn.Module:
    return net(1, small_variances=bug == "eps")


@pytest.mark.parametrize("bug", BUGS)
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_planted_bugs_are_caught_at_the_default_tolerances(precision, bug):
    engine = refitcore.compile(net(0), X, backend="reference", precision=precision)
    planted = plant(engine, bug)
    new = new_weights(bug)
    verified = refitcore.refit(engine, new, path="cached", verify_inputs=[X])   # default rtol/atol
    assert _tolerances(verified.verdict) == {PRECISION_TOLERANCES[precision]}
    if bug in SEEN_BY_OUTPUTS:
        assert not verified, f"output verification missed {bug}:\n{verified}"
    else:
        assert verified, "the test's premise: this bug is below the precision's noise"
    audited = refitcore.refit(engine, new, path="cached", audit=True)          # the exact audit, no outputs
    assert not audited and not audited.audit.ok
    assert next(d.name for d in audited.audit.diffs if d.status != "ok") == planted
    both = refitcore.refit(engine, new, path="cached", verify_inputs=[X], audit=True)
    assert not both
    # 'auto' verifies the cached refit and, where outputs show the bug, refits through the fallback
    auto = refitcore.refit(engine, new, verify_inputs=[X])
    assert auto.fell_back == (bug in SEEN_BY_OUTPUTS) and auto.verdict.ok


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_without_a_planted_bug_every_check_passes_at_the_default_tolerances(precision):
    engine = refitcore.compile(net(0), X, backend="reference", precision=precision)
    for small in (False, True):
        result = refitcore.refit(engine, net(1, small_variances=small), path="cached", verify_inputs=[X],
                                 audit=True)
        assert result and result.audit.ok, str(result)


PLUGIN_TEST = '''
import pytest
from tests.test_precision_e2e import X, Net, new_weights, plant


@pytest.mark.parametrize("bug", ["swap", "transpose", "eps", "eps_small", "none"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_planted(trt_refit, precision, bug):
    engine = trt_refit.engine_for(Net, X, precision=precision)   # the session's engine, shared by the tests
    recorded = dict(engine.weight_map.sources)
    if bug != "none":
        plant(engine, bug)
    try:
        trt_refit.check(Net, new_weights(bug).state_dict(), X, precision=precision)
    finally:
        engine.weight_map.sources.clear()
        engine.weight_map.sources.update(recorded)
'''


def test_planted_bugs_fail_the_plugins_checks_at_the_default_tolerances(pytester, keep_hypothesis_seed):
    """Through the plugin (both paths, the exact audit between them, outputs at the precision's default
    tolerances): every planted bug fails its check, which names the planted weight; the bugs that move
    the outputs fail the cached path's verification, the one below the noise fails the audit only."""
    import json

    pytester.makepyfile(test_planted=PLUGIN_TEST)
    result = pytester.runpytest_inprocess("--trt-refit", "--trt-refit-report=report.json", "-p", "no:logging",
                                          "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=8)
    report = json.loads((pytester.path / "report.json").read_text())
    failures = {f["test"].split("[")[1].rstrip("]"): f for f in report["failures"]}
    assert sorted(failures) == sorted(f"{p}-{b}" for p in DTYPES for b in BUGS)
    for label, failure in failures.items():
        precision, bug = label.split("-", 1)
        text = failure["report"]
        assert "cached map vs fallback map" in text, text          # the audit
        assert failure["culprit"] == ("conv/conv2d KERNEL" if bug.startswith("eps") else "fc1/linear.weight CONSTANT")
        outputs_failed = "path 'cached', sample 0" in text
        assert outputs_failed == (bug in SEEN_BY_OUTPUTS), (label, text)
        if outputs_failed:     # at the precision's default tolerances
            rtol, atol = PRECISION_TOLERANCES[precision]
            assert f"tolerances rtol={rtol:g}, atol={atol:g}" in text, text
        else:
            assert "path 'cached': ok" in text and "path 'fallback': ok" in text, text


# -- float16 overflow: refused before the engine is touched ----------------------------------------------
def _held(engine) -> dict:
    return {k: v.copy() for k, v in engine.impl.current_weights().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_a_fine_tuned_weight_beyond_float16_is_refused_before_the_engine_is_touched():
    engine = refitcore.compile(net(0), X, backend="reference", precision="fp16")
    refitcore.refit(engine, net(1), path="cached", in_place=True)
    before, out = _held(engine), engine(X)
    new = net(2)
    with torch.no_grad():
        new.fc1.weight[1, 2] = 1e5
    for path in ("auto", "cached"):
        with pytest.raises(refitcore.errors.WeightMappingError) as err:
            refitcore.refit(engine, new, path=path, in_place=True, verify_inputs=[X])
        text = str(err.value)
        for part in ("engine weight 'fc1/linear.weight CONSTANT' (float16)", "state_dict key 'fc1.weight'",
                     "holds 100000 at [1, 2]", "overflow float16", "65504",
                     "rescale that weight into float16's range", "keep this layer in float32"):
            assert part in text, (part, text)
        assert _same(before, _held(engine)) and torch.equal(engine(X), out)
    # bfloat16 has float32's range: the same weights refit a bf16 engine
    bf16 = refitcore.compile(net(0), X, backend="reference", precision="bf16")
    assert refitcore.refit(bf16, new, path="cached", audit=True).audit.ok


def test_a_batchnorm_fold_that_overflows_float16_although_its_inputs_fit_is_refused():
    engine = refitcore.compile(net(0), X, backend="reference", precision="fp16")
    before, out = _held(engine), engine(X)
    new = net(1)
    with torch.no_grad():
        new.bn.weight[3] = 3e4            # fits float16
        new.bn.running_var[3] = 1e-4      # fits float16: the fold multiplies the kernel by ~2.9e6
    assert all(bool(torch.isfinite(t.half()).all()) for t in new.state_dict().values() if t.is_floating_point())
    with pytest.raises(refitcore.errors.WeightMappingError) as err:
        refitcore.refit(engine, new, in_place=True, verify_inputs=[X])
    text = str(err.value)
    for part in ("engine weight 'conv/conv2d KERNEL' (float16) = bn_fold_kernel(...)", "'bn.weight'",
                 "'bn.running_var'", "first at [3, ", "becomes inf",
                 "the bn_fold_kernel result overflows although every input fits float16", "fold in float32"):
        assert part in text, (part, text)
    assert _same(before, _held(engine)) and torch.equal(engine(X), out)


# -- a bf16 LLM-style checkpoint in safetensors ---------------------------------------------------------
def tiny_llama(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():   # random weights at a scale where every layer matters (init is N(0, 0.02))
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.to(torch.bfloat16)


def test_a_bf16_llama_checkpoint_in_safetensors_refits_from_the_file_and_verifies(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    call = refitcore.Inputs(ids, use_cache=False)
    engine = refitcore.compile(tiny_llama(0), args=(ids,), kwargs={"use_cache": False}, backend="reference")
    assert engine.options.precision == "bf16"                                   # the model's own precision
    new = tiny_llama(1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in new.state_dict().items()}, str(path))
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - stored as bf16
    before = _held(engine)
    result = refitcore.refit(engine, str(path), path="cached", audit=True, verify_inputs=[call],
                             reference_model=new, in_place=True)
    assert result and result.audit.ok, str(result)
    assert _tolerances(result.verdict) == {PRECISION_TOLERANCES["bf16"]}
    assert not _same(before, _held(engine))
    # a bf16 file refits every weight bit-identically to compiling the new model
    rebuilt = refitcore.compile(new, args=(ids,), kwargs={"use_cache": False}, backend="reference")
    assert _same(_held(rebuilt), _held(engine))


# -- no false failures: random weights at the default tolerances ----------------------------------------------
# The strategies' specials that are weights a deployment may hold at each precision. Left out, as range
# validation refuses them by design (tests/test_precision_surface.py): 'large' (x100) and 'tiny' (x1e-6) at
# fp16 (activations beyond float16's range; values below its smallest normal); 'dtype_max' and
# 'dtype_min_normal' (the same at the dtype's very limits); and 'zeros', which with 'dtype_subnormal' on the
# same tensor leaves a tensor whose largest value is subnormal, refused at both precisions ('zero_channels'
# still draws zeros).
PROPERTY_SPECIALS = {
    "fp16": ("sign_flip", "negative_gamma", "var_near_eps", "zero_channels", "dtype_subnormal"),
    "bf16": ("large", "tiny", "sign_flip", "negative_gamma", "var_near_eps", "zero_channels", "dtype_subnormal"),
}
PROPERTY_EXAMPLES = 200     # the slow run (benchmarks/results/precision_properties.md records it)


def random_weights_refit_correctly(precision: str, examples: int) -> None:
    """``examples`` random weight sets (the public strategies, with the specials above) refitted into
    one engine of ``precision``: each passes verification at the precision's default tolerances and the
    exact cached-vs-fallback audit."""
    from hypothesis import HealthCheck, given, settings

    from pytest_trtrefit.strategies import state_dicts

    engine = refitcore.compile(net(0), X, backend="reference", precision=precision)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(weights=state_dicts(Net(), specials=PROPERTY_SPECIALS[precision], precision=precision))
    def refit_passes(weights):
        model = Net().eval()
        model.load_state_dict(weights)
        result = refitcore.refit(engine, weights, path="cached", verify_inputs=[X], audit=True,
                                 reference_model=model)
        assert result and result.audit.ok, f"{weights!r}\n{result}"
        assert _tolerances(result.verdict) == {PRECISION_TOLERANCES[precision]}

    refit_passes()


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_random_weights_give_no_false_failure(precision):
    random_weights_refit_correctly(precision, examples=8)


@pytest.mark.slow
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_random_weights_give_no_false_failure_across_200_examples(precision):
    random_weights_refit_correctly(precision, examples=PROPERTY_EXAMPLES)


def test_a_bfloat16_flush_does_not_suggest_bfloat16():
    """bfloat16's smallest normal is float32's: the fix of a bfloat16 flush is not 'use bfloat16'."""
    engine = refitcore.compile(net(0), X, backend="reference", precision="bf16")
    new = net(1)
    with torch.no_grad():
        new.fc2.bias.fill_(3e-39)
    with pytest.raises(refitcore.errors.WeightMappingError) as err:
        refitcore.refit(engine, new, path="cached")
    assert "below bfloat16's smallest normal" in str(err.value) and "use bfloat16" not in str(err.value)


# -- the sweep (scripts/zoo_repos.py --precision) ------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_the_precision_sweep_row_of_a_fast_model(precision):
    from tests.scripts import load_script

    zoo = load_script("zoo_repos")
    row = zoo.run_precision("cumsum", precision)
    assert row["ok"] and row["audit_exact"] and row["tolerances"] == list(PRECISION_TOLERANCES[precision]), row
    bound = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}[precision]
    for key in ("compile_same", "cached_same", "fallback_same", "compile_fp32", "cached_fp32", "fallback_fp32"):
        assert 0 <= row[key] < bound, (key, row)
    assert 0 <= row["cached_margin"] <= 1 and "| custom: torch.cumsum |" in zoo.precision_table([dict(row, total_s=1)])


def test_the_sweep_s_timeout_stops_a_model_and_a_bad_precision_is_refused(capsys):
    import time

    from tests.scripts import load_script

    zoo = load_script("zoo_repos")
    with pytest.raises(zoo.ModelTimeout, match="more than 1 s"):
        zoo._run_with_timeout(1, time.sleep, 5)
    assert zoo._run_with_timeout(0, lambda v: {"v": v}, 3) == {"v": 3}
    with pytest.raises(SystemExit):
        zoo.main(["--precision", "fp8", "cumsum"])
    assert "fp8" in capsys.readouterr().err
