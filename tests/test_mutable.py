"""MutableEngine: refits when the module's weights change, recompiles when its architecture does, and
never runs stale weights."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import refitcore
from tests.models import make


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


def _eager(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def fast():
    model, x = make("conv_bias_bn", 0)
    return refitcore.MutableEngine(model, x, backend="reference"), model, x


def test_first_call_runs_without_refit(fast):
    engine, model, x = fast
    assert _close(engine(x), _eager(model, x))
    assert (engine.last_action, engine.refits, engine.recompiles) == ("none", 0, 0)


def test_refits_after_load_state_dict(fast):
    engine, model, x = fast
    before = engine(x)
    model.load_state_dict(make("conv_bias_bn", 5)[0].state_dict())
    out = engine(x)
    assert engine.last_action == "refit" and engine.refits == 1
    assert _close(out, _eager(model, x)) and not _close(out, before)


def test_refits_after_in_place_init_and_mul(fast):
    engine, model, x = fast
    nn.init.normal_(model.conv.weight)
    assert _close(engine(x), _eager(model, x)) and engine.refits == 1
    with torch.no_grad():
        model.bn.running_var.mul_(2)           # a buffer, folded into the conv by the engine
    assert _close(engine(x), _eager(model, x)) and engine.refits == 2
    with torch.no_grad():
        model.conv.bias.data = model.conv.bias.data + 1     # new storage, not an in-place write
    assert _close(engine(x), _eager(model, x)) and engine.refits == 3


def test_a_write_of_the_same_values_refits_nothing(fast):
    engine, model, x = fast
    with torch.no_grad():
        model.conv.weight.mul_(1)
    engine(x)
    assert (engine.last_action, engine.refits) == ("none", 0)


def test_recompiles_after_a_layer_is_replaced(fast, caplog):
    engine, model, x = fast
    engine(x)
    model.bn = nn.BatchNorm2d(8, eps=0.25).eval()
    with caplog.at_level(logging.WARNING, logger="refitcore"):
        out = engine(x)
    assert engine.last_action == "recompile" and engine.recompiles == 1 and engine.refits == 0
    assert "architecture changed" in caplog.text
    assert _close(out, _eager(model, x))


def test_recompiles_through_the_cache(tmp_path):
    model, x = make("tied_mlp", 0)
    first = refitcore.MutableEngine(model, x, backend="reference", cache=str(tmp_path))
    assert first.engine.cache_hit is False
    other = make("tied_mlp", 3)[0]
    second = refitcore.MutableEngine(other, x, backend="reference", cache=str(tmp_path))
    assert second.engine.cache_hit is True
    assert _close(second(x), _eager(other, x))


def test_other_input_shapes_recompile(fast):
    engine, model, x = fast
    y = torch.randn(2, 3, 32, 32)
    assert _close(engine(y), _eager(model, y)) and engine.recompiles == 1


def _break_map(engine):
    """Swap the recipes of two engine weights of one shape: a wrong cached map."""
    wm = engine.engine.weight_map
    by_shape = {}
    for name, src in wm.sources.items():
        by_shape.setdefault(tuple(src.shape), []).append(name)
    a, b = next(names for names in by_shape.values() if len(names) >= 2)[:2]
    wm.sources[a], wm.sources[b] = wm.sources[b], wm.sources[a]


def test_verification_catches_a_wrong_map_and_falls_back():
    model, x = make("residual", 0)
    engine = refitcore.MutableEngine(model, x, backend="reference")
    _break_map(engine)
    model.load_state_dict(make("residual", 6)[0].state_dict())
    assert _close(engine(x), _eager(model, x))
    assert engine.last_refit.fell_back and engine.last_refit.path == "fallback"


def test_without_verification_a_wrong_map_gives_wrong_outputs():
    """What the verification above protects against."""
    model, x = make("residual", 0)
    engine = refitcore.MutableEngine(model, x, backend="reference", verify=False)
    _break_map(engine)
    model.load_state_dict(make("residual", 6)[0].state_dict())
    assert not _close(engine(x), _eager(model, x))


def test_a_refit_that_cannot_be_verified_raises_and_is_retried(fast, monkeypatch):
    engine, model, x = fast
    import refitcore.compiler.mutable as mutable

    real = mutable.refit
    monkeypatch.setattr(mutable, "refit", lambda *a, **k: _failed(real(*a, **k)))
    nn.init.normal_(model.conv.weight)
    with pytest.raises(refitcore.RefitError, match="disagrees with eager"):
        engine(x)
    with pytest.raises(refitcore.RefitError):          # still out of step: refused again, never run stale
        engine(x)
    monkeypatch.setattr(mutable, "refit", real)
    assert _close(engine(x), _eager(model, x)) and engine.refits == 1


def _failed(result):
    class Failed(type(result)):
        @property
        def ok(self):
            return False

    result.__class__ = Failed
    return result


# -- every route of an edit is seen (check="content", the default) --------------------------------
class PrivateGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)
        self._gain = 1.0

    def forward(self, x):
        return self.bn(self.conv(x)) * self._gain


def _data_mul(m):
    m.conv.weight.data.mul_(2)


def _data_copy(m):
    m.conv.weight.data.copy_(torch.randn_like(m.conv.weight))


def _running_mean(m):
    m.bn.running_mean.data.add_(1)


def _numpy_view(m):
    m.conv.bias.detach().numpy()[:] += 0.5


def _private_attribute(m):
    m._gain = 1.7


EDITS = [("p.data.mul_", _data_mul), ("p.data.copy_", _data_copy), ("running_mean.data.add_", _running_mean),
         ("numpy view", _numpy_view), ("private attribute", _private_attribute)]


@pytest.mark.parametrize("edit", [e[1] for e in EDITS], ids=[e[0] for e in EDITS])
def test_every_route_of_an_edit_is_seen(edit):
    torch.manual_seed(0)
    model, x = PrivateGain().eval(), torch.randn(1, 3, 16, 16)
    engine = refitcore.MutableEngine(model, x, backend="reference")
    before = engine(x)
    edit(model)
    out = engine(x)
    assert engine.last_action in ("refit", "recompile")
    assert _close(out, _eager(model, x)) and not _close(out, before)
    engine(x)
    assert engine.last_action == "none"                     # in step again: nothing more to do


def test_the_cheaper_check_is_named_and_misses_writes_that_keep_the_version(fast):
    _, model, x = fast
    cheap = refitcore.MutableEngine(model, x, backend="reference", check="version")
    assert cheap.check == "version" and fast[0].check == "content"
    _data_mul(model)
    cheap(x)
    assert cheap.last_action == "none"                     # documented: the version counter did not move
    with pytest.raises(ValueError, match="'content'.*'version'"):
        refitcore.MutableEngine(model, x, backend="reference", check="fast")


# -- the inputs refitcore.compile takes: keywords, nesting, None, dynamic ranges ------------------
class Structured(nn.Module):
    """Keyword inputs, a nested dict, an optional input (None) and a scalar."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x, extra=None, *, feats=None, scale=1.0):
        y = self.a(x) * scale
        if extra is not None:
            y = y + self.b(extra)
        if feats is not None:
            y = y + self.b(feats["left"]) - feats["right"]["bias"]
        return {"y": y}


