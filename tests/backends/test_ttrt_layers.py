"""Layers that Torch-TensorRT's converters emit and our own converters do not: networks built with
the TensorRT Python API, read into a plan and run by the reference interpreter, compared with
PyTorch (or with TensorRT's documented formula where PyTorch has no twin)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refitcore import _trt
from refitcore.backends.reference import Loop, ReferenceEngine, execution_order, execution_units, load_engine
from refitcore.conversion.network_reader import read_network


def _network(trt):
    """A fresh network definition."""
    return trt.Builder(_trt.logger()).create_network(0)


@pytest.fixture
def net(real_trt):
    return _network(real_trt)


def _run(network, *inputs):
    """The network's outputs on the reference engine; the engine saved (through JSON) and loaded
    again gives the same outputs."""
    engine = ReferenceEngine(read_network(network))
    outs = engine.run(list(inputs))
    header, arrays = engine.serialize()
    again = load_engine(json.loads(json.dumps(header)), arrays).run(list(inputs))
    assert all(torch.equal(a, b) or (torch.isnan(a).any() and torch.allclose(a, b, equal_nan=True))
               for a, b in zip(outs, again))
    return outs


def _input(trt, network, name, x):
    dtype = {torch.float32: trt.float32, torch.bool: trt.bool, torch.int32: trt.int32}[x.dtype]
    return network.add_input(name, dtype, tuple(x.shape))


def _int_constant(network, values, dtype=np.int64):
    arr = np.array(values, dtype=dtype)
    return network.add_constant(arr.shape, arr).get_output(0)


def _out(network, layer, name="y"):
    layer.get_output(0).name = name
    network.mark_output(layer.get_output(0))


# ---- UNSQUEEZE / SQUEEZE ---------------------------------------------------------------------
@pytest.mark.parametrize("axes", [[0], [1, -1], [-1], [4, 0], [2, 3]])
def test_unsqueeze_inserts_size_one_axes_at_output_positions(real_trt, net, axes):
    x = torch.randn(2, 3, 4)
    layer = net.add_unsqueeze(_input(real_trt, net, "x", x), _int_constant(net, axes))
    layer.name = "unsq"
    _out(net, layer)
    (y,) = _run(net, x)
    want = x
    for d in sorted(a % (x.dim() + len(axes)) for a in axes):
        want = want.unsqueeze(d)
    assert y.shape == want.shape and torch.equal(y, want)


@pytest.mark.parametrize("axes", [[0], [0, -1], [2]])
def test_squeeze_removes_the_given_size_one_axes(real_trt, net, axes):
    x = torch.randn(1, 3, 1, 1)
    layer = net.add_squeeze(_input(real_trt, net, "x", x), _int_constant(net, axes, np.int32))
    _out(net, layer)
    (y,) = _run(net, x)
    drop = {a % x.dim() for a in axes}
    assert list(y.shape) == [n for d, n in enumerate(x.shape) if d not in drop]
    assert torch.equal(y.reshape(-1), x.reshape(-1))


def test_squeeze_of_an_axis_longer_than_one_names_the_layer():
    plan = {"inputs": [{"name": "x", "shape": [2, 3], "dtype": "FLOAT"}],
            "outputs": [{"name": "y", "shape": [3], "dtype": "FLOAT"}],
            "layers": [{"name": "axes", "type": "CONSTANT", "inputs": [], "weights": {},
                        "outputs": [{"name": "a", "shape": [1], "dtype": "INT64"}],
                        "attrs": {"shape": [1], "values": [0]}},
                       {"name": "sq", "type": "SQUEEZE", "inputs": ["x", "a"], "attrs": {}, "weights": {},
                        "outputs": [{"name": "y", "shape": [3], "dtype": "FLOAT"}]}]}
    with pytest.raises(ValueError, match=r"layer 'sq': squeeze of axes \[0\] of shape \[2, 3\]"):
        ReferenceEngine(plan).run([torch.randn(2, 3)])


# ---- SHUFFLE of a rank-0 tensor -------------------------------------------------------------------
def test_shuffle_to_and_from_rank_zero(real_trt, net):
    x = torch.tensor([2.5])
    to_scalar = net.add_shuffle(_input(real_trt, net, "x", x))
    to_scalar.reshape_dims = ()
    scalar = to_scalar.get_output(0)
    same = net.add_shuffle(scalar)   # rank 0 -> rank 0 (transposes of no axes)
    back = net.add_shuffle(same.get_output(0))
    back.reshape_dims = (1, 1)
    _out(net, same, "scalar")
    _out(net, back, "y")
    scalar_out, y = _run(net, x)
    assert scalar_out.shape == () and float(scalar_out) == 2.5
    assert y.shape == (1, 1) and float(y) == 2.5


# ---- dependency order ---------------------------------------------------------------------------
def test_a_layer_reading_a_tensor_made_by_a_later_layer_runs_after_it(real_trt, net):
    """Torch-TensorRT sets a shuffle's shape input to a tensor made by a layer it adds afterwards."""
    x = torch.randn(2, 3, 4)
    x_in = _input(real_trt, net, "x", x)
    flat = net.add_shuffle(x_in)
    flat.name = "flatten"
    shape = net.add_constant((2,), np.array([6, 4], dtype=np.int64))
    shape.name = "shape_made_later"
    flat.set_input(1, shape.get_output(0))
    relu = net.add_activation(flat.get_output(0), real_trt.ActivationType.RELU)
    _out(net, relu)
    plan = read_network(net)
    assert [layer["name"] for layer in plan["layers"]][:2] == ["flatten", "shape_made_later"]
    assert execution_order(plan)[:2] == [1, 0]
    (y,) = ReferenceEngine(plan).run([x])
    assert torch.equal(y, torch.relu(x.reshape(6, 4)))
    # a saved plan in TensorRT's (non-dependency) order loads and runs the same
    engine = ReferenceEngine(read_network(net))
    header, arrays = engine.serialize()
    assert torch.equal(load_engine(copy.deepcopy(header), arrays).run([x])[0], y)


