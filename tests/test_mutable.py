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