def _structured_eager(model, *args, **kwargs):
    with torch.no_grad():
        return model.eval()(*args, **kwargs)["y"]


def _edit(model):
    with torch.no_grad():
        model.a.weight.mul_(-2)
        model.b.bias.add_(1)


def test_a_none_input_runs_refits_and_recompiles_when_it_becomes_a_tensor():
    torch.manual_seed(0)
    model, x = Structured().eval(), torch.randn(2, 4)
    engine = refitcore.MutableEngine(model, (x, None), backend="reference")
    assert _close(engine(x, None)["y"], _structured_eager(model, x, None)) and engine.last_action == "none"
    _edit(model)
    assert _close(engine(x, None)["y"], _structured_eager(model, x, None)) and engine.last_action == "refit"
    e = torch.randn(2, 4)
    assert _close(engine(x, e)["y"], _structured_eager(model, x, e)) and engine.last_action == "recompile"


def test_keyword_inputs_and_a_scalar():
    torch.manual_seed(0)
    model, x = Structured().eval(), torch.randn(2, 4)
    engine = refitcore.MutableEngine(model, x, kwargs={"scale": 2.0}, backend="reference")
    assert _close(engine(x, scale=2.0)["y"], _structured_eager(model, x, scale=2.0)) and engine.recompiles == 0
    _edit(model)
    assert _close(engine(x, scale=2.0)["y"], _structured_eager(model, x, scale=2.0)) and engine.refits == 1
    assert _close(engine(x, scale=3.0)["y"], _structured_eager(model, x, scale=3.0)) and engine.recompiles == 1


