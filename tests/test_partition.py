"""Partitioned engines: TensorRT segments and PyTorch segments, refitted as one transaction, audited
and named segment by segment, saved and loaded as data."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.engine.segmented import SegmentedRefitter
from refitcore.errors import RefitError

torch.set_num_threads(1)


class Mixed(nn.Module):
    """TensorRT-convertible runs around two ops without a converter (cumsum, logcumsumexp), a
    parameter read in PyTorch (``scale``) and one read in both."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.cumsum(y, dim=1) * self.scale
        y = torch.tanh(self.b(y))
        y = torch.logcumsumexp(y, dim=1)
        return {"logits": self.c(y), "aux": [y.amax(-1), None]}


def _make(seed: int) -> Mixed:
    torch.manual_seed(seed)
    return Mixed().eval()


X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))


# Listed explicitly so that the plan does not depend on which ops have converters today.
TORCH_OPS = ["aten.cumsum", "aten.logcumsumexp", "aten.mul.Tensor"]


@pytest.fixture(scope="module")
def engine():
    return refitcore.compile(_make(0), X, backend="reference", min_block_size=1, torch_executed_ops=TORCH_OPS)


def _kinds(engine):
    return [s.kind for s in engine.impl.segments]


def test_partition_alternates_and_matches_eager(engine):
    assert _kinds(engine) == ["tensorrt", "torch", "tensorrt", "torch", "tensorrt"]
    fallen = {op for op, _path, _why in engine.partition.fallback.values()}
    assert "aten.cumsum.default" in fallen and "aten.logcumsumexp.default" in fallen
    out = engine(X)
    with torch.no_grad():
        ref = _make(0)(X)
    assert set(out) == {"logits", "aux"} and out["aux"][1] is None
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    names = engine.weight_names
    assert any(n.startswith("seg0:a/linear") for n in names), names
    assert "seg1:scale" in names   # a parameter a PyTorch segment reads, named by its segment


def test_min_block_size_moves_short_runs_to_pytorch():
    e = refitcore.compile(_make(0), X, backend="reference", torch_executed_ops=TORCH_OPS)   # default 5: all shorter
    assert _kinds(e) == ["torch"]
    assert any("min_block_size=5" in why for _op, _p, why in e.partition.fallback.values())
    torch.testing.assert_close(e(X)["logits"], _make(0)(X)["logits"], rtol=1e-5, atol=1e-5)


def test_torch_executed_ops_are_honoured():
    e = refitcore.compile(_make(0), X, backend="reference", min_block_size=1,
                          torch_executed_ops=TORCH_OPS + ["aten.tanh"])
    tanh = [v for v in e.partition.fallback.values() if v[0] == "aten.tanh.default"]
    assert tanh and tanh[0][2] == "listed in torch_executed_ops"
    assert "aten.tanh.default" in str(e.summary())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("spelling", [
    torch.ops.aten.convolution.default, torch.ops.aten.convolution, "aten.convolution.default",
    "torch.ops.aten.convolution.default", "aten.convolution", "aten::convolution",
], ids=["overload", "packet", "name", "torch_ops_name", "packet_name", "schema"])
def test_torch_executed_ops_take_every_spelling(spelling):
    """As Torch-TensorRT's users write them: our lowering keeps aten.conv2d whole, which is what
    ``aten.convolution`` names here."""
    x = torch.randn(1, 3, 8, 8)
    e = refitcore.compile(_ConvNet().eval(), x, backend="reference", min_block_size=1, torch_executed_ops=[spelling])
    listed = [op for op, _p, why in e.partition.fallback.values() if why == "listed in torch_executed_ops"]
    assert listed == ["aten.conv2d.default"], e.partition.fallback
    assert e.options.torch_executed_ops[0].startswith("aten.convolution")


@pytest.mark.parametrize("bad", ["aten.convolutoin.default", "aten.convolution.nope", "convolution", 42,
                                 torch.nn.functional.conv2d], ids=["op", "overload", "bare", "int", "function"])
def test_an_unknown_torch_executed_op_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="torch_executed_ops: .* name no operator torch has") as info:
        refitcore.compile(_ConvNet().eval(), torch.randn(1, 3, 8, 8), backend="reference",
                          torch_executed_ops=["aten.relu", bad])
    assert (bad if isinstance(bad, str) else type(bad).__name__) in str(info.value)
    assert "aten.relu" not in str(info.value).split("name no operator")[0]


