"""Build, run, refit (cached and fallback paths), save and load every model of tests/models.py on
a real TensorRT engine, and show that wrong weights are caught."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import refitcore
from refitcore.errors import RefitError
from tests.models import MODELS, make

pytestmark = pytest.mark.gpu

# fp32 with TF32 off: TensorRT's kernels still differ from eager in summation order.
RTOL, ATOL = 1e-4, 1e-4


def _eager(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _close(a, b, rtol=RTOL, atol=ATOL):
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    return torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_build_and_run_matches_eager(trt_compiled, name):
    c = trt_compiled(name)
    assert c.engine.backend == "tensorrt"
    out = c.engine(c.x)
    ok, err = _close(out, _eager(c.model, c.x))
    assert ok, f"{name}: engine vs eager max abs error {err:.3g}"
    cuda_out = c.engine(c.x.cuda())
    assert cuda_out.is_cuda, "CUDA inputs give CUDA outputs"
    assert torch.equal(cuda_out.cpu(), out)


@pytest.mark.parametrize("path", ["cached", "fallback"])
@pytest.mark.parametrize("name", list(MODELS))
def test_refit_both_paths_matches_eager(trt_compiled, name, path):
    c = trt_compiled(name)
    new_model, _ = make(name, seed=7)
    result = refitcore.refit(c.engine, new_model, path=path, verify_inputs=[c.x], rtol=RTOL, atol=ATOL)
    assert result, str(result)
    ok, err = _close(result.engine(c.x), _eager(new_model, c.x))
    assert ok, f"{name} via {path}: refitted engine vs eager max abs error {err:.3g}"
    # the session's engine is untouched (refit works on a copy)
    ok, _ = _close(c.engine(c.x), _eager(c.model, c.x))
    assert ok


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_keeps_refitted_weights(trt_compiled, name, tmp_path):
    c = trt_compiled(name)
    new_model, _ = make(name, seed=11)
    refitted = refitcore.refit(c.engine, new_model, path="cached").engine
    path = tmp_path / f"{name}.trtrefit"
    refitted.save(path)
    loaded = refitcore.load(path)
    assert loaded.backend == "tensorrt"
    assert torch.equal(loaded(c.x), refitted(c.x)), "the saved plan must carry the refitted weights"
    # and it is still refittable after loading (INCLUDE_REFIT)
    back = refitcore.refit(loaded, c.model, path="cached", verify_inputs=[c.x], rtol=RTOL, atol=ATOL)
    assert back, str(back)


@pytest.mark.parametrize("name", ["conv_bn_relu", "tied_mlp", "resnet18"])
def test_a_b_a_returns_exactly(trt_compiled, name):
    c = trt_compiled(name)
    a = refitcore.refit(c.engine, c.model, path="cached").engine    # A, as a refit gives it
    a_out = a(c.x)
    ok, err = _close(a_out, c.engine(c.x))
    assert ok, f"refitting the build weights changed the answers by {err:.3g}"
    refitcore.refit(a, make(name, seed=3)[0], path="cached", in_place=True)        # -> B
    assert not torch.equal(a(c.x), a_out), "B must answer differently from A"
    refitcore.refit(a, c.model, path="cached", in_place=True)                       # -> A
    assert torch.equal(a(c.x), a_out), "A -> B -> A must return exactly to A's outputs"


@pytest.mark.parametrize("name", ["conv_bn_relu", "residual"])
def test_wrong_mapping_is_caught_by_verify(trt_compiled, name):
    """A deliberately wrong mapping (two engine weights of equal size swapped) must fail verify."""
    c = trt_compiled(name)
    new_model, _ = make(name, seed=5)
    mapping = refitcore.cached_mapping(c.engine.weight_map, new_model.state_dict())
    names = [n for n in c.engine.weight_names if mapping[n].size > 1]
    sizes = {}
    pair = None
    for n in names:
        if mapping[n].shape in sizes and not np.array_equal(mapping[n], mapping[sizes[mapping[n].shape]]):
            pair = (sizes[mapping[n].shape], n)
            break
        sizes[mapping[n].shape] = n
    if pair is None:  # no two same-shape weights: perturb one instead
        pair = (names[0], names[0])
        mapping[names[0]] = mapping[names[0]] * -1.0
    else:
        mapping[pair[0]], mapping[pair[1]] = mapping[pair[1]], mapping[pair[0]]
    wrong = refitcore.apply_mapping(c.engine, mapping)
    verdict = refitcore.verify(wrong, new_model, [c.x], rtol=RTOL, atol=ATOL)
    assert not verdict, f"a wrong mapping ({pair}) passed verification: {verdict}"


def test_rejected_refit_rolls_back(trt_compiled):
    c = trt_compiled("conv_bn_relu")
    before = c.engine(c.x)
    eng = c.engine.clone()
    mapping = refitcore.cached_mapping(eng.weight_map, make("conv_bn_relu", seed=9)[0].state_dict())
    impl = eng.impl
    real = impl.create_refitter

    def sabotaged():
        r = real()
        inner = r._refitter

        class Failing:
            def __getattr__(self, k):
                return getattr(inner, k)

            def refit_cuda_engine(self):
                inner.refit_cuda_engine()   # applies everything, then reports failure
                return False

        r._refitter = Failing()
        impl.create_refitter = real  # only the first refitter fails; the rollback uses a real one
        return r

    impl.create_refitter = sabotaged
    with pytest.raises(RefitError) as info:
        refitcore.apply_mapping(eng, mapping, in_place=True)
    assert info.value.rolled_back
    assert torch.equal(eng(c.x), before), "after a failed refit the engine must answer exactly as before"


def test_device_resident_weights(trt_compiled):
    """CUDA tensors go to TensorRT as device weights (TensorLocation.DEVICE)."""
    c = trt_compiled("conv_bias_bn")
    new_model, _ = make("conv_bias_bn", seed=2)
    mapping = refitcore.cached_mapping(c.engine.weight_map, new_model.state_dict())
    eng = c.engine.clone()
    r = eng.impl.create_refitter()
    for n in r.get_all_weights():
        assert r.set_named_weights(n, torch.from_numpy(np.ascontiguousarray(mapping[n])).cuda()), r.errors
    assert not r.get_missing_weights()
    assert r.refit(), r.errors
    ok, err = _close(eng(c.x), _eager(new_model, c.x))
    assert ok, f"device-weight refit vs eager max abs error {err:.3g}"
    for n in eng.weight_names:
        np.testing.assert_array_equal(eng.current_weights()[n], np.asarray(mapping[n]).reshape(
            eng.current_weights()[n].shape))


def test_shape_and_dtype_errors(trt_compiled):
    c = trt_compiled("conv_bn_relu")
    with pytest.raises(ValueError, match="expected shape"):
        c.engine(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="expected dtype"):
        c.engine(c.x.half())


def test_fp16_build_where_supported(tensorrt_usable):
    # fp16 is the strongly typed network's (no builder flag): every TensorRT flavour builds it.
    model, x = make("conv_bn_relu", 0)
    engine = refitcore.compile(model, x, backend="tensorrt", precision="fp16")
    ok, err = _close(engine(x), _eager(model, x), rtol=1e-2, atol=1e-2)
    assert ok, f"fp16 engine vs eager max abs error {err:.3g}"
