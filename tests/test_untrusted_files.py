"""An engine file is untrusted input, whatever its checksums: the ops its weight map and its PyTorch
segments name come from one allowlist (refitcore.conversion.allowed_ops), every shape they imply is
bounded before anything runs, and crafted content is a BundleError (CLI exit 2, no traceback) for
load, refit, audit, gate, a cache hit and a plain run of a partitioned engine."""
from __future__ import annotations

import copy
import json
import os
import random
import struct
import time

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore.cli import main as cli
from refitcore.conversion import allowed_ops
from refitcore.conversion.convert import convert  # noqa: F401  (registers the built-in converters)
from refitcore.conversion.recipes import evaluate_operand
from refitcore.conversion.registry import registered_targets
from refitcore.errors import BundleContentError, BundleError
from refitcore.partition.torch_program import TorchProgram
from tests.cli_models import randomized_state, small_net
from tests.models import SMALL, make
from tests.test_bundle_fuzz import _repack, _split

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
BIG = [2 ** 17, 2 ** 17]     # 2^34 one-byte elements: 16 GiB


def _writes(path) -> dict:
    """An operand that maps ``path`` into memory (creating it): aten.from_file with shared=True."""
    return {"op": "aten.from_file.default", "args": [str(path), True, 4], "kwargs": {"dtype": {"dtype": "float32"}}}


def _first_copy_source(header) -> str:
    return next(n for n, s in header["weight_map"]["sources"].items() if s["recipe"] == "copy")


def _poison_map(header, operand) -> dict:
    """The header with one copy source reading ``add(its key, operand)``."""
    header = copy.deepcopy(header)
    src = header["weight_map"]["sources"][_first_copy_source(header)]
    src["inputs"]["x"] = {"op": "aten.add.Tensor", "args": [src["inputs"]["x"], operand], "kwargs": {}}
    return header


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    engine = refitcore.compile(small_net(), X, backend="reference")
    engine.save(d / "m.trtrefit")
    torch.save(randomized_state(1), d / "good.pt")
    header, body = _split((d / "m.trtrefit").read_bytes())
    return d, header, body


def _crafted(saved, tmp_path, header) -> str:
    _d, _h, body = saved
    path = tmp_path / "crafted.trtrefit"
    path.write_bytes(_repack(header, body))
    return str(path)


# ---- the allowlist ------------------------------------------------------------------------------

def test_the_committed_allowlist_is_what_the_registry_gives():
    """On the torch the list was generated with (its header says which), the list is exactly what
    the registry gives. On another torch every op of the list must still pass the rules (an op whose
    schema changed to write an argument would be refused by the regenerated list, so the committed one
    must not keep it); ops that torch added are simply not allowed until the list is regenerated."""
    import re

    header = allowed_ops.LIST_FILE.read_text(encoding="utf-8").split("\n", 2)[1]
    made_with = re.search(r"\(torch (\d+\.\d+)\)", header)
    assert made_with, header
    generated = allowed_ops.generate()
    if ".".join(torch.__version__.split(".")[:2]) == made_with.group(1):
        assert sorted(allowed_ops.ALLOWED_OPS) == generated, (
            "regenerate refitcore/conversion/allowed_ops.txt from allowed_ops.generate()")
    else:
        assert not sorted(set(allowed_ops.ALLOWED_OPS) - set(generated)), (
            f"ops of the list that torch {torch.__version__}'s registry no longer allows: regenerate "
            f"refitcore/conversion/allowed_ops.txt and review the difference")


def test_the_allowlist_holds_no_file_storage_random_or_in_place_op():
    for name in ("aten.from_file.default", "aten.fill_.Scalar", "aten.add_.Tensor", "aten.copy_.default",
                 "aten.set_.source_Storage", "aten.set.source_Storage", "aten.rand.default", "aten.bernoulli.default",
                 "aten._copy_from.default", "aten.bincount.default", "aten.add.out", "aten._print.default",
                 "aten.repeat_interleave.Tensor", "aten._sparse_coo_tensor_unsafe.default"):
        assert name not in allowed_ops.ALLOWED_OPS, name


def test_every_op_a_converter_handles_is_allowed():
    targets = [t for t in registered_targets() if t.startswith("aten.")]
    assert targets and not [t for t in targets if t not in allowed_ops.ALLOWED_OPS]


def _ops_in(operand):
    if isinstance(operand, dict):
        if "op" in operand:
            yield operand["op"]
        for v in operand.values():
            yield from _ops_in(v)
    elif isinstance(operand, list):
        for v in operand:
            yield from _ops_in(v)