def test_a_torch_executed_op_absent_from_the_graph_is_said(caplog):
    with caplog.at_level("WARNING", logger="refitcore"):
        refitcore.compile(_ConvNet().eval(), torch.randn(1, 3, 8, 8), backend="reference",
                          torch_executed_ops=["aten.addmm.default"])
    assert "['aten.addmm.default'] match no op of the exported graph" in caplog.text
    assert "aten.linear.default" in caplog.text


class _TwoStages(nn.Module):
    """Two convertible stages around an op sent to PyTorch; the second reshapes by the batch size
    (a size the exporter keeps symbolic: each segment that reads it computes it)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        h = torch.sigmoid(self.a(x)) * 2
        return self.b(h.reshape(x.shape[0], 8))


def test_torch_executed_ops_with_dynamic_shapes_partition_into_dynamic_segments(tmp_path):
    """torch_executed_ops under dynamic_shapes: two TensorRT segments (each with the ranges its
    inputs take) around the PyTorch op; one engine over batch 1..8 that matches eager, refits through
    both paths (also loaded from a file) and refuses a batch outside the range naming the input."""
    torch.manual_seed(0)
    model, x = _TwoStages().eval(), torch.randn(3, 6)
    engine = refitcore.compile(model, x, backend="reference", torch_executed_ops=[torch.ops.aten.sigmoid],
                               min_block_size=1, dynamic_shapes={"x": {0: (1, 8)}})
    kinds = [s.kind for s in engine.partition.segments]
    assert kinds == ["tensorrt", "torch", "tensorrt"], engine.summary()
    assert [entry[2] for entry in engine.partition.fallback.values()] == ["listed in torch_executed_ops"]
    for batch in (1, 5, 8):
        y = torch.randn(batch, 6)
        with torch.no_grad():
            torch.testing.assert_close(engine(y), model(y), rtol=1e-5, atol=1e-5)
    with pytest.raises(refitcore.ShapeRangeError, match=r"input 'x': dimension 0 has size 9, outside .*\[1, 8\]"):
        engine(torch.randn(9, 6))
    engine.save(tmp_path / "m.trtrefit")
    loaded = refitcore.load(tmp_path / "m.trtrefit")
    torch.manual_seed(1)
    new = _TwoStages().eval()
    samples = [torch.randn(1, 6), torch.randn(7, 6)]
    for target, path in ((engine, "cached"), (engine, "fallback"), (loaded, "fallback")):
        result = refitcore.refit(target, new, path=path, verify_inputs=samples, audit=True)
        assert result, str(result)


def test_strict_refuses_and_lists_every_op():
    with pytest.raises(refitcore.UnsupportedOperatorError) as info:
        refitcore.compile(_make(0), X, backend="reference", strict=True)
    ops = {t.split(" ")[0] for t, _p, _n in info.value.ops}
    assert "aten.logcumsumexp.default" in ops


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_refit_every_segment(engine, path):
    new = _make(1)
    result = refitcore.refit(engine, new, path=path, verify_inputs=[X], audit=True)
    assert result, str(result)
    with torch.no_grad():
        torch.testing.assert_close(result.engine(X)["logits"], new(X)["logits"], rtol=1e-5, atol=1e-5)
    # The verdict names each output leaf by its path.
    text = str(result.verdict)
    assert "(logits)" in text and "(aux[0])" in text and "(aux[1])" in text


def test_refit_is_one_transaction(engine, monkeypatch):
    """A failure in the second TensorRT segment leaves the first and the PyTorch parts bit-identical."""
    target = engine.clone()
    before = {k: np.array(v, copy=True) for k, v in target.current_weights().items()}
    out_before = target(X)["logits"].clone()
    real_refit = SegmentedRefitter.refit
    calls = []

    def failing(self):
        calls.append(1)
        if len(calls) == 1:   # the refit fails; the rollback that follows works
            self.subs[2].refit = lambda: False   # TensorRT's refit() returning False in the second engine
        return real_refit(self)

    monkeypatch.setattr(SegmentedRefitter, "refit", failing)
    with pytest.raises(RefitError) as info:
        refitcore.refit(target, _make(1), path="cached", in_place=True)
    monkeypatch.undo()
    assert info.value.rolled_back and len(calls) == 2
    after = target.current_weights()
    assert set(after) == set(before)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert any(k.startswith("seg0:") for k in before) and "seg1:scale" in before
    assert torch.equal(target(X)["logits"], out_before)


def test_validation_failure_touches_nothing(engine):
    target = engine.clone()
    before = {k: np.array(v, copy=True) for k, v in target.current_weights().items()}
    state = _make(1).state_dict()
    state["scale"] = torch.full((8,), float("nan"))
    with pytest.raises(refitcore.WeightMappingError):
        refitcore.apply_mapping(target, {k: v.copy() for k, v in
                                         refitcore.cached_mapping(engine.weight_map, _make(1).state_dict()).items()}
                                | {"seg1:scale": np.full(8, np.nan, np.float32)}, in_place=True)
    assert all(np.array_equal(before[k], v) for k, v in target.current_weights().items())


@pytest.mark.parametrize("segment_kind", ["tensorrt", "torch"])
def test_wrong_mapping_in_a_segment_is_caught_and_named(engine, segment_kind):
    """A wrong recipe in one segment's map: the cached path disagrees with eager, the audit against the
    fallback names that segment's weight, and auto falls back."""
    bad = engine.clone()
    wm = refitcore.WeightMap.from_json(engine.weight_map.to_json())
    if segment_kind == "torch":
        name = "seg1:scale"
    else:
        name = next(n for n in wm.sources if n.startswith("seg2:") and n.endswith("weight CONSTANT")
                    or n.startswith("seg2:") and "KERNEL" in n)
    src = wm.sources[name]
    other = next(k for k in wm.key_specs if k != src.keys[0] and wm.key_specs[k] == wm.key_specs[src.keys[0]])
    wm.sources[name] = src.with_keys_renamed({src.keys[0]: other})
    bad.weight_map = wm
    result = refitcore.refit(bad, _make(1), path="auto", verify_inputs=[X])
    assert result.fell_back and result.audit is not None and not result.audit.ok
    assert any(name in m for m in result.messages), result.messages
    assert name.split(":")[0] + ":" in str(result.audit)
    strict = refitcore.refit(bad, _make(1), path="cached", verify_inputs=[X])
    assert not strict and "MISMATCH" in str(strict.verdict)


