"""Dynamic shapes: one engine compiled for a range of input shapes is refitted through both paths
and matches eager PyTorch at the range's min, opt and max and at drawn shapes; a shape outside the
range is refused with an error naming the input, the dimension and the range."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import refitcore
from refitcore.capture.shapes import ShapeProfiles, ShapeRangeError, resolve_dynamic_shapes, sample_shapes
from refitcore.errors import UnsupportedOperatorError
from tests.dynamic_models import BATCH, SEQ, TinyAttention, TinyResNet, tiny_bert


def _close(engine, model, inputs, atol=1e-5):
    with torch.no_grad():
        want = model.eval()(*inputs)
    got = engine(*inputs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    engine = refitcore.compile(model, torch.randn(2, 3, 16, 16), backend="reference",
                               dynamic_shapes={"x": {0: BATCH}})
    return model, engine


@pytest.fixture(scope="module")
def attention():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    engine = refitcore.compile(model, torch.randn(2, 8, 16), backend="reference",
                               dynamic_shapes={"x": {1: Dim("seq", min=SEQ[0], max=SEQ[1])}})
    return model, engine


def _batches():
    return [BATCH[0], 2, BATCH[1], 5]     # min, opt (the example), max, and one inside


# ---- the CNN over batch 1..8 -------------------------------------------------------------------
def test_cnn_records_its_profile(cnn):
    _, engine = cnn
    sp = engine.io.profiles
    assert sp.ranges[0][0] == (1, 2, 8) and sp.ranges[0][1:] == ((3, 3, 3), (16, 16, 16), (16, 16, 16))
    assert engine.io.input_shapes == ((2, 3, 16, 16),)
    assert engine.io.output_shapes == ((-1, 5),)


@pytest.mark.parametrize("batch", _batches())
def test_cnn_matches_eager_across_the_range(cnn, batch):
    model, engine = cnn
    _close(engine, model, (torch.randn(batch, 3, 16, 16),))


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_cnn_refit_both_paths_across_the_range(cnn, path):
    _, engine = cnn
    torch.manual_seed(1)
    new = TinyResNet().eval()
    with torch.no_grad():   # non-trivial BatchNorm statistics, so that the fold matters
        for m in new.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    samples = [(torch.randn(b, 3, 16, 16),) for b in _batches()]
    result = refitcore.refit(engine, new, path=path, verify_inputs=samples, audit=True)
    assert result, str(result)
    for (x,) in samples:
        _close(result.engine, new, (x,))


def test_shape_outside_the_profile_is_refused_by_name(cnn):
    _, engine = cnn
    with pytest.raises(ShapeRangeError, match=r"input 'x': dimension 0 has size 9, outside .*range \[1, 8\]"):
        engine(torch.randn(9, 3, 16, 16))
    with pytest.raises(ShapeRangeError, match=r"input 'x': dimension 2 has size 17, outside .*static size 16"):
        engine(torch.randn(2, 3, 17, 16))


def test_wrong_refit_is_caught_at_every_shape(cnn):
    """The check behind the property tests can fail: weights of another model do not pass."""
    model, engine = cnn
    torch.manual_seed(2)
    other = TinyResNet().eval()
    result = refitcore.refit(engine, other, path="cached")
    for b in (1, 8):
        x = torch.randn(b, 3, 16, 16)
        assert not torch.allclose(result.engine(x), model(x), atol=1e-4)


def test_bundle_keeps_its_profiles(cnn, tmp_path):
    model, engine = cnn
    path = tmp_path / "cnn.trtrefit"
    engine.save(path)
    loaded = refitcore.load(path)
    assert loaded.io.profiles == engine.io.profiles
    for b in (1, 8):
        _close(loaded, model, (torch.randn(b, 3, 16, 16),))
    with pytest.raises(ShapeRangeError, match="range \\[1, 8\\]"):
        loaded(torch.randn(9, 3, 16, 16))
    # The fallback path re-exports the given module with the recorded ranges.
    torch.manual_seed(3)
    new = TinyResNet().eval()
    result = refitcore.refit(loaded, new, path="fallback", verify_inputs=[(torch.randn(b, 3, 16, 16),) for b in (1, 7)])
    assert result, str(result)


def test_old_io_spec_without_profiles_reads_as_static(cnn):
    _, engine = cnn
    d = engine.io.to_json()
    d.pop("profiles")
    assert refitcore.IOSpec.from_json(d).profiles is None
    assert refitcore.IOSpec.from_json(engine.io.to_json()) == engine.io


def test_shape_arithmetic_constants_are_not_weights(cnn):
    _, engine = cnn
    layers = engine._impl.plan["layers"]
    shape_layers = [layer for layer in layers
                    if layer["type"] in ("SHAPE", "GATHER", "CONCATENATION") or "values" in layer["attrs"]]
    assert shape_layers, "the dynamic view should be computed in the network"
    assert not any(" SHAPE" in n for n in engine.weight_names)
    assert set(engine.weight_map.sources) == set(engine.weight_names)


@pytest.mark.slow   # about 8 s on 2 cores
def test_torchvision_resnet18_over_batch_1_to_8():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    engine = refitcore.compile(model, torch.randn(2, 3, 32, 32), backend="reference",
                               dynamic_shapes={"x": {0: BATCH}})
    for b in _batches():
        _close(engine, model, (torch.randn(b, 3, 32, 32),))
    new = torchvision.models.resnet18(num_classes=10).eval()
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, new, path=path, verify_inputs=[(torch.randn(b, 3, 32, 32),) for b in (1, 8)])
        assert result, str(result)


# ---- the attention block over sequence length 4..32 --------------------------------------------
@pytest.mark.parametrize("seq", [SEQ[0], 8, SEQ[1], 13])
def test_attention_matches_eager_across_the_range(attention, seq):
    model, engine = attention
    _close(engine, model, (torch.randn(2, seq, 16),))


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_attention_refit_both_paths(attention, path):
    _, engine = attention
    torch.manual_seed(4)
    new = TinyAttention().eval()
    samples = [(torch.randn(2, t, 16),) for t in (SEQ[0], 8, SEQ[1], 21)]
    result = refitcore.refit(engine, new, path=path, verify_inputs=samples, audit=True)
    assert result, str(result)


def test_refitted_attention_matches_eager_at_drawn_shapes(attention):
    """One refit, then Hypothesis draws the inputs' shapes inside the engine's recorded profile."""
    from hypothesis import given, settings

    from pytest_trtrefit.strategies import inputs

    _, engine = attention
    torch.manual_seed(5)
    new = TinyAttention().eval()
    refitted = refitcore.refit(engine, new, path="cached").engine
    seen = set()

    @settings(max_examples=12, database=None, deadline=None)
    @given(sample=inputs([torch.zeros(2, 8, 16)], profiles=engine.io.profiles, families=("normal",)))
    def check(sample):
        seen.add(sample[0].shape[1])
        _close(refitted, new, tuple(sample))

    check()
    assert {SEQ[0], SEQ[1]} & seen and all(SEQ[0] <= t <= SEQ[1] for t in seen)


def test_attention_out_of_range_names_the_dimension(attention):
    _, engine = attention
    with pytest.raises(ShapeRangeError, match=r"input 'x': dimension 1 has size 33, outside .*range \[4, 32\]"):
        engine(torch.randn(2, 33, 16))
    with pytest.raises(ShapeRangeError, match=r"dimension 1 has size 3"):
        engine(torch.randn(2, 3, 16))


# ---- transformers BertModel over sequence length 4..32 ------------------------------------------
def _bert_sample(t: int):
    """input_ids and an attention mask whose second row is padded (its last quarter masked)."""
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, t - max(1, t // 4):] = 0
    return torch.randint(0, 100, (2, t)), mask


def test_bert_sequence_range():
    """transformers.BertModel with input_ids and a padding mask, sequence length 4..32: one engine,
    refitted through both paths, matches eager at min, opt, max and in between."""
    torch.manual_seed(0)
    model = tiny_bert().eval()
    seq = Dim("seq", min=SEQ[0], max=SEQ[1])
    engine = refitcore.compile(model, _bert_sample(8), backend="reference",
                               dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    assert engine.io.profiles.ranges == (((2, 2, 2), (4, 8, 32)), ((2, 2, 2), (4, 8, 32)))
    for t in (SEQ[0], 8, SEQ[1], 19):
        _close(engine, model, _bert_sample(t), atol=1e-4)
    for path in ("cached", "fallback"):
        new = tiny_bert().eval()
        samples = [_bert_sample(t) for t in (SEQ[0], SEQ[1], 11)]
        result = refitcore.refit(engine, new, path=path, verify_inputs=samples, rtol=1e-4, atol=1e-4)
        assert result, str(result)
    with pytest.raises(ShapeRangeError, match="input 'input_ids': dimension 1 has size 33"):
        engine(*_bert_sample(33))


def test_bert_input_ids_sequence_range():
    """BertModel called with input_ids alone: embeddings, position ids sliced to the length, the
    attention mask transformers builds from the input's shape, all over sequence length 4..32."""
    from tests.dynamic_models import BertIds

    torch.manual_seed(0)
    model = BertIds().eval()
    seq = Dim("seq", min=SEQ[0], max=SEQ[1])
    engine = refitcore.compile(model, torch.randint(0, 100, (2, 8)), backend="reference",
                               dynamic_shapes={"input_ids": {1: seq}})
    for t in (SEQ[0], 8, SEQ[1], 19):
        _close(engine, model, (torch.randint(0, 100, (2, t)),), atol=1e-4)
    new = BertIds().eval()
    for path in ("cached", "fallback"):
        samples = [(torch.randint(0, 100, (2, t)),) for t in (SEQ[0], SEQ[1], 11)]
        result = refitcore.refit(engine, new, path=path, verify_inputs=samples, rtol=1e-4, atol=1e-4)
        assert result, str(result)
    with pytest.raises(ShapeRangeError, match="input 'input_ids': dimension 1 has size 33"):
        engine(torch.randint(0, 100, (2, 33)))