class Folding(nn.Module):
    """Weights transformed before use (transpose, scale, slice): the map records those ops."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return torch.nn.functional.linear(x, (self.w.t() * 2.0).t(), self.b[:8] + self.b[8:])


class Partly(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 6)

    def forward(self, x):
        return torch.cumsum(self.l(x), 1).relu() + torch.zeros(6).new_ones(6)


def test_every_op_the_converter_and_partitioner_emit_on_the_test_models_is_allowed(tmp_path):
    emitted = set()
    for name in SMALL:
        model, x = make(name)
        emitted |= {op for s in refitcore.compile(model, x, backend="reference").weight_map.sources.values()
                    for op in _ops_in(s.inputs)}
    folded = refitcore.compile(Folding(), torch.randn(2, 6), backend="reference")
    emitted |= {op for s in folded.weight_map.sources.values() for op in _ops_in(s.inputs)}
    partly = refitcore.compile(Partly(), torch.randn(2, 6), backend="reference", min_block_size=1,
                               torch_executed_ops=["aten.cumsum.default"])
    partly.save(tmp_path / "p.trtrefit")
    header, _ = _split((tmp_path / "p.trtrefit").read_bytes())
    program = header["impl"]["program"]
    emitted |= {r["op"] for r in program if r["op"].startswith("aten.")}
    assert {"aten.t.default", "aten.cumsum.default"} <= emitted
    assert not emitted - allowed_ops.ALLOWED_OPS
    loaded = refitcore.load(tmp_path / "p.trtrefit")      # a compiled engine always loads
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded(x), partly(x))


def test_a_weight_op_outside_the_allowlist_is_refused_at_compile():
    class Seeded(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ torch.bernoulli(torch.sigmoid(self.w))

    with pytest.raises(refitcore.UnsupportedOperatorError, match="allowed_ops"):
        refitcore.compile(Seeded(), torch.randn(1, 4), backend="reference")


# ---- a crafted weight map ------------------------------------------------------------------------

def test_load_refuses_an_operand_that_writes_a_file(saved, tmp_path):
    target = tmp_path / "written.pth"
    path = _crafted(saved, tmp_path, _poison_map(saved[1], _writes(target)))
    with pytest.raises(BundleError, match="aten.from_file.default") as info:
        refitcore.load(path)
    assert path in str(info.value) and "\n" not in str(info.value)
    assert not target.exists()


def test_refit_refuses_an_operand_that_writes_a_file(tmp_path):
    """Defence in depth: a map that bypassed loading (built in memory) is checked again at evaluation."""
    target = tmp_path / "written.pth"
    engine = refitcore.compile(small_net(), X, backend="reference")
    _poison_engine(engine, target)
    before = {k: v.copy() for k, v in engine.current_weights().items()}
    with pytest.raises(BundleError, match="aten.from_file.default"):
        refitcore.refit(engine, randomized_state(1), path="cached", in_place=True)
    assert not target.exists()
    after = engine.current_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_audit_and_gate_refuse_an_operand_that_writes_a_file(saved, tmp_path, capsys):
    d, header, _ = saved
    target = tmp_path / "written.pth"
    path = _crafted(saved, tmp_path, _poison_map(header, _writes(target)))
    assert cli.main(["audit", path, str(d / "m.trtrefit"), "-q"]) == 2
    assert cli.main(["gate", path, str(d / "good.pt"), "--inputs", "random:1", "--model",
                     "tests.cli_models:small_net", "-q"]) == 2
    err = capsys.readouterr().err
    assert "aten.from_file.default" in err and "Traceback" not in err
    report = refitcore.gate(path, d / "good.pt", "random:1", model="tests.cli_models:small_net")
    assert report.exit_code == 2 and not report.ok
    assert not target.exists()


def _poison_engine(engine, target) -> None:
    """Make one copy source of ``engine``'s weight map (in memory) read a file-writing operand."""
    name = next(n for n, s in engine.weight_map.sources.items() if s.recipe == "copy")
    src = engine.weight_map.sources[name]
    poisoned = {"op": "aten.add.Tensor", "args": [src.inputs["x"], _writes(target)], "kwargs": {}}
    engine.weight_map.sources[name] = type(src)(src.recipe, {"x": poisoned}, src.params, src.shape, src.dtype)


def test_a_poisoned_cache_entry_is_a_miss_and_is_replaced(tmp_path):
    from refitcore.cache.key import CacheKey
    from refitcore.cache.store import pack_entry

    model, x = make("tied_mlp", 0)
    refitcore.compile(model, x, backend="reference", cache=str(tmp_path))
    entry, = tmp_path.glob("*.engine")
    blob = entry.read_bytes()
    _magic, _version, n = struct.unpack_from("<8sII", blob)
    key = CacheKey.from_json(json.loads(blob[16:16 + n])["key"])
    target = tmp_path / "written.pth"
    engine = refitcore.compile(model, x, backend="reference")
    _poison_engine(engine, target)
    entry.write_bytes(pack_entry(key, engine))
    other, _ = make("tied_mlp", 4)
    hit = refitcore.compile(other, x, backend="reference", cache=str(tmp_path), verify_inputs=[x])
    assert hit.cache_hit is False and not target.exists()
    again = refitcore.compile(make("tied_mlp", 5)[0], x, backend="reference", cache=str(tmp_path))
    assert again.cache_hit is True and not target.exists()