def _chain_plan(order):
    """x -> a -> b -> c (identities), with the layers listed in ``order``."""
    t = lambda name: {"name": name, "shape": [2], "dtype": "FLOAT"}  # noqa: E731
    layers = {"a": ("x", "ta"), "b": ("ta", "tb"), "c": ("tb", "tc")}
    return {"inputs": [t("x")], "outputs": [t("tc")], "weight_locations": {},
            "layers": [{"name": n, "type": "IDENTITY", "inputs": [layers[n][0]], "outputs": [t(layers[n][1])],
                        "attrs": {}, "weights": {}} for n in order]}


def test_execution_order_sorts_any_listing_and_names_a_cycle():
    assert execution_order(_chain_plan("cba")) == [2, 1, 0]
    assert execution_order(_chain_plan("bac")) == [1, 0, 2]
    plan = _chain_plan("abc")
    plan["layers"][0]["inputs"] = ["tc"]     # a reads c: a -> b -> c -> a
    with pytest.raises(ValueError, match=r"cycle .*'a' <- 'c' <- 'b' <- 'a'"):
        execution_order(plan)
    with pytest.raises(ValueError, match=r"reference plan: the layers form a cycle"):
        load_engine({"backend": "reference", "plan": plan}, {})
    plan["layers"][0]["inputs"] = ["nowhere"]
    with pytest.raises(ValueError, match=r"layer 0 \('a'\): input 'nowhere' is produced by no layer"):
        load_engine({"backend": "reference", "plan": plan}, {})


# ---- RESIZE by scales, by a shape tensor; every mode -------------------------------------------------
def _resize(trt, net, x, scales, mode, transform, rounding="FLOOR", **attrs):
    layer = net.add_resize(_input(trt, net, "x", x))
    layer.scales = scales
    layer.resize_mode = getattr(trt.InterpolationMode, mode)
    layer.coordinate_transformation = getattr(trt.ResizeCoordinateTransformation, transform)
    layer.nearest_rounding = getattr(trt.ResizeRoundMode, rounding)
    for k, v in attrs.items():
        setattr(layer, k, v)
    _out(net, layer)
    return _run(net, x)[0]