# ---- specifications ----------------------------------------------------------------------------
class Two(torch.nn.Module):
    def forward(self, x, y):
        return x + y


X, Y = torch.zeros(2, 4), torch.zeros(2, 4)


@pytest.mark.parametrize("spec, ranges", [
    ({"x": {0: (1, 8)}, "y": {0: (1, 8)}}, (((1, 2, 8), (4, 4, 4)), ((1, 2, 8), (4, 4, 4)))),
    ({0: {0: (1, 3, 8)}, 1: ((1, 3, 8), 4)}, (((1, 3, 8), (4, 4, 4)), ((1, 3, 8), (4, 4, 4)))),
    (({0: Dim("b", min=1, max=6)}, {0: Dim("b", min=1, max=6)}), (((1, 2, 6), (4, 4, 4)), ((1, 2, 6), (4, 4, 4)))),
], ids=["by-name-min-max", "by-index-and-tuple-with-opt", "torch-export-dims"])
def test_forms_of_dynamic_shapes(spec, ranges):
    _, sp = resolve_dynamic_shapes(Two(), (X, Y), spec)
    assert sp.ranges == ranges
    assert sp.network_dims() == [(-1, 4), (-1, 4)]


@pytest.mark.parametrize("spec, needle", [
    ({"z": {0: (1, 8)}}, "no input 'z'"),
    ({"x": {2: (1, 8)}}, "dimension 2 does not exist"),
    ({"x": {0: (4, 8)}}, "the example's dimension 0 has size 2, outside its range \\[4, 8\\]"),
    ({"x": {0: (0, 8)}}, "need integers 1 <= min <= max"),
    ({"x": {0: (1, 9, 8)}}, "opt=9 lies outside"),
    ({"x": {0: "big"}}, "expected \\(min, max\\)"),
    ({"x": {0: Dim("b", min=1)}}, "has no max"),
    (({0: (1, 8)},), "1 entries for 2 input"),
    ({"x": {0: Dim.DYNAMIC}}, "has no bounds"),
    ({"x": {0: Dim("b", min=1, max=4)}, "y": {0: (1, 4)}}, "mix of torch.export.Dim and ranges"),
], ids=["unknown-input", "unknown-dim", "example-outside", "zero-min", "opt-outside", "not-a-range", "unbounded",
        "too-few", "dim-hint", "mixed"])
