"""Dynamic shapes at the backend edge: the reference interpreter's shape layers and its per-layer
shape check with -1 dims, and the TensorRT backend's optimization profiles (built on a real
TensorRT builder config, which works without a GPU) and run-time input shapes (a fake context)."""
from __future__ import annotations

import copy

import pytest
import torch

import refitcore
from refitcore import _trt
from refitcore.backends.reference import ReferenceEngine
from refitcore.backends.tensorrt_shapes import add_profiles, set_input_shapes
from refitcore.capture.shapes import ShapeRangeError, resolve_dynamic_shapes
from tests.dynamic_models import Flat


@pytest.fixture(scope="module")
def flat():
    model = Flat().eval()
    return model, refitcore.compile(model, torch.randn(2, 3, 4), backend="reference", dynamic_shapes={0: {0: (1, 6)}})


def test_reference_interprets_shape_layers(flat):
    model, engine = flat
    types = {layer["type"] for layer in engine._impl.plan["layers"]}
    assert {"SHAPE", "GATHER", "CONCATENATION", "SHUFFLE"} <= types
    for b in (1, 4, 6):
        x = torch.randn(b, 3, 4)
        torch.testing.assert_close(engine(x), model(x))


def test_per_layer_check_still_checks_the_known_dims(flat):
    """-1 dims are skipped, the known ones are still compared: a plan whose recorded static size is
    wrong is refused at run time."""
    _, engine = flat
    header, arrays = engine._impl.serialize()
    plan = copy.deepcopy(header["plan"])
    layer = next(entry for entry in plan["layers"] if entry["type"] == "SHUFFLE")
    assert layer["outputs"][0]["shape"] == [-1, 12]
    layer["outputs"][0]["shape"] = [-1, 13]
    broken = ReferenceEngine(plan, arrays)
    with pytest.raises(RuntimeError, match=r"produced shape \[3, 12\] where TensorRT inferred \[-1, 13\]"):
        broken.run([torch.randn(3, 3, 4)])


def test_a_wrong_shape_constant_is_caught(flat):
    """The shape arithmetic is data in the plan: a wrong constant in it breaks the run, loudly."""
    _, engine = flat
    header, arrays = engine._impl.serialize()
    plan = copy.deepcopy(header["plan"])
    const = next(entry for entry in plan["layers"] if "values" in entry["attrs"] and entry["attrs"]["values"] == [12])
    const["attrs"]["values"] = [6]
    broken = ReferenceEngine(plan, arrays)
    with pytest.raises(RuntimeError, match=r"shape .\[3, 6\]. is invalid"):
        broken.run([torch.randn(3, 3, 4)])


def _profiles():
    _, sp = resolve_dynamic_shapes(Flat(), (torch.zeros(2, 3, 4),), {0: {0: (1, 6)}},
                                   profiles=[{0: {0: (1, 2, 3)}}, {0: {0: (4, 5, 6)}}])
    return sp.__class__(("x",), sp.ranges, sp.profiles, sp.dim_names)


@pytest.mark.skipif(not _trt.available(), reason="needs the TensorRT Python API")
def test_profiles_go_on_a_real_builder_config():
    trt = _trt.trt()
    builder = trt.Builder(_trt.logger())
    network = builder.create_network(0)
    network.add_input("x", trt.float32, trt.Dims((-1, 3, 4)))
    config = builder.create_builder_config()
    assert add_profiles(builder, config, _profiles()) == 2
    assert config.num_optimization_profiles == 2
    assert add_profiles(builder, builder.create_builder_config(), None) == 0


class FakeContext:
    def __init__(self, refuse=()):
        self.calls = []
        self.refuse = refuse

    def set_optimization_profile_async(self, index, stream):
        self.calls.append(("profile", index, stream))
        return True

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, shape))
        return name not in self.refuse