def _size(x, scales):
    return [int(np.floor(np.float32(n) * np.float32(s))) for n, s in zip(x.shape, scales)]


@pytest.mark.parametrize("mode, transform, torch_kw", [
    ("NEAREST", "ASYMMETRIC", dict(mode="nearest")),
    ("LINEAR", "HALF_PIXEL", dict(mode="bilinear", align_corners=False)),
    ("LINEAR", "ALIGN_CORNERS", dict(mode="bilinear", align_corners=True)),
    ("CUBIC", "HALF_PIXEL", dict(mode="bicubic", align_corners=False)),
    ("CUBIC", "ALIGN_CORNERS", dict(mode="bicubic", align_corners=True)),
])
@pytest.mark.parametrize("scales", [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.5, 0.7], [1.0, 1.0, 0.5, 3.0]])
def test_resize_by_scales_matches_torch_at_the_same_size(real_trt, net, mode, transform, torch_kw, scales):
    """TensorRT's coordinate transformations use the input and output lengths (not the scale), as
    PyTorch does when given the output size."""
    x = torch.randn(1, 2, 5, 6)
    y = _resize(real_trt, net, x, scales, mode, transform)
    size = _size(x, scales)
    assert list(y.shape) == size
    torch.testing.assert_close(y, F.interpolate(x, size=size[2:], **torch_kw), rtol=1e-5, atol=1e-5)


def test_resize_by_scales_takes_float32_lengths(real_trt, net):
    """20 * 2.3 in float32 is 46, in float64 45.99...: TensorRT infers 46 (checked by the engine)."""
    x = torch.randn(1, 20)
    y = _resize(real_trt, net, x, [1.0, 2.3], "NEAREST", "ASYMMETRIC")
    assert list(y.shape) == [1, 46]


@pytest.mark.parametrize("transform", ["ASYMMETRIC", "HALF_PIXEL", "ALIGN_CORNERS"])
@pytest.mark.parametrize("rounding", ["FLOOR", "CEIL", "HALF_UP", "HALF_DOWN"])
def test_nearest_resize_rounds_the_documented_source_coordinate(real_trt, net, transform, rounding):
    x = torch.arange(7, dtype=torch.float32).reshape(1, 7)
    y = _resize(real_trt, net, x, [1.0, 1.6], "NEAREST", transform, rounding)
    n_in, n_out = 7, y.shape[1]
    ratio = n_in / n_out
    src = {"ASYMMETRIC": lambda i: i * ratio, "HALF_PIXEL": lambda i: (i + 0.5) * ratio - 0.5,
           "ALIGN_CORNERS": lambda i: i * (n_in - 1) / (n_out - 1)}[transform]
    rnd = {"FLOOR": math.floor, "CEIL": math.ceil, "HALF_UP": lambda v: math.floor(v + 0.5),
           "HALF_DOWN": lambda v: math.ceil(v - 0.5)}[rounding]
    want = [min(max(rnd(src(i)), 0), n_in - 1) for i in range(n_out)]
    assert y.reshape(-1).tolist() == [float(v) for v in want]


def test_nearest_exact_is_half_pixel_with_half_up_rounding(real_trt, net):
    x = torch.randn(1, 3, 5, 7)
    y = _resize(real_trt, net, x, [1.0, 1.0, 1.7, 0.6], "NEAREST", "HALF_PIXEL", "HALF_UP")
    torch.testing.assert_close(y, F.interpolate(x, size=y.shape[2:], mode="nearest-exact"), rtol=0, atol=0)