def test_bad_dynamic_shapes_say_what_to_do(spec, needle):
    with pytest.raises(ShapeRangeError, match=needle):
        resolve_dynamic_shapes(Two(), (X, Y), spec)


def test_several_profiles_pick_the_one_that_fits():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    engine = refitcore.compile(model, torch.randn(2, 4), backend="reference", dynamic_shapes={0: {0: (1, 16)}},
                               profiles=[{0: {0: (1, 2, 4)}}, {0: {0: (8, 12, 16)}}])
    sp = engine.io.profiles
    assert len(sp.profiles) == 2
    assert sp.profile_for([(3, 4)]) == 0 and sp.profile_for([(9, 4)]) == 1
    with pytest.raises(ShapeRangeError, match="size 6, outside .*range \\[1, 4\\].*outside the other 1 profile"):
        engine(torch.randn(6, 4))
    x = torch.randn(12, 4)
    torch.testing.assert_close(engine(x), model(x))
    with pytest.raises(ShapeRangeError, match="outside the export range"):
        refitcore.compile(model, torch.randn(2, 4), backend="reference", dynamic_shapes={0: {0: (1, 16)}},
                          profiles=[{0: {0: (1, 2, 32)}}])


def test_profiles_json_round_trip_and_re_export_form():
    _, sp = resolve_dynamic_shapes(Two(), (X, Y), {"x": {0: (1, 8)}, "y": {0: (2, 8)}})
    again = ShapeProfiles.from_json(sp.to_json())
    assert again == sp
    ds = again.torch_dynamic_shapes()
    assert ds[0][0].min == 1 and ds[0][0].max == 8 and ds[1][0].min == 2
    assert ds[0][0] is not ds[1][0]   # different names: independent dimensions


