"""Acceptance of Torch-TensorRT's refit through the plugin: the models of Torch-TensorRT's own refit tests
(``tests/ttrt_models.py``) under ``pytest --trt-refit --trt-refit-compiler=torch_tensorrt``, each with
fixed-seed weights (a fixture check per seed) and Hypothesis-drawn weights (a declared model's generated
property test). The small ones run by default; resnet18, mobilenet_v2, the tiny BERT (every output tensor
compared, not the keys of its ``ModelOutput``), BatchNorm with eps=1e-3, the second complex-buffer model
and the dynamic batch (torch.export ``Dim``; the generated test also checks the range's ends) run with
``-m slow`` or ``-m zoo``.

Needs ``torch_tensorrt`` (the ``torch_tensorrt`` extra): skipped with the reason otherwise."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from refitcore.engine import torch_tensorrt_api

pytest_plugins = ["pytester"]

AVAILABLE, WHY = torch_tensorrt_api.available()
needs_ttrt = pytest.mark.skipif(not AVAILABLE, reason=WHY)

FAST = ["conv_bn", "cumsum", "complex_buffer", "multi_engine"]
SLOW = ["resnet18", "mobilenet_v2", "tiny_bert", "conv_bn_eps1e-3", "complex_mul"]

ROOT = str(pathlib.Path(__file__).resolve().parents[1])   # the repository: the run imports tests.ttrt_models

SHARED = '''
import sys

sys.path.insert(0, {root!r})

from tests.ttrt_models import SETTINGS, build  # noqa: E402

NAMES = {names!r}


def factory(name):
    def make():
        return build(name, 0)[0]
    make.__qualname__ = make.__name__ = name
    return make


FACTORIES = {{name: factory(name) for name in NAMES}}


def options(name):
    """The declaration keys of a model's Torch-TensorRT settings (torch_executed_ops, dynamic_shapes)."""
    settings = dict(SETTINGS.get(name, {{}}))
    if "torch_executed_ops" in settings:
        settings["torch_executed_ops"] = sorted(settings["torch_executed_ops"])
    return settings
'''

CONFTEST = '''
from ttrt_accept import FACTORIES, NAMES, options
from tests.ttrt_models import build


def pytest_trt_refit_models():
    return {{name: dict(factory=FACTORIES[name], inputs=build(name, 0)[1], checks=["weights"], examples={examples},
                       input_families=[], **options(name)) for name in NAMES}}
'''

FIXED_SEED_TEST = '''
import pytest
from ttrt_accept import FACTORIES, NAMES, options
from tests.ttrt_models import build


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_fixed_seed(trt_refit, name, seed):
    settings = options(name)
    dynamic = settings.pop("dynamic_shapes", None)
    new, inputs = build(name, seed)
    trt_refit.check(FACTORIES[name], new.state_dict(), inputs, name=name, dynamic_shapes=dynamic,
                    compile_options=settings or None)
