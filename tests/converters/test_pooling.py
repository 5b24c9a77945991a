"""Pooling: ceil_mode (PyTorch's last-window rule), padding counted or not, adaptive windows."""
import pytest
import torch
from torch import nn

from .harness import check_converter


class ConvPool(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        return self.pool(self.conv(x))


@pytest.mark.parametrize("pool, size", [
    pytest.param(nn.MaxPool2d(3, 2, ceil_mode=True), 13, id="max_ceil_extra_window"),
    pytest.param(nn.MaxPool2d(2, 2, ceil_mode=True), 7, id="max_ceil_odd"),
    pytest.param(nn.MaxPool2d(3, 2, 1, ceil_mode=True), 6, id="max_ceil_last_window_in_padding_dropped"),
    pytest.param(nn.MaxPool2d(3, 2, ceil_mode=True), 9, id="max_ceil_equals_floor"),
    pytest.param(nn.AvgPool2d(3, 2, ceil_mode=True), 6, id="avg_ceil_no_padding"),
    pytest.param(nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), 6, id="avg_ceil_exclude_pad"),
    pytest.param(nn.AvgPool2d(3, 1, 1), 6, id="avg_count_include_pad"),
    pytest.param(nn.AvgPool2d(3, 1, 1, count_include_pad=False), 6, id="avg_count_exclude_pad"),
    pytest.param(nn.AdaptiveAvgPool2d((3, 2)), 7, id="adaptive_uneven"),
    pytest.param(nn.AdaptiveAvgPool2d(2), 8, id="adaptive_even"),
    pytest.param(nn.AdaptiveAvgPool2d(1), 5, id="adaptive_global"),
])
def test_pooling_matches_eager_and_refits(pool, size):
    check_converter(ConvPool(pool), torch.randn(1, 3, size, size))


@pytest.mark.parametrize("size, k, s, pre, post, mode", [
    pytest.param(5, 2, 2, 1, 1, "EXPLICIT_ROUND_UP", id="round_up_keeps_window_in_padding"),
    pytest.param(6, 3, 2, 0, 0, "EXPLICIT_ROUND_UP", id="round_up_overhang"),
    pytest.param(7, 3, 2, 1, 2, "EXPLICIT_ROUND_DOWN", id="asymmetric_padding"),
])
def test_interpreter_pools_with_tensorrt_output_size(size, k, s, pre, post, mode):
    """TensorRT's EXPLICIT_ROUND_UP gives ceil((in + pre + post - k) / s) + 1 windows, without
    PyTorch's rule that drops a last window starting in the padding; the interpreter must produce
    the shape TensorRT inferred (the reference engine checks every layer against it) and PyTorch's
    values where the windows agree."""
    from refitcore import _trt
    from refitcore.backends.reference import ReferenceEngine
    from refitcore.conversion.network_reader import read_network

    trt = _trt.trt()
    network = trt.Builder(_trt.logger()).create_network(0)
    x_in = network.add_input("x", trt.float32, (1, 1, size, size))
    layer = network.add_pooling_nd(x_in, trt.PoolingType.MAX, (k, k))
    layer.name = "pool"
    layer.stride_nd, layer.pre_padding, layer.post_padding = (s, s), (pre, pre), (post, post)
    layer.padding_mode = getattr(trt.PaddingMode, mode)
    layer.get_output(0).name = "y"
    network.mark_output(layer.get_output(0))
    x = torch.randn(1, 1, size, size)
    (y,) = ReferenceEngine(read_network(network)).run([x])
    span = size + pre + post - k
    n_out = (-(-span // s) if mode == "EXPLICIT_ROUND_UP" else span // s) + 1
    assert tuple(y.shape) == (1, 1, n_out, n_out)
    padded = torch.nn.functional.pad(x, (pre, post, pre, post), value=float("-inf"))
    floor = torch.nn.functional.max_pool2d(padded, k, s)
    n = floor.shape[-1]
    assert torch.equal(y[..., :n, :n], floor)