def test_sample_shapes_cover_min_opt_max_and_random():
    _, sp = resolve_dynamic_shapes(Two(), (X, Y), {"x": {0: (1, 8)}})
    shapes = sample_shapes(sp, 3, seed=1)
    assert shapes[:3] == [[(1, 4), (2, 4)], [(2, 4), (2, 4)], [(8, 4), (2, 4)]]
    assert all(1 <= s[0][0] <= 8 and s[1] == (2, 4) for s in shapes)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


F = torch.nn.functional


@pytest.mark.parametrize("fn, x, dims, needle", [
    (lambda x: torch.roll(x, 1, dims=1) * 2, torch.randn(2, 6), {1: (2, 8)},
     r"aten.roll.default \(roll along a dynamic dimension\)"),
    (lambda x: F.pad(x, (1, 1)) * 2, torch.randn(2, 6), {1: (2, 8)}, r"padding along dynamic dimension 1"),
    (lambda x: F.adaptive_avg_pool2d(x, 2), torch.randn(1, 2, 8, 8), {2: (4, 16)},
     r"adaptive pooling of a dynamic spatial size to \[2, 2\]"),
    (lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True), torch.randn(1, 6, 4), {1: (2, 8)},
     r"causal attention over a dynamic sequence length"),
], ids=["roll", "pad", "adaptive-pool", "causal-sdpa"])
def test_unsupported_dynamic_dimension_is_reported_by_name(fn, x, dims, needle):
    with pytest.raises(UnsupportedOperatorError, match=needle):
        refitcore.compile(Fn(fn), x, backend="reference", dynamic_shapes={0: dims}, strict=True)
    # Without strict the call runs in PyTorch (with its reason) and the engine takes the whole range.
    engine = refitcore.compile(Fn(fn), x, backend="reference", dynamic_shapes={0: dims})
    assert engine.partition is not None and not engine.partition.fully_converted, engine.summary()
    (dim, (lo, hi)), = dims.items()
    for size in (lo, hi):
        y = torch.randn([size if d == dim else n for d, n in enumerate(x.shape)])
        torch.testing.assert_close(engine(y), fn(y), rtol=1e-5, atol=1e-5)


def test_batchnorm1d_with_two_dynamic_dims():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.ReLU()).eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
    engine = refitcore.compile(model, torch.randn(2, 3, 8), backend="reference",
                               dynamic_shapes={0: {0: (1, 4), 2: (4, 16)}})
    for shape in ((1, 3, 4), (4, 3, 16), (3, 3, 11)):
        _close(engine, model, (torch.randn(*shape),))


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["ranges"][0][0].__setitem__(0, 9), "1 <= min <= opt <= max"),
    (lambda p: p.__setitem__("input_names", ["y"]), "io.profiles names inputs"),
    (lambda p: p["ranges"][0].pop(), "do not describe the same inputs"),
    (lambda p: p["ranges"][0][0].__setitem__(2, "8"), "not an int"),
    (lambda p: p["ranges"][0][0].__setitem__(2, 10 ** 12), "ranges of input 'x' do not fit|more than"),
], ids=["min-above-max", "other-input", "rank", "not-int", "unbounded"])
def test_a_bundle_with_bad_profiles_is_refused(cnn, edit, needle):
    import copy

    from refitcore.engine.refittable import RefittableEngine
    from refitcore.errors import BundleError

    _, engine = cnn
    header, arrays = engine.to_parts()
    header = copy.deepcopy(header)
    edit(header["io"]["profiles"])
    with pytest.raises(BundleError, match=needle):
        RefittableEngine.from_parts(header, arrays, "crafted.trtrefit")


# ---- keyword and nested inputs; dimensions the graph ties ----------------------------------------
class KeywordNested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x, extra=None, *, scale=1.0):
        h = self.a(x) * scale + extra["bias"] * extra["more"][0]
        return {"h": h, "y": self.b(h)}