def test_save_load_keeps_every_segment(engine, tmp_path):
    path = tmp_path / "mixed.trtrefit"
    engine.save(path)
    loaded = refitcore.load(path)
    assert _kinds(loaded) == _kinds(engine)
    assert loaded.weight_names == engine.weight_names
    assert loaded.partition.fallback == engine.partition.fallback
    out, ref = loaded(X), engine(X)
    assert torch.equal(out["logits"], ref["logits"]) and out["aux"][1] is None
    new = _make(2)
    for p in ("cached", "fallback"):
        result = refitcore.refit(loaded, new, path=p, verify_inputs=[X], reference_model=new)
        assert result, str(result)


def test_load_imports_nothing_the_file_names(tmp_path):
    """A ModelOutput-like output type from a module the loading process never imported comes back as a
    plain dict, and its module stays unimported; passing the class rebuilds it."""
    pkg = tmp_path / "outmod_xyz.py"
    pkg.write_text(
        "import torch, torch.utils._pytree as pt\n"
        "class Out(dict):\n    pass\n"
        "pt.register_pytree_node(Out, lambda d: (list(d.values()), list(d.keys())),\n"
        "    lambda v, k: Out(zip(k, v)), serialized_type_name='outmod_xyz.Out')\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.l = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        return Out(y=torch.cumsum(self.l(x), 1), z=self.l(x).relu())\n")
    script = (
        "import sys, torch; sys.path.insert(0, {d!r}); import refitcore, outmod_xyz\n"
        "e = refitcore.compile(outmod_xyz.M().eval(), torch.randn(2, 4), backend='reference', min_block_size=1)\n"
        "assert type(e(torch.randn(2, 4))).__name__ == 'Out'\n"
        "e.save({f!r})\n")
    f = str(tmp_path / "e.trtrefit")
    subprocess.run([sys.executable, "-c", script.format(d=str(tmp_path), f=f)], check=True)
    check = (
        "import sys, torch, refitcore\n"
        "e = refitcore.load({f!r})\n"
        "out = e(torch.randn(2, 4))\n"
        "assert type(out) is dict and sorted(out) == ['y', 'z'], out\n"
        "assert 'outmod_xyz' not in sys.modules\n"
        "sys.path.insert(0, {d!r}); import outmod_xyz\n"
        "again = refitcore.load({f!r}, output_types=[outmod_xyz.Out])(torch.randn(2, 4))\n"
        "assert type(again) is outmod_xyz.Out\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", check.format(f=f, d=str(tmp_path))], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_torch_program_resolves_aten_only():
    from refitcore.partition.torch_program import TorchProgram

    with pytest.raises(ValueError, match="aten"):
        TorchProgram([{"name": "x", "op": "os.system", "args": ["true"], "kwargs": {}}])