def test_nested_dict_input():
    torch.manual_seed(0)
    model, x = Structured().eval(), torch.randn(2, 4)
    feats = {"left": torch.randn(2, 4), "right": {"bias": torch.randn(3)}}
    engine = refitcore.MutableEngine(model, args=(x,), kwargs={"feats": feats}, backend="reference")
    assert _close(engine(x, feats=feats)["y"], _structured_eager(model, x, feats=feats))
    _edit(model)
    other = {"left": torch.randn(2, 4), "right": {"bias": torch.randn(3)}}
    assert _close(engine(x, feats=other)["y"], _structured_eager(model, x, feats=other))
    assert (engine.last_action, engine.refits, engine.recompiles) == ("refit", 1, 0)


def test_dynamic_batch_inside_the_range_runs_and_outside_is_refused():
    model, x = make("conv_bias_bn", 0)
    engine = refitcore.MutableEngine(model, x, dynamic_shapes={0: {0: (1, 4)}}, backend="reference")
    for batch in (1, 3, 4):
        y = torch.randn(batch, *x.shape[1:])
        assert _close(engine(y), _eager(model, y))
    assert engine.recompiles == 0
    nn.init.normal_(model.conv.weight)
    y = torch.randn(2, *x.shape[1:])
    assert _close(engine(y), _eager(model, y)) and (engine.last_action, engine.recompiles) == ("refit", 0)
    with pytest.raises(refitcore.errors.ShapeRangeError, match=r"dimension 0 has size 5.*\[1, 4\]"):
        engine(torch.randn(5, *x.shape[1:]))
    assert engine.recompiles == 0


@pytest.mark.parametrize("weights", [True, False], ids=["with weights", "weightless"])
def test_save_then_load_for_the_model_then_an_edit(tmp_path, weights):
    model, x = make("conv_bias_bn", 0)
    path = tmp_path / "engine.rtrt"
    refitcore.MutableEngine(model, x, backend="reference").save(path, weights=weights)
    model.load_state_dict(make("conv_bias_bn", 4)[0].state_dict())     # weights other than the file's
    loaded = refitcore.MutableEngine.load(path, model)
    assert _close(loaded(x), _eager(model, x)) and loaded.last_action == "refit"
    nn.init.normal_(model.conv.weight)
    assert _close(loaded(x), _eager(model, x)) and (loaded.last_action, loaded.refits) == ("refit", 2)
    loaded(x)
    assert loaded.last_action == "none"


def test_load_keeps_keyword_inputs_and_dynamic_ranges(tmp_path):
    torch.manual_seed(0)
    model, x = Structured().eval(), torch.randn(2, 4)
    path = tmp_path / "engine.rtrt"
    refitcore.MutableEngine(model, x, kwargs={"scale": 2.0}, backend="reference").save(path, weights=False)
    _edit(model)
    loaded = refitcore.MutableEngine.load(path, model, check="version")
    assert _close(loaded(x, scale=2.0)["y"], _structured_eager(model, x, scale=2.0)) and loaded.recompiles == 0

    conv, c = make("conv_bias_bn", 0)
    refitcore.MutableEngine(conv, c, dynamic_shapes={0: {0: (1, 4)}}, backend="reference").save(path)
    loaded = refitcore.MutableEngine.load(path, conv)
    y = torch.randn(3, *c.shape[1:])
    assert _close(loaded(y), _eager(conv, y)) and loaded.recompiles == 0
    with pytest.raises(refitcore.errors.ShapeRangeError):
        loaded(torch.randn(6, *c.shape[1:]))


def test_load_refuses_a_model_of_other_weights(tmp_path):
    model, x = make("conv_bias_bn", 0)
    path = tmp_path / "engine.rtrt"
    refitcore.MutableEngine(model, x, backend="reference").save(path, weights=False)
    with pytest.raises(refitcore.errors.ArchitectureMismatchError, match="other state_dict keys"):
        refitcore.MutableEngine.load(path, make("tied_mlp", 0)[0])
    with pytest.raises(TypeError, match="come from the file"):
        refitcore.MutableEngine.load(path, model, backend="reference")
