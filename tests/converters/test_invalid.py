"""Calls the converters cannot express: with strict=True each raises UnsupportedOperatorError naming
the op and why, before any layer is built (without it, the call runs in PyTorch). One table, readable ids."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refitcore
from refitcore.errors import UnsupportedOperatorError


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _sdpa_dropout(x):
    return F.scaled_dot_product_attention(x, x, x, dropout_p=0.5)


CASES = [
    pytest.param(nn.AvgPool2d(3, 2, 1, ceil_mode=True), (1, 2, 6, 6), "aten.avg_pool2d.default",
                 "ceil_mode average pooling with padding and count_include_pad=True", id="avg_pool_ceil_counted_pad"),
    pytest.param(Fn(lambda x: torch.softmax(x, -1, dtype=torch.float64)), (2, 5), "aten.softmax.int",
                 "softmax with dtype=torch.float64", id="softmax_float64"),
    pytest.param(Fn(lambda x: torch.einsum("...i,...i->...", x, x)), (2, 5), "aten.einsum.default",
                 "ellipsis", id="einsum_ellipsis"),
    pytest.param(Fn(lambda x: torch.roll(x, 2)), (2, 5), "aten.roll.default", "flattened roll",
                 id="roll_without_dims"),
    pytest.param(Fn(lambda x: torch.linalg.vector_norm(x, ord=1, dim=-1)), (2, 5), "aten.linalg_vector_norm.default",
                 "ord=2", id="vector_norm_ord1"),
    pytest.param(Fn(lambda x: torch.where(torch.ones(5, dtype=torch.bool), x, 0.0)), (2, 5), "aten.where.ScalarOther",
                 "constant condition", id="where_constant_condition"),
    pytest.param(Fn(lambda x: torch.where(torch.ones(5, dtype=torch.bool), x, 2 * x)), (2, 5), "aten.where.self",
                 "constant condition", id="where_constant_condition_tensors"),
    pytest.param(Fn(_sdpa_dropout), (1, 2, 3, 4), "aten.scaled_dot_product_attention.default", "dropout_p",
                 id="attention_dropout"),
    pytest.param(Fn(lambda x: x.double() * 2), (2, 5), "aten._to_copy.default", "float64", id="cast_to_float64"),
    pytest.param(Fn(lambda x: (x > 0).int() & (x < 1).int()), (2, 5), "aten.__and__.Tensor", "bool tensors only",
                 id="bitwise_on_int"),
    pytest.param(Fn(lambda x: x[x > 0]), (2, 5), "aten.index.Tensor", "boolean mask", id="index_bool_mask"),
    # (two index tensors over all axes of a 2-D tensor are supported: tests/converters/test_dynamic_ops.py)
    pytest.param(Fn(lambda x: x[x.argmax(0).argmax(0), x.argmin(1).argmin(0)]), (5, 5, 3), "aten.index.Tensor",
                 "2 index tensors", id="index_two_tensors"),
    pytest.param(Fn(lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest")), (1, 2, 5, 5),
                 "aten.upsample_nearest2d.vec", "not a whole multiple", id="upsample_fractional_scale"),
    pytest.param(Fn(lambda x: F.interpolate(x, size=(7, 7), mode="bicubic")), (1, 2, 5, 5),
                 "aten.upsample_bicubic2d.vec", "", id="upsample_bicubic"),
    pytest.param(nn.InstanceNorm2d(2, track_running_stats=True), (1, 2, 4, 4), "aten.instance_norm.default",
                 "running statistics", id="instance_norm_running_stats"),
    pytest.param(nn.AdaptiveAvgPool3d((2, 3, 3)), (1, 2, 3, 4, 4), "aten.adaptive_avg_pool3d.default",
                 "uneven windows", id="adaptive_avg_pool3d_uneven"),
    pytest.param(Fn(lambda x: x.argmax()), (2, 5), "aten.argmax.default", "dim=None", id="argmax_flat"),
    pytest.param(Fn(lambda x: x.cumsum(0, dtype=torch.float64)), (2, 5), "aten.cumsum.default", "dtype",
                 id="cumsum_dtype"),
    pytest.param(Fn(lambda x: x.double().cumsum(1)), (2, 5), "aten._to_copy.default", "float64",
                 id="float64_arithmetic"),
    pytest.param(Fn(lambda x: F.grid_sample(x, x[:, :2].permute(0, 2, 3, 1).tanh(), mode="bicubic",
                                            align_corners=False)),
                 (1, 3, 4, 4), "aten.grid_sampler.default", "bicubic grid_sample", id="grid_sample_bicubic"),
    pytest.param(Fn(lambda x: F.grid_sample(x, x[:, :3].permute(0, 2, 3, 4, 1).tanh(), align_corners=False)),
                 (1, 3, 2, 4, 4), "aten.grid_sampler.default", "5-D grid_sample", id="grid_sample_volumetric"),
    pytest.param(Fn(lambda x: torch.grid_sampler_3d(x, x[:, :3].permute(0, 2, 3, 4, 1).tanh(), 0, 0, False)),
                 (1, 3, 2, 4, 4), "aten.grid_sampler_3d.default", "5-D grid_sample (TensorRT's GridSample takes 4-D",
                 id="grid_sampler_3d"),
    pytest.param(Fn(lambda x: torch.diff(x, n=5)), (2, 5), "aten.diff.default", "empty result", id="diff_empty"),
    pytest.param(Fn(lambda x: torch.log_softmax(x, -1, dtype=torch.float64)), (2, 5), "aten.log_softmax.int",
                 "log_softmax with dtype=torch.float64", id="log_softmax_float64"),
    pytest.param(Fn(nn.LSTM(5, 4, proj_size=2, batch_first=True)), (2, 3, 5), "aten.lstm.input", "proj_size",
                 id="lstm_projected"),
]


@pytest.mark.parametrize("model, shape, op, why", CASES)
def test_unsupported_call_is_reported(model, shape, op, why):
    with pytest.raises(UnsupportedOperatorError) as info:
        refitcore.compile(model.eval(), torch.randn(shape), backend="reference", strict=True)
    message = str(info.value)
    assert op in message, message
    assert why in message, message


@pytest.mark.parametrize("model, shape, op, why", CASES)
def test_unsupported_call_runs_in_pytorch(model, shape, op, why):
    """Without strict, the same call compiles, runs in PyTorch (named with its reason) and matches eager."""
    x = torch.randn(shape)
    engine = refitcore.compile(model.eval(), x, backend="reference")
    fallen = {entry[0] for entry in (engine.partition.fallback.values() if engine.partition else [])}
    assert op in fallen, engine.summary()
    if why == "dropout_p":
        return   # random by definition: nothing to compare
    with torch.no_grad():
        torch.testing.assert_close(engine(x), model(x), rtol=1e-5, atol=1e-5, check_dtype=False)


def test_the_harness_fails_a_converter_that_declines():
    """check_converter compiles strictly: an op whose converter declines fails the test instead of
    passing with the op run in PyTorch."""
    from tests.converters.harness import Proj, check_converter

    with pytest.raises(UnsupportedOperatorError, match="aten.roll.default"):
        check_converter(Proj(lambda x: torch.roll(x, 2)), torch.randn(2, 4))
    check_converter(Proj(lambda x: torch.roll(x, 2)), torch.randn(2, 4), strict=False)   # partitions, and passes