def test_cubic_resize_coefficient_and_exclude_outside(real_trt, net):
    """A constant image stays constant with ``exclude_outside`` (the weights of the neighbours
    inside renormalized) and away from the border both agree; another coefficient changes values."""
    x = torch.randn(1, 1, 6, 6)
    a = _resize(real_trt, net, x, [1.0, 1.0, 2.0, 2.0], "CUBIC", "HALF_PIXEL", exclude_outside=True)
    torch.testing.assert_close(a[..., 4:-4, 4:-4], F.interpolate(x, scale_factor=2, mode="bicubic")[..., 4:-4, 4:-4])
    assert not torch.allclose(a[..., :2, :], F.interpolate(x, scale_factor=2, mode="bicubic")[..., :2, :])
    net2 = _network(real_trt)
    ones = _resize(real_trt, net2, torch.full((1, 1, 4, 4), 3.0), [1.0, 1.0, 2.5, 2.5], "CUBIC", "HALF_PIXEL",
                   exclude_outside=True)
    torch.testing.assert_close(ones, torch.full_like(ones, 3.0))
    net3 = _network(real_trt)
    b = _resize(real_trt, net3, x, [1.0, 1.0, 2.0, 2.0], "CUBIC", "HALF_PIXEL", cubic_coeff=-0.5)
    assert not torch.allclose(b, F.interpolate(x, scale_factor=2, mode="bicubic"))


def test_resize_shape_from_a_shape_tensor(real_trt, net):
    x = torch.randn(1, 2, 3, 3)
    layer = net.add_resize(_input(real_trt, net, "x", x))
    layer.set_input(1, _int_constant(net, [1, 2, 6, 4]))
    layer.resize_mode = real_trt.InterpolationMode.LINEAR
    layer.coordinate_transformation = real_trt.ResizeCoordinateTransformation.ALIGN_CORNERS
    _out(net, layer)
    (y,) = _run(net, x)
    torch.testing.assert_close(y, F.interpolate(x, size=(6, 4), mode="bilinear", align_corners=True))


def test_cubic_resize_of_a_third_axis_is_refused_by_name(real_trt, net):
    with pytest.raises(ValueError, match="CUBIC resize changes at most the 2 innermost axes"):
        _resize(real_trt, net, torch.randn(1, 2, 3, 3), [1.0, 2.0, 2.0, 2.0], "CUBIC", "HALF_PIXEL")


# ---- IAttention ----------------------------------------------------------------------------------------
def _attention(trt, net, q, k, v, *, causal="NONE", mask=None, norm="SOFTMAX", decomposable=False):
    layer = net.add_attention_v2(_input(trt, net, "q", q), _input(trt, net, "k", k), _input(trt, net, "v", v),
                                 getattr(trt.AttentionNormalizationOp, norm), getattr(trt.CausalMaskKind, causal))
    if mask is not None:
        layer.mask = _input(trt, net, "mask", mask)
    layer.decomposable = decomposable
    layer.name = "attn"
    out = layer.get_output(0)
    out.name = "y"
    net.mark_output(out)
    plan = read_network(net)
    assert [t["type"] for t in plan["layers"]] == ["ATTENTION_INPUT", "ATTENTION_OUTPUT"]
    return ReferenceEngine(plan).run([q, k, v] + ([] if mask is None else [mask]))[0]


def _qkv(heads_q=2, heads_kv=2, s_q=3, s_kv=5, h=4):
    torch.manual_seed(0)
    return torch.randn(2, heads_q, s_q, h), torch.randn(2, heads_kv, s_kv, h), torch.randn(2, heads_kv, s_kv, h)


@pytest.mark.parametrize("decomposable", [False, True])
def test_attention_is_unscaled_softmax_attention(real_trt, net, decomposable):
    q, k, v = _qkv()
    y = _attention(real_trt, net, q, k, v, decomposable=decomposable)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, scale=1.0))


def test_attention_without_normalization(real_trt, net):
    q, k, v = _qkv()
    y = _attention(real_trt, net, q, k, v, norm="NONE")
    torch.testing.assert_close(y, (q @ k.transpose(-1, -2)) @ v)


def test_attention_bool_mask_attends_where_true(real_trt, net):
    q, k, v = _qkv()
    mask = torch.rand(1, 2, 3, 5) > 0.4
    mask[..., 0] = True   # every query attends somewhere
    y = _attention(real_trt, net, q, k, v, mask=mask)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0))


def test_attention_float_mask_is_added_to_the_scores(real_trt, net):
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 3, 5)
    y = _attention(real_trt, net, q, k, v, mask=mask)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0))


