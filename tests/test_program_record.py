"""The compiled graph saved with the engine as data (refitcore.engine.program_record): a loaded
engine's fallback path converts it again without a model or an export, bit-identical to the fallback
of the engine compiled in this process; a record that does not give the compiled graph is never
used; a crafted one is refused at load."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

import refitcore
from refitcore.capture.lowering import graph_fingerprint
from refitcore.engine import bundle
from refitcore.engine.program_record import rebuild_program, record_program, weight_inputs
from refitcore.engine.reexport import recorded_program
from tests.dynamic_models import BATCH, tiny_resnet
from tests.models import SMALL, make


def _save_load(engine, path, edit=None):
    header, arrays = engine.to_parts()
    if edit is not None:
        edit(header, arrays)
    bundle.write(path, header, arrays)
    return refitcore.load(path)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", SMALL + ["resnet18"])
def test_loaded_fallback_is_the_in_process_fallback(compiled, tmp_path, name):
    """Folded BatchNorm, tied weights, depthwise, residual: the loaded engine's fallback (recorded
    graph, no module) gives exactly the weights of the in-process one (the engine's own exported
    program) and of the cached path."""
    c = compiled(name)
    loaded = _save_load(c.engine, tmp_path / "e.trtrefit")
    assert loaded.exported_program is None and loaded.record.program is not None
    assert not loaded.model_factory
    new = c.fresh(11).state_dict()
    mine = refitcore.fallback_mapping(loaded, new)
    assert _same(mine, refitcore.fallback_mapping(c.engine, new))
    assert _same(mine, refitcore.cached_mapping(loaded.weight_map, new))


def test_loaded_engine_refits_through_the_fallback_without_a_model(compiled, tmp_path):
    c = compiled("residual")
    loaded = _save_load(c.engine, tmp_path / "e.trtrefit")
    new = c.fresh(12)
    result = refitcore.refit(loaded, new.state_dict(), path="fallback", verify_inputs=[c.x], reference_model=new)
    assert result.ok, str(result)
    # saved again, the loaded engine keeps its record
    again = _save_load(result.engine, tmp_path / "again.trtrefit")
    assert again.record.program == loaded.record.program
    new_state = new.state_dict()
    assert _same(refitcore.fallback_mapping(again, new_state), refitcore.fallback_mapping(c.engine, new_state))


def test_non_persistent_buffers_and_constants_travel_with_the_record(tmp_path):
    class WithConstants(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("scale", torch.linspace(0.5, 2.0, 8), persistent=False)
            self.offset = torch.arange(8.0)    # a plain tensor attribute: a lifted constant

        def forward(self, x):
            return self.fc(x) * self.scale + self.offset

    m, x = WithConstants().eval(), torch.randn(2, 8)
    engine = refitcore.compile(m, x, backend="reference")
    loaded = _save_load(engine, tmp_path / "e.trtrefit")
    assert loaded.record.program_constants, "the record holds no constants"
    new = WithConstants().state_dict()
    assert "scale" not in new
    assert _same(refitcore.fallback_mapping(loaded, new), refitcore.fallback_mapping(engine, new))


def test_keyword_arguments_keep_their_order_through_the_file(tmp_path):
    """The file's JSON is written with sorted keys; the graph's keyword order (``dtype`` before
    ``device``, as the rotary embeddings of transformers' Llama have it) is part of its fingerprint."""
    class Cast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("freq", torch.linspace(0.0, 1.0, 8, dtype=torch.float64), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.freq.to(dtype=torch.float32, device=x.device)

    m, x = Cast().eval(), torch.randn(2, 8)
    engine = refitcore.compile(m, x, backend="reference")
    header, _ = engine.to_parts()
    orders = [[k for k, _ in n["kwargs"]] for n in header["program"]["nodes"] if len(n["kwargs"]) > 1]
    assert any(o != sorted(o) for o in orders), orders
    loaded = _save_load(engine, tmp_path / "e.trtrefit")
    new = Cast().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(refitcore.fallback_mapping(loaded, new, model=Cast()), refitcore.fallback_mapping(engine, new))


def test_partitioned_engine_falls_back_through_its_record(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    engine = refitcore.compile(m, x, backend="reference", min_block_size=1, torch_executed_ops=["aten.tanh"])
    assert engine.partition is not None
    loaded = _save_load(engine, tmp_path / "e.trtrefit")
    assert loaded.record.program is not None
    torch.manual_seed(1)
    new = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).state_dict()
    assert _same(refitcore.fallback_mapping(loaded, new), refitcore.fallback_mapping(engine, new))


def test_dynamic_shapes_are_not_recorded_and_re_export(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_resnet(), torch.randn(2, 3, 16, 16)
    engine = refitcore.compile(model, x, backend="reference", dynamic_shapes={"x": {0: BATCH}})
    record, _, why = record_program(engine.exported_program)
    assert record is None and "dynamic" in why
    loaded = _save_load(engine, tmp_path / "e.trtrefit")
    assert loaded.record.program is None and "dynamic" in loaded.record.program_note
    with pytest.raises(refitcore.ArchitectureMismatchError, match=r"no program record \(node .* dynamic.*nn.Module"):
        refitcore.fallback_mapping(loaded, model.state_dict())


# ---- a record that does not give the compiled graph: never used ---------------------------------------
def _swap_weight_targets(header, _arrays):
    """Two parameters of one shape swapped between their placeholders: a wrong mapping the record
    would otherwise convert faithfully."""
    inputs = header["program"]["inputs"]
    by_shape: dict = {}
    for inp in inputs:
        if inp["kind"] == "PARAMETER":
            by_shape.setdefault((tuple(inp["val"]["tensor"]), inp["val"]["dtype"]), []).append(inp)
    a, b = next(v for v in by_shape.values() if len(v) >= 2)[:2]
    a["target"], b["target"] = b["target"], a["target"]


def _other_activation(header, _arrays):
    node = next(n for n in header["program"]["nodes"] if n["op"] == "aten.relu.default")
    node["op"] = "aten.sigmoid.default"


def _mis_folded(header, _arrays):
    """BatchNorm's running mean and variance read the other way round: the fold would be wrong."""
    node = next(n for n in header["program"]["nodes"] if "batch_norm" in n["op"])
    node["args"][3], node["args"][4] = node["args"][4], node["args"][3]


def _scale_and_shift_swapped(header, _arrays):
    node = next(n for n in header["program"]["nodes"] if n["op"] == "aten.layer_norm.default")
    node["args"][2], node["args"][3] = node["args"][3], node["args"][2]


@pytest.mark.parametrize("edit,model", [(_swap_weight_targets, "conv_bn_relu"), (_other_activation, "residual"),
                                        (_mis_folded, "conv_bn_relu"), (_scale_and_shift_swapped, "tied_mlp")])
def test_a_record_that_is_not_the_compiled_graph_is_refused(compiled, tmp_path, edit, model):
    c = compiled(model)
    loaded = _save_load(c.engine, tmp_path / "e.trtrefit", edit)
    new = c.fresh(13).state_dict()
    with pytest.raises(refitcore.ArchitectureMismatchError, match="program record does not give the compiled graph"):
        refitcore.fallback_mapping(loaded, new)


def test_with_a_model_a_record_that_does_not_serve_gives_way_to_an_export(compiled, tmp_path):
    """The fallback says why and exports the model instead: the right weights again."""
    c = compiled("residual")
    loaded = _save_load(c.engine, tmp_path / "e.trtrefit", _other_activation)
    new = c.fresh(13).state_dict()
    with pytest.warns(RuntimeWarning, match="exports the model again: the engine file's program record"):
        again = refitcore.fallback_mapping(loaded, new, model=c.fresh(13))
    assert _same(again, refitcore.fallback_mapping(c.engine, new))


def test_weights_the_graph_reads_must_all_be_given(compiled, tmp_path):
    c = compiled("residual")
    loaded = _save_load(c.engine, tmp_path / "e.trtrefit")
    new = c.fresh(14).state_dict()
    gone = next(k for k in new if k.endswith("weight"))
    partial = {k: v for k, v in new.items() if k != gone}
    with pytest.raises(refitcore.WeightMappingError, match=re.escape(gone)):   # refused before any conversion
        refitcore.fallback_mapping(loaded, partial)
    # the record's own check, for weights that reach it: it names them, and without a model stops
    with pytest.raises(refitcore.ArchitectureMismatchError, match=re.escape(gone) + ".*pass model="):
        recorded_program(loaded, partial)
    with pytest.warns(RuntimeWarning, match="lack 1 weight"):
        assert recorded_program(loaded, partial, can_export=True) is None


# ---- a crafted record: refused at load, naming what -----------------------------------------------------
def _node(header, op):
    return next(n for n in header["program"]["nodes"] if n["op"] == op)


CRAFTED = {
    "an op outside the allowlist": (lambda h, a: _node(h, "aten.relu.default").update(op="aten.save.default"),
                                    "aten.save"),
    "a Python callable": (lambda h, a: _node(h, "aten.relu.default").update(op="os.system"), "os.system"),
    "a node read before it is made": (
        lambda h, a: _node(h, "aten.relu.default").update(args=[{"node": "not_made_yet"}]), "not_made_yet"),
    "a segment operand": (lambda h, a: _node(h, "aten.relu.default").update(args=[{"param": "conv.weight"}]),
                          "not part of a program record"),
    "a device by path": (lambda h, a: _node(h, "aten.relu.default")["kwargs"].append(["device", {"device": "file:/x"}]),
                         "device"),
    "a missing constant": (lambda h, a: h["program"]["inputs"].append(
        {"name": "c_x", "kind": "CONSTANT_TENSOR", "arg": {"tensor": "c_x"}, "target": "x", "persistent": None,
         "val": {"tensor": [1], "dtype": "float32"}}), "not in the file"),
    "an unknown field": (lambda h, a: _node(h, "aten.relu.default").update(code="print(1)"), "not a node record"),
    "a huge literal size": (lambda h, a: _node(h, "aten.relu.default").update(
        op="aten.zeros.default", args=[[1 << 40]]), "elements"),
    "a bad dtype": (lambda h, a: h["program"]["inputs"][0]["val"].update(dtype="os"), "dtype"),
    "another version": (lambda h, a: h["program"].update(version=99), "version"),
    "a huge value": (lambda h, a: _node(h, "aten.relu.default").update(val={"tensor": [1 << 20, 1 << 20],
                                                                            "dtype": "float32"}), "elements"),
}


@pytest.mark.parametrize("what", sorted(CRAFTED))
def test_a_crafted_record_is_refused_at_load(compiled, tmp_path, what):
    edit, says = CRAFTED[what]
    c = compiled("conv_bn_relu")
    header, arrays = c.engine.to_parts()
    edit(header, arrays)
    path = tmp_path / "crafted.trtrefit"
    bundle.write(path, header, arrays)
    with pytest.raises(refitcore.BundleError, match="program record") as err:
        refitcore.load(path)
    assert says in str(err.value)


def test_the_record_is_json_data_in_the_header(compiled, tmp_path):
    c = compiled("tied_mlp")
    header, _ = c.engine.to_parts()
    text = json.dumps(header["program"])
    assert "torch.ops" not in text and "<built-in" not in text
    assert {n["op"] for n in header["program"]["nodes"]} <= {"getitem"} | {
        n["op"] for n in header["program"]["nodes"] if n["op"].startswith("aten.")}


def test_gate_names_a_changed_model_after_converting_the_record(tmp_path):
    """The gate converts the recorded graph (no export), and exports the model only when the engine
    holds the right weights and still disagrees: then it says recompile, naming the op."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, x = make("residual", 0)
    engine = refitcore.compile(m, x, backend="reference")
    path = tmp_path / "e.trtrefit"
    engine.save(path)
    new = make("residual", 3)[0]

    class Changed(type(new)):
        def forward(self, x):
            return torch.sigmoid(super().forward(x))

    changed = Changed()
    changed.load_state_dict(new.state_dict())
    report = refitcore.gate(str(path), new.state_dict(), [(x,)], paths="fallback", model=lambda: changed.eval())
    assert report.data["exit_code"] == 2, str(report)
    assert "recompile needed" in str(report) and "sigmoid" in str(report)
    good = refitcore.gate(str(path), new.state_dict(), [(x,)], paths="both", model=lambda: make("residual", 0)[0])
    assert good.data["exit_code"] == 0, str(good)


def test_a_crafted_record_that_matches_its_fingerprint_is_still_bounded(compiled, tmp_path):
    """A file can make its record, fingerprint and graph entries agree: an op folded on known values
    is still sized on meta first, and refused before it allocates."""
    c = compiled("conv_bn_relu")
    header, arrays = c.engine.to_parts()
    header["program"]["nodes"].insert(0, {"name": "big", "op": "aten.arange.default", "args": [1 << 40],
                                          "kwargs": [], "val": {"tensor": [4], "dtype": "int64"}, "module": ""})
    program = rebuild_program(header["program"], {}, {})
    header["fingerprint"], header["graph_entries"] = graph_fingerprint(program)
    path = tmp_path / "crafted.trtrefit"
    bundle.write(path, header, arrays)
    loaded = refitcore.load(path)
    with pytest.raises(refitcore.BundleError, match="more than"):
        refitcore.fallback_mapping(loaded, c.fresh(3).state_dict())


def test_buffers_the_forward_never_reads_may_be_left_out(compiled, tmp_path):
    """A checkpoint without BatchNorm's num_batches_tracked (lifted by the export, read by no node):
    the record still serves, with a stand-in nothing reads; a weight a node reads may not be left out."""
    c = compiled("conv_bn_relu")
    loaded = _save_load(c.engine, tmp_path / "e.trtrefit")
    new = c.fresh(15).state_dict()
    partial = {k: v for k, v in new.items() if not k.endswith("num_batches_tracked")}
    assert len(partial) < len(new)
    missing, stand_ins = weight_inputs(loaded.record.program, partial)
    assert not missing and set(stand_ins) == set(new) - set(partial)
    assert all(t.stride() == (0,) * t.dim() for t in stand_ins.values())    # no memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(refitcore.fallback_mapping(loaded, partial), refitcore.fallback_mapping(c.engine, new))
    read = next(k for k in new if k.endswith("running_var"))
    missing, _ = weight_inputs(loaded.record.program, {k: v for k, v in partial.items() if k != read})
    assert missing == [read]