def test_summary_counts_ops_and_weights(engine):
    cov = engine.summary()
    assert 0 < cov.op_share < 1 and 0 < cov.weight_share < 1
    assert cov.ops_total == cov.ops_tensorrt + len(engine.partition.fallback)
    text = str(engine)
    assert "run in PyTorch" in text and "aten.cumsum.default at <top level>" in text
    assert refitcore.compile(nn.Linear(4, 4).eval(), torch.randn(1, 4), backend="reference").summary().op_share == 1


def cli_mixed() -> nn.Module:
    """Factory for the CLI test below."""
    return _make(0)


def test_cli_compile_prints_the_coverage(tmp_path, capsys):
    from refitcore.cli import main as cli

    out = tmp_path / "m.trtrefit"
    assert cli.main(["compile", "tests.test_partition:cli_mixed", "--input", "2x3x8", "--backend", "reference",
                     "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TensorRT (reference) runs" in printed and "of the weights" in printed, printed
    loaded = refitcore.load(out)
    assert str(loaded.summary()).splitlines()[0] in printed


def test_segmented_engine_satisfies_the_backend_protocols(engine):
    from refitcore.backends import base

    assert isinstance(engine.impl, base.EngineImpl)
    assert isinstance(engine.impl.create_refitter(), base.Refitter)
    proto = engine.impl.prototype("seg1:scale")
    assert proto.count == 8 and proto.dtype == "FLOAT"


def test_a_failing_converter_moves_only_its_call_to_pytorch(monkeypatch):
    """A converter that crashes (a bug, not a refusal): that call runs in PyTorch, named with the error;
    the rest of its segment stays in TensorRT and the model still matches eager."""
    import dataclasses

    from refitcore.conversion import convert as convert_module

    real_lookup = convert_module.lookup

    def broken(target):
        entry = real_lookup(target)
        if str(target) == "aten.tanh.default":
            def boom(*_a, **_k):
                raise RuntimeError("boom")
            return dataclasses.replace(entry, fn=boom)
        return entry

    monkeypatch.setattr(convert_module, "lookup", broken)
    e = refitcore.compile(_make(0), X, backend="reference", min_block_size=1, torch_executed_ops=TORCH_OPS)
    reasons = {v[0]: v[2] for v in e.partition.fallback.values()}
    assert reasons["aten.tanh.default"] == "converter failed: RuntimeError: boom"
    assert any(n.startswith("seg") and "b/linear" in n for n in e.weight_names)   # b's linear stayed in TensorRT
    torch.testing.assert_close(e(X)["logits"], _make(0)(X)["logits"], rtol=1e-5, atol=1e-5)


def test_an_unusable_backend_is_an_error_not_a_fallback(monkeypatch):
    """A backend that cannot build or run here raises; it never silently turns every segment into PyTorch."""
    from refitcore.backends import reference

    def unusable(*_a, **_k):
        raise refitcore.BackendUnavailableError("no engine can run on this GPU")

    monkeypatch.setattr(reference, "build", unusable)
    with pytest.raises(refitcore.BackendUnavailableError):
        refitcore.compile(_make(0), X, backend="reference", min_block_size=1, torch_executed_ops=TORCH_OPS)