def test_attention_causal_upper_left_and_lower_right(real_trt, net):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = _qkv(s_q=3, s_kv=5)
    upper = _attention(real_trt, net, q, k, v, causal="UPPER_LEFT")
    torch.testing.assert_close(upper, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0))
    net2 = _network(real_trt)
    lower = _attention(real_trt, net2, q, k, v, causal="LOWER_RIGHT")
    torch.testing.assert_close(lower, F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 5),
                                                                     scale=1.0))
    assert not torch.allclose(upper, lower)


def test_attention_grouped_query_heads(real_trt, net):
    q, k, v = _qkv(heads_q=4, heads_kv=2)
    y = _attention(real_trt, net, q, k, v, causal="LOWER_RIGHT")
    from torch.nn.attention.bias import causal_lower_right

    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 5),
                                                                 scale=1.0, enable_gqa=True))


def test_attention_with_sequence_lengths_is_refused_by_name(real_trt, net):
    q, k, v = _qkv()
    layer = net.add_attention_v2(_input(real_trt, net, "q", q), _input(real_trt, net, "k", k),
                                 _input(real_trt, net, "v", v), real_trt.AttentionNormalizationOp.SOFTMAX,
                                 real_trt.CausalMaskKind.NONE)
    layer.key_value_lengths = net.add_input("lengths", real_trt.int32, (2,))
    _out(net, layer)
    with pytest.raises(NotImplementedError, match="attention with a key/value lengths input"):
        ReferenceEngine(read_network(net)).run([q, k, v, torch.tensor([5, 4], dtype=torch.int32)])


# ---- PARAMETRIC_RELU -------------------------------------------------------------------------------------
def test_parametric_relu_with_a_per_channel_slope(real_trt, net):
    x = torch.randn(2, 3, 4, 4)
    slope = np.array([0.1, -0.5, 2.0], dtype=np.float32).reshape(1, 3, 1, 1)
    const = net.add_constant(slope.shape, slope)
    const.name = "slope"
    layer = net.add_parametric_relu(_input(real_trt, net, "x", x), const.get_output(0))
    _out(net, layer)
    engine = ReferenceEngine(read_network(net))
    assert engine.weight_names() == ["slope CONSTANT"]   # the slope is a refittable weight
    (y,) = engine.run([x])
    torch.testing.assert_close(y, F.prelu(x, torch.from_numpy(slope.reshape(-1))))


# ---- loops (ILoop: TRIP_LIMIT, ITERATOR, RECURRENCE, LOOP_OUTPUT) -----------------------------------------
def _running_sum(trt, net, x, axis, *, reverse=False, kind="CONCATENATE", trip_kind="COUNT"):
    """Torch-TensorRT's cumsum: a loop over ``axis`` adding each slice to a recurrence."""
    x_in = _input(trt, net, "x", x)
    loop = net.add_loop()
    loop.name = "cumsum_loop"
    count = _int_constant(net, x.shape[axis], np.int32)
    loop.add_trip_limit(count, getattr(trt.TripLimit, trip_kind))
    item = loop.add_iterator(x_in, axis, reverse)
    zeros = np.zeros([n for d, n in enumerate(x.shape) if d != axis], dtype=np.float32)
    running = loop.add_recurrence(net.add_constant(zeros.shape, zeros).get_output(0))
    total = net.add_elementwise(item.get_output(0), running.get_output(0), trt.ElementWiseOperation.SUM)
    running.set_input(1, total.get_output(0))
    if kind == "LAST_VALUE":
        out = loop.add_loop_output(total.get_output(0), trt.LoopOutput.LAST_VALUE)
    else:
        out = loop.add_loop_output(total.get_output(0), getattr(trt.LoopOutput, kind), axis)
        out.set_input(1, count)
    _out(net, out)
    return _run(net, x)[0]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_loop_concatenating_a_running_sum_is_cumsum(real_trt, net, axis):
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(_running_sum(real_trt, net, x, axis), torch.cumsum(x, axis))