def test_run_sets_the_profile_then_every_input_shape():
    ctx = FakeContext()
    sp = _profiles()
    assert set_input_shapes(ctx, sp, ["x"], [(2, 3, 4)], current=0, stream_handle=7) == 0
    assert ctx.calls == [("shape", "x", (2, 3, 4))]
    ctx.calls.clear()
    assert set_input_shapes(ctx, sp, ["x"], [(5, 3, 4)], current=0, stream_handle=7) == 1
    assert ctx.calls == [("profile", 1, 7), ("shape", "x", (5, 3, 4))]


def test_run_refuses_outside_every_profile_before_touching_the_context():
    ctx = FakeContext()
    with pytest.raises(ShapeRangeError, match=r"input 'x': dimension 0 has size 7, outside .*\[1, 3\]"):
        set_input_shapes(ctx, _profiles(), ["x"], [(7, 3, 4)], current=0, stream_handle=0)
    assert ctx.calls == []


def test_a_shape_tensorrt_refuses_is_an_error_with_its_words():
    with pytest.raises(RuntimeError, match="TensorRT refused shape \\[2, 3, 4\\] for input 'x': said no"):
        set_input_shapes(FakeContext(refuse=("x",)), _profiles(), ["x"], [(2, 3, 4)], current=0, stream_handle=0,
                         said=lambda: ["said no"])


def test_tensorrt_input_check_accepts_the_range_and_names_what_is_outside():
    from refitcore.backends.tensorrt import check_inputs

    specs = [{"name": "x", "shape": [-1, 3, 4], "dtype": "FLOAT"}]
    check_inputs(specs, [torch.zeros(5, 3, 4)], _profiles())
    with pytest.raises(ShapeRangeError, match=r"input 'x': dimension 0 has size 7"):
        check_inputs(specs, [torch.zeros(7, 3, 4)], _profiles())
    with pytest.raises(TypeError, match="expected dtype"):
        check_inputs(specs, [torch.zeros(2, 3, 4, dtype=torch.float64)], _profiles())


@pytest.mark.parametrize("expr, fn", [
    ("2*s0 + 3", lambda n: 2 * n + 3),
    ("FloorDiv(s0, 3)", lambda n: n // 3),
    ("Mod(s0, 3)", lambda n: n % 3),
    ("CeilDiv(s0, 4)", lambda n: -(-n // 4)),
    ("Max(s0, 6)", lambda n: max(n, 6)),
    ("Min(s0, 6)*s0", lambda n: min(n, 6) * n),
])
def test_size_expressions_become_network_arithmetic(expr, fn):
    """Every sympy form torch.export writes sizes in, computed by the network at run time."""
    import sympy
    from torch.utils._sympy import functions as symfn

    from refitcore.capture.shapes import ShapeProfiles
    from refitcore.conversion.context import ConversionContext
    from refitcore.conversion.network_reader import read_network
    from refitcore.conversion.shape_tensors import SymbolTable, sym_value
    from refitcore.conversion.weight_map import WeightMap

    trt = _trt.trt()
    network = trt.Builder(_trt.logger()).create_network(0)
    x = network.add_input("x", trt.float32, trt.Dims((-1, 2)))
    node = type("Node", (), {"name": "n", "target": "size"})()
    ctx = ConversionContext(network=network, weight_map=WeightMap(), layer_names={"n": "size"},
                            fusions_conv_to_bn={}, node=node, symbols=SymbolTable())
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    ctx.symbols.dims[s0] = (x, 0)
    parsed = sympy.sympify(expr, locals={"s0": s0, "FloorDiv": symfn.FloorDiv, "Mod": symfn.Mod,
                                         "CeilDiv": symfn.CeilDiv, "Max": symfn.Max, "Min": symfn.Min})
    out = sym_value(ctx, parsed).tensor
    out.name = "size"
    network.mark_output(out)
    plan = read_network(network)
    plan["profiles"] = ShapeProfiles(("x",), (((1, 4, 16), (2, 2, 2)),), ((((1, 4, 16), (2, 2, 2)),),),
                                     (("n", None),)).to_json()
    engine = ReferenceEngine(plan)
    for n in (1, 4, 7, 16):
        assert engine.run([torch.zeros(n, 2)])[0].tolist() == [fn(n)], (expr, n)