def test_a_16_gib_constant_operand_is_refused_fast(saved, tmp_path):
    full = {"op": "aten.full.default", "args": [BIG, 1], "kwargs": {"dtype": {"dtype": "uint8"}}}
    summed = {"op": "aten.sum.default", "args": [full], "kwargs": {}}
    path = _crafted(saved, tmp_path, _poison_map(saved[1], summed))
    start = time.perf_counter()
    with pytest.raises(BundleError, match="elements"):
        refitcore.load(path)
    assert time.perf_counter() - start < 1.0


# ---- a crafted partitioned engine ------------------------------------------------------------------

@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    d = tmp_path_factory.mktemp("segments")
    engine = refitcore.compile(Partly(), torch.randn(2, 6), backend="reference", min_block_size=1,
                               torch_executed_ops=["aten.cumsum.default"])
    engine.save(d / "p.trtrefit")
    header, body = _split((d / "p.trtrefit").read_bytes())
    return engine, header, body


def _poison_program(header, record) -> dict:
    """The header with a cumsum record's input replaced by ``record``'s value."""
    header = copy.deepcopy(header)
    program = header["impl"]["program"]
    i = next(i for i, r in enumerate(program) if r["op"] == "aten.cumsum.default")
    program.insert(i, dict(record, name="evil"))
    program[i + 1]["args"][0] = {"node": "evil"}
    return header


def test_a_segment_record_that_writes_a_file_is_refused_at_load(partitioned, tmp_path):
    _engine, header, body = partitioned
    target = tmp_path / "written.pth"
    record = {"op": "aten.from_file.default", "args": [str(target), True, 12], "kwargs": {}}
    path = tmp_path / "p.trtrefit"
    path.write_bytes(_repack(_poison_program(header, record), body))
    with pytest.raises(BundleError, match="aten.from_file.default") as info:
        refitcore.load(path)
    assert str(path) in str(info.value)
    assert not target.exists()


def test_a_segment_record_is_checked_again_at_run(partitioned, tmp_path):
    """A program that bypassed loading (records edited in memory) still never runs a refused op."""
    engine, _header, _body = partitioned
    target = tmp_path / "written.pth"
    program = engine._impl.program
    saved_records = dict(program.records)
    name = next(n for n, r in program.records.items() if r["op"] == "aten.cumsum.default")
    try:
        program.records[name] = dict(program.records[name], op="aten.from_file.default",
                                     args=[str(target), True, 12], kwargs={})
        with pytest.raises(BundleError, match="aten.from_file.default"):
            engine(torch.randn(2, 6))
        program.records[name] = dict(saved_records[name], op="aten.full.default", args=[BIG, 1.0], kwargs={})
        with pytest.raises(BundleError, match="elements"):
            engine(torch.randn(2, 6))
    finally:
        program.records.clear()
        program.records.update(saved_records)
    assert not target.exists()


def test_a_16_gib_segment_record_is_refused_at_load(partitioned, tmp_path):
    _engine, header, body = partitioned
    record = {"op": "aten.full.default", "args": [BIG, 1.0], "kwargs": {}}
    path = tmp_path / "p.trtrefit"
    path.write_bytes(_repack(_poison_program(header, record), body))
    start = time.perf_counter()
    with pytest.raises(BundleError, match="elements"):
        refitcore.load(path)
    assert time.perf_counter() - start < 1.0


# ---- each crafted content case: BundleError, CLI exit 2, no traceback ------------------------------

def _source(h):
    return h["weight_map"]["sources"][_first_copy_source(h)]


def _edit(fn):
    def edit(h):
        h = copy.deepcopy(h)
        fn(h)
        return h
    return edit