def test_loop_iterating_in_reverse_and_reverse_output(real_trt, net):
    x = torch.randn(4, 3)
    y = _running_sum(real_trt, net, x, 0, reverse=True)   # y[i] = sum of x[n-1..n-1-i]
    torch.testing.assert_close(y, torch.cumsum(x.flip(0), 0))
    y = _running_sum(real_trt, _network(real_trt), x, 0, reverse=True, kind="REVERSE")
    torch.testing.assert_close(y, torch.cumsum(x.flip(0), 0).flip(0))   # reverse cumsum


def test_loop_last_value_is_the_final_recurrence(real_trt, net):
    x = torch.randn(4, 3)
    torch.testing.assert_close(_running_sum(real_trt, net, x, 0, kind="LAST_VALUE"), x.sum(0))


def test_loop_with_a_while_trip_limit_is_refused_by_name(real_trt, net):
    x = torch.randn(4, 3)
    x_in = _input(real_trt, net, "x", x)
    loop = net.add_loop()
    loop.name = "while_loop"
    flag = net.add_input("go", real_trt.bool, ())
    loop.add_trip_limit(flag, real_trt.TripLimit.WHILE)
    running = loop.add_recurrence(x_in)
    twice = net.add_elementwise(running.get_output(0), running.get_output(0), real_trt.ElementWiseOperation.SUM)
    running.set_input(1, twice.get_output(0))
    _out(net, loop.add_loop_output(twice.get_output(0), real_trt.LoopOutput.LAST_VALUE))
    with pytest.raises(NotImplementedError, match="loop 'while_loop': trip limit WHILE"):
        _run(net, x, torch.tensor(False))


def test_loop_members_are_found_from_iterators_and_recurrences(real_trt, net):
    """The body (the layers reading the iterator or recurrence) runs every iteration; a layer
    reading the loop's output runs once, after it."""
    x = torch.randn(3, 2)
    _running_sum(real_trt, net, x, 0)
    plan = read_network(net)
    units = execution_units(plan)
    loops = [u for u in units if isinstance(u, Loop)]
    assert len(loops) == 1 and loops[0].name == "cumsum_loop"
    body_types = sorted(plan["layers"][i]["type"] for i in loops[0].layers)
    assert body_types == ["ELEMENTWISE", "ITERATOR", "LOOP_OUTPUT", "RECURRENCE", "TRIP_LIMIT"]


# ---- SCATTER, NON_ZERO, GATHER ND, SLICE REFLECT ---------------------------------------------------------
def test_scatter_element_is_torch_scatter(real_trt, net):
    data, updates = torch.randn(3, 4), torch.randn(2, 4)
    index = torch.tensor([[2, 0, 1, 2], [0, 1, 2, 1]], dtype=torch.int32)
    layer = net.add_scatter(_input(real_trt, net, "data", data), _input(real_trt, net, "index", index),
                            _input(real_trt, net, "updates", updates), real_trt.ScatterMode.ELEMENT)
    layer.axis = 0
    _out(net, layer)
    (y,) = _run(net, data, index, updates)
    assert torch.equal(y, data.scatter(0, index.long(), updates))


def test_scatter_nd_replaces_the_addressed_slices(real_trt, net):
    data, updates = torch.randn(4, 3, 2), torch.randn(2, 2)
    index = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)   # two (row, column) pairs: slices of [2]
    layer = net.add_scatter(_input(real_trt, net, "data", data), _input(real_trt, net, "index", index),
                            _input(real_trt, net, "updates", updates), real_trt.ScatterMode.ND)
    _out(net, layer)
    (y,) = _run(net, data, index, updates)
    want = data.clone()
    want[3, 1], want[0, 2] = updates[0], updates[1]
    assert torch.equal(y, want)
    with pytest.raises(ValueError, match="writes one slice twice"):
        _run(net, data, torch.tensor([[3, 1], [3, 1]], dtype=torch.int32), updates)


def test_non_zero_gives_coordinates_rank_by_count(real_trt, net):
    x = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -1.0]])
    _out(net, net.add_non_zero(_input(real_trt, net, "x", x)))
    (y,) = _run(net, x)
    assert y.dtype == torch.int32 and y.tolist() == [[0, 1, 1], [1, 0, 2]]


