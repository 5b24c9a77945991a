"""The tiny-model registry for Torch-TensorRT refit checks: every factory builds a fresh model with
random weights that runs eagerly on its example inputs, and the registry covers every converter
family that records refittable weights."""
from __future__ import annotations

import pytest
import torch

from tests.ttrt_models import FAMILIES, MODELS, SETTINGS, build

# Torch-TensorRT's converter families that record weights in ctx.weight_refit_map, and the models
# of the acceptance list
REQUIRED = {"convolution", "deconvolution", "linear", "matmul", "addmm", "batch_norm", "layer_norm",
            "group_norm", "native_layer_norm", "embedding", "scaled_dot_product_attention",
            "constants used elementwise", "cumsum", "complex buffers", "acceptance: resnet18",
            "acceptance: mobilenet_v2", "acceptance: tiny BERT", "acceptance: conv + BatchNorm",
            "acceptance: torch_executed_ops", "acceptance: dynamic batch"}


def test_the_registry_names_a_family_for_every_model_and_covers_each_family():
    assert set(FAMILIES) == set(MODELS)
    assert set(SETTINGS) <= set(MODELS)
    assert set(FAMILIES.values()) >= REQUIRED, sorted(REQUIRED - set(FAMILIES.values()))


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in _outputs(item)] if isinstance(out, (list, tuple)) else []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_factory_builds_a_fresh_random_model_that_runs_eagerly(name):
    model, inputs = build(name, seed=3)
    assert not model.training, f"{name}: factories build models in eval mode"
    with torch.no_grad():
        outs = _outputs(model(*inputs))
    assert outs and all(o.numel() and torch.isfinite(o).all() for o in outs), name
    params = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point() or b.is_complex()]
    assert params, f"{name}: no weights to refit"
    other, _ = build(name, seed=4)   # another seed draws other weights
    differs = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
                  if a.is_floating_point() or a.is_complex())
    assert differs, f"{name}: the weights do not depend on the seed"


def test_the_dynamic_batch_model_runs_at_every_batch_its_range_allows():
    model, (x,) = build("dynamic_batch")
    (dims,) = SETTINGS["dynamic_batch"]["dynamic_shapes"]
    batch = dims[0]
    for n in (batch.min, 5, batch.max):
        with torch.no_grad():
            assert model(torch.randn(n, *x.shape[1:])).shape[0] == n