CASES = {
    "unknown-op": _edit(lambda h: _source(h)["inputs"].update(x={"op": "aten.nope.default", "args": [], "kwargs": {}})),
    "non-aten-op": _edit(lambda h: _source(h)["inputs"].update(x={"op": "os.system", "args": ["true"]})),
    "bad-op-arguments": _edit(lambda h: _source(h)["inputs"].update(
        x={"op": "aten.permute.default", "args": [_source(h)["inputs"]["x"], [7, 7, 7]], "kwargs": {}})),
    "unknown-recipe": _edit(lambda h: _source(h).update(recipe="guess")),
    "bad-recipe-param": _edit(lambda h: _source(h).update(params={"eps": "x"})),
    "negative-shape": _edit(lambda h: _source(h).update(shape=[-4, 3])),
    "void-dtype": _edit(lambda h: _source(h).update(dtype="void")),
    "bad-index": _edit(lambda h: _source(h)["inputs"].update(
        x={"op": "aten.permute.default", "args": [_source(h)["inputs"]["x"], [0, 1]], "kwargs": {}, "index": 9})),
    "unknown-operand-kind": _edit(lambda h: _source(h)["inputs"].update(x={"file": "/etc/passwd"})),
    "undeclared-key": _edit(lambda h: _source(h)["inputs"].update(x={"key": "not.a.key"})),
    "void-constant": _edit(lambda h: h["weight_map"].update(
        constants={"c0": {"dtype": "V8", "shape": [1], "data": "AAAAAAAAAAA="}})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_content_is_a_bundle_error_and_cli_exit_2(saved, tmp_path, capsys, case):
    d, header, _ = saved
    path = _crafted(saved, tmp_path, CASES[case](header))
    with pytest.raises(BundleError) as info:
        refitcore.load(path)
    assert path in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert cli.main(["audit", path, str(d / "m.trtrefit"), "-q"]) == 2
    err = capsys.readouterr().err
    assert path in err and "Traceback" not in err


# ---- fuzz: only allowed, bounded records evaluate ------------------------------------------------

BOUND = 2 ** 16
OUTSIDE = ["aten.from_file.default", "aten.fill_.Scalar", "aten.add_.Tensor", "aten.bernoulli.default",
           "aten.bincount.default", "aten.copy_.default", "aten.rand.default", "builtins.eval"]


def _tree(rng: random.Random, depth: int):
    """(operand, the shape of its result or None when a tensor it makes exceeds BOUND, whether it
    names an op outside the allowlist), from a small palette whose shapes are known here."""
    if depth == 0 or rng.random() < 0.25:
        return {"key": "w"}, (2, 3), False
    kind = rng.randrange(6)
    if kind == 2:
        dims = [rng.choice([1, 3, 2 ** 9, 2 ** 17]) for _ in range(rng.randrange(1, 3))]
        full = {"op": "aten.full.default", "args": [dims, 1.0], "kwargs": {}}
        return {"op": "aten.sum.default", "args": [full], "kwargs": {}}, (() if np.prod(dims) <= BOUND else None), False
    arg, shape, outside = _tree(rng, depth - 1)
    if kind == 0:
        return {"op": "aten.mul.Scalar", "args": [arg, rng.choice([2, 0.5])], "kwargs": {}}, shape, outside
    if kind == 1:
        return {"op": "aten.add.Tensor", "args": [arg, arg], "kwargs": {}}, shape, outside
    if kind == 3:
        reps = rng.choice([1, 4, 2 ** 12])
        expanded = {"op": "aten.repeat.default", "args": [arg, [reps, 1]], "kwargs": {}}
        summed = {"op": "aten.sum.dim_IntList", "args": [expanded, [0]], "kwargs": {}}
        if shape is None:
            return summed, None, outside
        s0, s1 = ((1, 1) + tuple(shape))[-2:]
        return summed, ((s1,) if reps * s0 * s1 <= BOUND else None), outside
    if kind == 4:
        return {"op": rng.choice(OUTSIDE), "args": [arg], "kwargs": {}}, shape, True
    return {"op": "aten.neg.default", "args": [arg], "kwargs": {}}, shape, outside


def test_fuzz_only_allowed_bounded_operand_trees_evaluate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(22)
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    evaluated = refused = 0
    for _ in range(300):
        operand, shape, outside = _tree(rng, 4)
        try:
            evaluate_operand(operand, state, {}, max_elements=BOUND)
            evaluated += 1
            ok = True
        except BundleContentError:
            refused += 1
            ok = False
        assert ok == (not outside and shape is not None), operand
        try:                                               # the same tree as segment records
            records = _records(operand)
            prog = TorchProgram(records, max_elements=BOUND)
            prog.run([records[-1]["name"]], {}, state, {})
            run_ok = True
        except BundleContentError:
            run_ok = False
        assert run_ok == ok, operand
    assert evaluated > 30 and refused > 30
    assert not os.listdir(tmp_path)


def _records(operand) -> list[dict]:
    """An operand tree as PyTorch-segment node records (``{"key"}`` -> ``{"param"}``)."""
    out: list[dict] = []

    def walk(o):
        if isinstance(o, dict) and "op" in o:
            name = f"n{len(out)}_{id(o)}"
            args = [walk(a) for a in o["args"]]
            out.append({"name": name, "op": o["op"], "args": args, "kwargs": {}})
            return {"node": name}
        if isinstance(o, dict) and "key" in o:
            return {"param": o["key"]}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    root = walk(operand)
    if not out:
        out.append({"name": "root", "op": "aten.clone.default", "args": [root], "kwargs": {}})
    return out
