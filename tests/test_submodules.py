"""A model torch.export cannot export whole: its exporting submodules compile, the rest runs eagerly,
and refit is still one transaction over everything."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.engine.segmented import SegmentedRefitter
from refitcore.errors import ExportError, RefitError

torch.set_num_threads(1)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x):
        f = self.backbone(x).mean((2, 3))
        if f.sum() > 0:   # data-dependent control flow: torch.export cannot export this
            f = f * 2
        return [{"scores": self.head(f) + self.offset, "n": 1}]


def _make(seed):
    torch.manual_seed(seed)
    model = Gated().eval()
    with torch.no_grad():
        model.backbone[1].running_mean.uniform_(-0.5, 0.5)
        model.backbone[1].running_var.uniform_(0.5, 2.0)
    return model


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def engine():
    return refitcore.compile(_make(0), X, backend="reference")


def test_exporting_submodules_compile(engine):
    assert sorted(engine.impl.engines) == ["backbone", "head"]
    why = dict(engine.eager_modules)
    assert "does not export" in why[""] and "GuardOnDataDependent" in why[""]
    text = str(engine.summary())
    assert "module <top level> runs eagerly" in text
    out = engine(X)
    with torch.no_grad():
        ref = _make(0)(X)
    assert out[0]["n"] == 1
    torch.testing.assert_close(out[0]["scores"], ref[0]["scores"], rtol=1e-5, atol=1e-5)
    assert any(n.startswith("[backbone] ") for n in engine.weight_names)
    assert "[eager] offset" in engine.weight_names


def test_strict_names_the_module_and_cause():
    with pytest.raises(ExportError) as info:
        refitcore.compile(_make(0), X, backend="reference", strict=True)
    assert "the model" in str(info.value) and "GuardOnDataDependent" in str(info.value)


def test_named_submodules_only():
    e = refitcore.compile(_make(0), X, backend="reference", submodules=["head"])
    assert list(e.impl.engines) == ["head"]
    with pytest.raises(ValueError, match="no module 'nope'"):
        refitcore.compile(_make(0), X, backend="reference", submodules=["nope"])


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_refit_everything(engine, path):
    new = _make(1)
    result = refitcore.refit(engine, new, path=path, verify_inputs=[X], reference_model=new, audit=True)
    assert result, str(result)
    assert "([0]['scores'])" in str(result.verdict)


def test_refit_is_one_transaction(engine, monkeypatch):
    target = engine.clone()
    before = {k: np.array(v, copy=True) for k, v in target.current_weights().items()}
    real_refit = SegmentedRefitter.refit
    calls = []

    def failing(self):
        calls.append(1)
        if len(calls) == 1 and "head" in self.subs:   # the second compiled submodule fails
            self.subs["head"].refit = lambda: False
        return real_refit(self)

    monkeypatch.setattr(SegmentedRefitter, "refit", failing)
    with pytest.raises(RefitError) as info:
        refitcore.refit(target, _make(1), path="cached", in_place=True)
    monkeypatch.undo()
    assert info.value.rolled_back
    after = target.current_weights()
    assert [k for k in before if not np.array_equal(before[k], after[k])] == []
    torch.testing.assert_close(target(X)[0]["scores"], engine(X)[0]["scores"], rtol=0, atol=0)


def test_other_shapes_run_the_submodule_eagerly(engine):
    target = engine.clone()
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(target.impl.shell(x2)[0]["scores"], _make(0)(x2)[0]["scores"],
                                   rtol=1e-5, atol=1e-5)
    assert target.impl.counter["eager_calls"] == 2
    assert "ran eagerly" in str(target.summary())


def test_hybrid_engine_is_not_saved(engine, tmp_path):
    with pytest.raises(refitcore.BundleError, match="cannot be saved"):
        engine.save(tmp_path / "x.trtrefit")


def test_hybrid_engine_satisfies_the_backend_protocols(engine):
    from refitcore.backends import base

    assert isinstance(engine.impl, base.EngineImpl)
    assert isinstance(engine.impl.create_refitter(), base.Refitter)


class TiedAroundGated(nn.Module):
    """A language-model shape: the head's weight is the embedding's, around a body that does not export."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = self.body(self.wte(ids))
        if h.sum() > 0:   # data-dependent control flow: the whole model does not export
            h = h * 2
        return self.lm_head(h)


def _tied(seed):
    torch.manual_seed(seed)
    return TiedAroundGated().eval()


IDS = torch.tensor([[1, 5, 7, 3]])


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_tied_weights_around_eager_code(path):
    engine = refitcore.compile(_tied(0), IDS, backend="reference")
    assert "" in dict(engine.eager_modules) and engine.impl.engines
    with torch.no_grad():
        torch.testing.assert_close(engine(IDS), _tied(0)(IDS), rtol=1e-5, atol=1e-5)
    new = _tied(1)
    result = refitcore.refit(engine, new, path=path, verify_inputs=[IDS], reference_model=new, audit=True)
    assert result, str(result)
    with torch.no_grad():
        torch.testing.assert_close(result.engine(IDS), new(IDS), rtol=1e-5, atol=1e-5)