@pytest.mark.parametrize("batch", [0, 1])
def test_gather_nd_reads_coordinates(real_trt, net, batch):
    data = torch.randn(2, 3, 4)
    index = torch.tensor([[[1, 3], [0, 0], [2, 1]], [[0, 2], [2, 3], [1, 1]]], dtype=torch.int32)
    if not batch:
        index = torch.tensor([[1, 2, 3], [0, 0, 1]], dtype=torch.int32)
    layer = net.add_gather_v2(_input(real_trt, net, "data", data), _input(real_trt, net, "index", index),
                              real_trt.GatherMode.ND)
    layer.num_elementwise_dims = batch
    _out(net, layer)
    (y,) = _run(net, data, index)
    if batch:
        want = torch.stack([data[b][index[b, :, 0].long(), index[b, :, 1].long()] for b in range(2)])
    else:
        want = data[index[:, 0].long(), index[:, 1].long(), index[:, 2].long()]
    assert torch.equal(y, want)


def test_slice_reflect_is_reflection_padding(real_trt, net):
    """Torch-TensorRT's reflection_pad: a REFLECT slice starting before the input."""
    x = torch.randn(1, 2, 5, 4)
    layer = net.add_slice(_input(real_trt, net, "x", x), (0, 0, -3, -2), (1, 2, 11, 9), (1, 1, 1, 1))
    layer.mode = real_trt.SampleMode.REFLECT
    _out(net, layer)
    (y,) = _run(net, x)
    torch.testing.assert_close(y, F.pad(x, (2, 3, 3, 3), mode="reflect"), rtol=0, atol=0)


def test_a_saved_plan_with_a_loop_loads_and_a_malformed_one_is_refused(real_trt, net):
    x = torch.randn(3, 2)
    y = _running_sum(real_trt, net, x, 0)
    header, arrays = ReferenceEngine(read_network(net)).serialize()
    assert torch.equal(load_engine(copy.deepcopy(header), arrays).run([x])[0], y)
    for layer in header["plan"]["layers"]:
        if layer["type"] == "TRIP_LIMIT":
            del layer["attrs"]["loop"]
    with pytest.raises(ValueError, match=r"reference plan: layer \d+ \(.*\): a TRIP_LIMIT layer names no loop"):
        load_engine(header, arrays)


def test_attention_row_with_every_key_masked_gives_zero_as_pytorch(real_trt, net):
    """Left padding masks every key of a padded query row: 0 (PyTorch's convention), not NaN."""
    q, k, v = _qkv()
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 0, :] = False
    y = _attention(real_trt, net, q, k, v, mask=mask)
    assert torch.equal(y[:, :, 0], torch.zeros_like(y[:, :, 0]))
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0))


def test_attention_mask_without_normalization_is_refused(real_trt, net):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="a mask or causal mask without normalization"):
        _attention(real_trt, net, q, k, v, norm="NONE", causal="UPPER_LEFT")


def test_a_negative_gather_index_is_refused_naming_it(real_trt, net):
    """TensorRT's Gather page allows indices in [0, d) only (Torch-TensorRT's select of index -1,
    e.g. an RNN's last step, emits one)."""
    x = torch.randn(2, 5)
    _out(net, net.add_gather(_input(real_trt, net, "x", x), _int_constant(net, -1, np.int32), 1))
    with pytest.raises(ValueError, match=r"gather index -1 out of range \[0, 5\)"):
        _run(net, x)


def test_nested_loops_are_refused_naming_both(real_trt, net):
    x = torch.randn(2, 3, 4)
    x_in = _input(real_trt, net, "x", x)
    outer, inner = net.add_loop(), net.add_loop()
    outer.name, inner.name = "outer", "inner"
    outer.add_trip_limit(_int_constant(net, 2, np.int32), real_trt.TripLimit.COUNT)
    rows = outer.add_iterator(x_in, 0, False).get_output(0)          # [3, 4] per outer step
    inner.add_trip_limit(_int_constant(net, 3, np.int32), real_trt.TripLimit.COUNT)
    item = inner.add_iterator(rows, 0, False)                          # [4] per inner step
    inner_out = inner.add_loop_output(item.get_output(0), real_trt.LoopOutput.LAST_VALUE)
    _out(net, outer.add_loop_output(inner_out.get_output(0), real_trt.LoopOutput.LAST_VALUE))
    with pytest.raises(NotImplementedError, match=r"is in loops '(inner|outer)' and '(inner|outer)': nested loops"):
        _run(net, x)