def _nested(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, bias, more = torch.randn(batch, 4, generator=g), torch.randn(batch, 4, generator=g), torch.randn(4, generator=g)
    return (x,), {"extra": {"bias": bias, "more": [more]}, "scale": 2.0}


def _close_call(engine, model, args, kwargs):
    with torch.no_grad():
        want = model.eval()(*args, **kwargs)
    got = engine(*args, **kwargs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["ranges", "torch-dims"])
def test_keyword_and_nested_inputs_with_a_dynamic_batch(tmp_path, form):
    """Ranges for a positional input and a tensor inside a keyword dict (unnamed ranges the graph
    ties, or one torch.export Dim): one engine over batch 1..8, refitted through both paths, also
    when loaded from a file (the fallback re-exports with the recorded structure and ranges)."""
    torch.manual_seed(0)
    model = KeywordNested().eval()
    args, kwargs = _nested(2)
    if form == "ranges":
        spec = {"x": {0: (1, 8)}, "extra": {"bias": {0: (1, 8)}, "more": [None]}, "scale": None}
    else:
        batch = Dim("batch", min=1, max=8)
        spec = {"x": {0: batch}, "extra": {"bias": {0: batch}, "more": [None]}}
    engine = refitcore.compile(model, args=args, kwargs=kwargs, backend="reference", dynamic_shapes=spec)
    sp = engine.io.profiles
    assert sp.input_names == ("x", "extra_bias", "extra_more_0")
    assert sp.ranges == (((1, 2, 8), (4, 4, 4)), ((1, 2, 8), (4, 4, 4)), ((4, 4, 4),))
    assert sp.dim_names[0][0] == sp.dim_names[1][0] is not None     # tied: one dimension on re-export
    for batch in (1, 5, 8):
        _close_call(engine, model, *_nested(batch, seed=batch))
    with pytest.raises(ShapeRangeError, match=r"input 'x': dimension 0 has size 9"):
        engine(*_nested(9)[0], **_nested(9)[1])
    engine.save(tmp_path / "m.trtrefit")
    loaded = refitcore.load(tmp_path / "m.trtrefit")
    new = KeywordNested().eval()
    samples = [refitcore.Inputs(*a, **k) for a, k in (_nested(1), _nested(7))]
    for target, path in ((engine, "cached"), (engine, "fallback"), (loaded, "fallback")):
        result = refitcore.refit(target, new, path=path, verify_inputs=samples)
        assert result, str(result)


def test_positional_ranges_the_graph_ties_need_no_common_name():
    """``x + y`` ties the two batch sizes: unnamed ranges are exported as bounded Dim.DYNAMIC hints and
    the tie is recorded (a re-export gives both one Dim); different ranges for tied dimensions are
    refused naming both."""
    class Add(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    x, y = torch.randn(2, 4), torch.randn(2, 4)
    engine = refitcore.compile(Add(), (x, y), backend="reference", dynamic_shapes={"x": {0: (1, 8)}, "y": {0: (1, 8)}})
    names = engine.io.profiles.dim_names
    assert names[0][0] == names[1][0]
    assert len({id(d[0]) for d in engine.io.profiles.torch_dynamic_shapes()}) == 1
    torch.testing.assert_close(engine(torch.ones(5, 4), torch.ones(5, 4)), torch.full((5, 4), 2.0))
    with pytest.raises(ShapeRangeError, match=r"input 'y': dimension 0 is the same size as dimension 'x_dim0'.*"
                                              r"range \[1, 2, 6\] where that one has \[1, 2, 8\]"):
        refitcore.compile(Add(), (x, y), backend="reference", dynamic_shapes={"x": {0: (1, 8)}, "y": {0: (1, 6)}})


@pytest.mark.parametrize("spec, needle", [
    ({"extra": {"nope": {0: (1, 8)}}}, r"dynamic_shapes\[.extra.\]: input extra is a dict with keys"),
    ({"extra": {"more": {0: (1, 8)}}}, r"dynamic_shapes\['extra'\]\['more'\]: input extra\['more'\] is a list of 1"),
    ({"scale": {0: (1, 8)}}, r"dynamic_shapes\['scale'\]: input scale is float, not a tensor"),
    ({"extra": {"bias": {2: (1, 8)}}}, r"dynamic_shapes\['extra'\]\['bias'\]: dimension 2 does not exist"),
], ids=["unknown-key", "list-as-tensor", "scalar", "unknown-dim"])
def test_bad_nested_dynamic_shapes_name_the_entry(spec, needle):
    args, kwargs = _nested(2)
    with pytest.raises(ShapeRangeError, match=needle):
        resolve_dynamic_shapes(KeywordNested(), args, spec, kwargs=kwargs)