'''


def _run(pytester, names, examples=2):
    """The plugin's default run with Torch-TensorRT over ``names``: a fixed-seed check per seed and a
    Hypothesis property test per model; returns (pytest result, JSON report)."""
    pytester.makepyfile(ttrt_accept=SHARED.format(names=list(names), root=ROOT))
    pytester.syspathinsert()
    pytester.makeconftest(CONFTEST.format(examples=examples))
    pytester.makepyfile(test_fixed=FIXED_SEED_TEST)
    # A process of its own: in-process runs share (and unload) modules between runs, and these compile much.
    result = pytester.runpytest_subprocess("--trt-refit", "--trt-refit-compiler=torch_tensorrt", "--trt-refit-seed=11",
                                           "--trt-refit-report=r.json", "-p", "no:cacheprovider", timeout=1200)
    return result, json.loads((pytester.path / "r.json").read_text())


def _assert_every_model_checked(result, report, names, per_model):
    result.assert_outcomes(passed=3 * len(names))
    assert report["status"] == "pass", report["problems"]
    checked = {}
    for c in report["checks"]:
        assert c["path"] == "fallback" and c["ok"] and c["max_abs"] is not None, c
        checked[c["model"]] = checked.get(c["model"], 0) + 1
    assert checked == dict.fromkeys(names, per_model), checked
    assert {b["compiler"] for b in report["builds"]} == {"torch_tensorrt"}
    assert sorted(b["model"] for b in report["builds"]) == sorted(names)   # one engine per model, refitted in place


@needs_ttrt
def test_refit_suite_models_through_the_plugin(pytester):
    result, report = _run(pytester, FAST)
    # two fixed seeds + two weight sets Hypothesis draws
    _assert_every_model_checked(result, report, FAST, per_model=4)
    engines = {b["model"]: b for b in report["builds"]}
    assert engines["multi_engine"]["compiler"] == "torch_tensorrt"
    shares = {c["model"]: c.get("trt_share") for c in report["checks"]}
    assert shares["multi_engine"] is not None and shares["multi_engine"] < 1.0, shares   # PyTorch segments too


@pytest.mark.slow
@pytest.mark.zoo
@needs_ttrt
def test_larger_refit_suite_models_through_the_plugin(pytester, request):
    if not {"slow", "zoo"} & set((request.config.getoption("markexpr") or "").replace("(", " ").split()):
        pytest.skip("resnet18, mobilenet_v2, the tiny BERT...: run with -m slow or -m zoo")
    result, report = _run(pytester, SLOW, examples=1)
    _assert_every_model_checked(result, report, SLOW, per_model=3)


@pytest.mark.slow
@pytest.mark.zoo
@needs_ttrt
def test_dynamic_batch_through_the_plugin(pytester, request):
    if not {"slow", "zoo"} & set((request.config.getoption("markexpr") or "").replace("(", " ").split()):
        pytest.skip("run with -m slow or -m zoo")
    result, report = _run(pytester, ["dynamic_batch"], examples=1)
    _assert_every_model_checked(result, report, ["dynamic_batch"], per_model=3)
    assert report["builds"][0]["profiles"], report["builds"]   # one engine over the batch range, not one per size


class BoolMask(torch.nn.Module):
    """A boolean buffer (an attention mask) that Torch-TensorRT's network holds as a BOOL CONSTANT weight."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("mask", torch.tensor([[True, False, True, True]] * 3))

    def forward(self, x):
        return self.fc(x).masked_fill(self.mask, 0.0)


def _mask_weight(engine) -> str:
    names = [n for n in engine.weight_names if engine.current_weights()[n].dtype == bool]
    assert len(names) == 1, engine.weight_names
    return names[0]


@needs_ttrt
def test_a_boolean_constant_is_audited_in_its_own_dtype(monkeypatch):
    """The witness reads a BOOL constant as bool (read as float32 it failed every BERT/GPT-2 refit's audit with
    'dtype (bool vs float32)'); a wrong mask value set by Torch-TensorRT's refit still fails, naming the weight."""
    import importlib

    import refitcore

    x = torch.randn(3, 4)
    model = BoolMask().eval()
    engine = refitcore.compile(model, x, compiler="torch_tensorrt", backend="reference", min_block_size=1)
    mask = _mask_weight(engine)
    new = BoolMask().eval()
    result = refitcore.refit(engine, new, path="fallback", verify_inputs=[x])
    assert result and not result.audit.failures, str(result)
    # The checker on a wrong value: Torch-TensorRT's refit map hands a flipped mask.
    refit_module = importlib.import_module("torch_tensorrt.dynamo._refit")
    original = refit_module.construct_refit_mapping
    key = mask.split(":", 1)[1]

    def flipped(*args, **kwargs):
        m = dict(original(*args, **kwargs))
        m[key] = ~m[key]
        return m

    monkeypatch.setattr(refit_module, "construct_refit_mapping", flipped)
    result = refitcore.refit(engine, new, path="fallback", verify_inputs=[x])
    assert not result and [d.name for d in result.audit.failures] == [mask], str(result)


# ---- known Torch-TensorRT refit issues (docs/torch-tensorrt.md): the checks fail and name the weight ----------------
@needs_ttrt
def test_known_issue_a_transposed_convolution_cannot_be_refitted():
    """Torch-TensorRT's deconvolution converter records its weights as [CONVOLUTION]-...: its refit stops on the
    engine's [DECONVOLUTION]-... KERNEL, named, and leaves the engine as it was."""
    import refitcore
    from refitcore.errors import WeightMappingError
    from tests.ttrt_models import build

    model, x = build("conv_transpose2d", 0)
    engine = refitcore.compile(model, x, compiler="torch_tensorrt", backend="reference", min_block_size=1)
    before = {k: v.copy() for k, v in engine.current_weights().items()}
    with pytest.raises(WeightMappingError) as err:
        refitcore.refit(engine, build("conv_transpose2d", 1)[0], path="fallback", verify_inputs=[x], in_place=True)
    assert "'[DECONVOLUTION]-[aten_ops.convolution.default]-[0/convolution] KERNEL'" in str(err.value), str(err.value)
    assert "is not found in weight mapping" in str(err.value)
    assert all((before[k] == v).all() for k, v in engine.current_weights().items())


@needs_ttrt
def test_known_issue_select_of_a_negative_index_is_named():
    """``x[:, -1]``: Torch-TensorRT's select converter emits a GATHER with index -1 (TensorRT documents [0, d))."""
    import refitcore

    class LastStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)[:, -1]

    with pytest.raises(ValueError, match=r"\[Gather\]': gather index -1 out of range \[0, 3\)"):
        refitcore.compile(LastStep().eval(), torch.randn(2, 3, 4), compiler="torch_tensorrt", backend="reference",
                          min_block_size=1)