@pytest.mark.parametrize("as_input", [False, True])
def test_slice_of_some_axes_only(real_trt, net, as_input):
    """ISliceLayer.axes (or input 5): start/size/stride apply to those axes, the others stay whole."""
    x = torch.randn(2, 5, 6)
    layer = net.add_slice(_input(real_trt, net, "x", x), (1,), (3,), (2,))
    if as_input:
        layer.set_input(5, _int_constant(net, [2], np.int32))
    else:
        layer.axes = (-1,)
    _out(net, layer)
    (y,) = _run(net, x)
    assert torch.equal(y, x[:, :, 1:6:2])


def test_topk_indices_of_the_layers_index_type(real_trt, net):
    x = torch.randn(3, 6)
    layer = net.add_topk(_input(real_trt, net, "x", x), real_trt.TopKOperation.MAX, 2, 1 << 1)
    layer.indices_type = real_trt.int64
    layer.get_output(0).name, layer.get_output(1).name = "values", "indices"
    net.mark_output(layer.get_output(0))
    net.mark_output(layer.get_output(1))
    values, indices = _run(net, x)
    want = torch.topk(x, 2, dim=1)
    assert torch.equal(values, want.values) and indices.dtype == torch.int64
    assert torch.equal(indices, want.indices)


@pytest.mark.parametrize("kind", ["convolution", "deconvolution"])
def test_convolution_kernel_and_bias_given_as_tensors(real_trt, net, kind):
    """Torch-TensorRT sets a computed kernel and bias as a (de)convolution's inputs 1 and 2."""
    x = torch.randn(1, 3, 5, 5)
    shape = (4, 3, 3, 3) if kind == "convolution" else (3, 4, 3, 3)
    kernel, bias = torch.randn(shape), torch.randn(4)
    add = net.add_convolution_nd if kind == "convolution" else net.add_deconvolution_nd
    layer = add(_input(real_trt, net, "x", x), 4, (3, 3), real_trt.Weights(), real_trt.Weights())
    layer.set_input(1, _input(real_trt, net, "kernel", kernel))
    layer.set_input(2, _input(real_trt, net, "bias", bias))
    _out(net, layer)
    (y,) = _run(net, x, kernel, bias)
    fn = F.conv2d if kind == "convolution" else F.conv_transpose2d
    torch.testing.assert_close(y, fn(x, kernel, bias))


def test_a_recurrence_whose_next_value_comes_from_outside_the_loop(real_trt, net):
    """The first iteration reads input 0, every later one the loop-invariant input 1 (made by a
    layer added after the loop): the loop runs after that layer."""
    x, z = torch.randn(3, 2), torch.randn(2)
    x_in, z_in = _input(real_trt, net, "x", x), _input(real_trt, net, "z", z)
    loop = net.add_loop()
    loop.add_trip_limit(_int_constant(net, 3, np.int32), real_trt.TripLimit.COUNT)
    item = loop.add_iterator(x_in, 0, False)
    state = loop.add_recurrence(z_in)
    total = net.add_elementwise(item.get_output(0), state.get_output(0), real_trt.ElementWiseOperation.SUM)
    out = loop.add_loop_output(total.get_output(0), real_trt.LoopOutput.CONCATENATE, 0)
    out.set_input(1, _int_constant(net, 3, np.int32))
    state.set_input(1, net.add_unary(z_in, real_trt.UnaryOperation.NEG).get_output(0))
    _out(net, out)
    (y,) = _run(net, x, z)
    torch.testing.assert_close(y, torch.stack([x[0] + z, x[1] - z, x[2] - z]))
