"""Saved engines: one versioned file (JSON header + raw buffers + CRCs), never pickle; load(save(e))
answers identically, also after a refit; damaged files raise BundleError with a clear message."""
from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import refitcore
from refitcore.engine import bundle
from tests.conftest import bit_identical, outputs

MODEL = "residual"


@pytest.fixture
def saved(compiled, tmp_path):
    c = compiled(MODEL)
    path = tmp_path / "engine.trtrefit"
    c.engine.save(path)
    return c, path


def _same_engine(a, b, x):
    assert a.weight_names == b.weight_names
    assert a.weight_map == b.weight_map
    assert a.io == b.io and a.fingerprint == b.fingerprint and a.backend == b.backend
    wa, wb = a.current_weights(), b.current_weights()
    assert all(wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa)
    assert bit_identical(outputs(a, x), outputs(b, x))


def test_load_save_answers_identically(saved):
    c, path = saved
    loaded = refitcore.load(path)
    _same_engine(c.engine, loaded, c.x)
    assert loaded.exported_program is None


def test_load_save_after_refit_keeps_the_new_weights(compiled, tmp_path):
    c = compiled(MODEL)
    refitted = refitcore.refit(c.engine, c.fresh(5)).engine
    assert not bit_identical(outputs(refitted, c.x), outputs(c.engine, c.x))
    path = tmp_path / "refitted.trtrefit"
    refitted.save(path)
    loaded = refitcore.load(path)
    _same_engine(refitted, loaded, c.x)
    # The loaded engine refits again through its stored weight map, and saves again identically.
    new = c.fresh(6)
    again = refitcore.refit(loaded, new.state_dict(), path="cached", verify_inputs=[c.x], reference_model=new)
    assert again.ok, str(again)
    again.engine.save(tmp_path / "again.trtrefit")
    _same_engine(again.engine, refitcore.load(tmp_path / "again.trtrefit"), c.x)


def test_loaded_engine_fallback_without_a_program_record_needs_a_module(saved, tmp_path):
    """A file without the compiled graph (dynamic shapes, or written before it was saved) re-exports
    the model for its fallback path (tests/test_program_record.py: files with one do not)."""
    c, _ = saved
    header, arrays = c.engine.to_parts()
    del header["program"]
    path = tmp_path / "no_program.trtrefit"
    bundle.write(path, header, arrays)
    loaded = refitcore.load(path)
    new = c.fresh(7)
    with pytest.raises(refitcore.ArchitectureMismatchError, match="nn.Module"):
        refitcore.fallback_mapping(loaded, new.state_dict())
    result = refitcore.refit(loaded, new, path="fallback", verify_inputs=[c.x])
    assert result.ok, str(result)


def _bytes(path) -> bytearray:
    return bytearray(path.read_bytes())


def _header_span(data: bytes) -> tuple[int, int]:
    _magic, _version, head_len = struct.unpack_from("<8sIQ", data)
    start = struct.calcsize("<8sIQ")
    return start, start + head_len


def test_format_is_json_header_plus_raw_buffers(saved):
    _c, path = saved
    data = path.read_bytes()
    assert data[:8] == bundle.MAGIC
    start, end = _header_span(data)
    header = json.loads(data[start:end].decode("utf-8"))
    assert header["format"] == "refitcore.engine" and header["backend"] == "reference"
    assert header["weight_map"]["format"] == "refitcore.weight_map"
    assert {b["name"][2:] for b in header["buffers"] if b["name"].startswith("w/")} == \
        set(refitcore.load(path).weight_names)
    # No pickle anywhere: pickle streams start with PROTO (0x80) and end with STOP.
    assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data


def test_load_never_unpickles(saved, monkeypatch):
    _c, path = saved

    def refuse(*a, **k):
        raise AssertionError("pickle must not be used to load an engine")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert refitcore.load(path).weight_names


def _expect(path, data, *words):
    path.write_bytes(bytes(data))
    with pytest.raises(refitcore.BundleError) as info:
        refitcore.load(path)
    text = str(info.value)
    assert str(path) in text, text
    for w in words:
        assert w in text, text
    return text


def test_truncated_files(saved, tmp_path):
    _c, path = saved
    data = _bytes(path)
    start, end = _header_span(data)
    bad = tmp_path / "bad.trtrefit"
    _expect(bad, data[:5], "truncated")
    _expect(bad, data[: start + 10], "truncated")
    _expect(bad, data[: end + 4 + 100], "truncated")
    _expect(bad, data[:-1], "truncated")
    _expect(bad, b"", "truncated")


def test_corrupted_header_and_buffers(saved, tmp_path):
    _c, path = saved
    data = _bytes(path)
    start, end = _header_span(data)
    bad = tmp_path / "bad.trtrefit"
    head = bytearray(data)
    head[start + (end - start) // 2] ^= 0x01
    _expect(bad, head, "header", "corrupted")
    body = bytearray(data)
    body[end + 4 + (len(data) - end - 4) // 2] ^= 0x40
    _expect(bad, body, "corrupted")
    last = bytearray(data)
    last[-1] ^= 0xFF
    _expect(bad, last, "corrupted")


def test_wrong_magic_and_version(saved, tmp_path):
    _c, path = saved
    data = _bytes(path)
    bad = tmp_path / "bad.trtrefit"
    wrong_magic = bytearray(data)
    wrong_magic[:8] = b"NOTANENG"
    _expect(bad, wrong_magic, "not a refitcore engine")
    wrong_version = bytearray(data)
    struct.pack_into("<I", wrong_version, 8, bundle.BUNDLE_VERSION + 1)
    _expect(bad, wrong_version, "version", str(bundle.BUNDLE_VERSION + 1))


def _repack(data: bytes, edit) -> bytes:
    """A file whose header was changed and whose checksums were recomputed (a well-formed file with
    wrong contents, as another tool or version might write)."""
    start, end = _header_span(data)
    header = json.loads(data[start:end])
    body = data[end + 4:]
    head = edit(header)
    if isinstance(head, dict):
        head = json.dumps(head).encode()
    import zlib
    return (struct.pack("<8sIQ", bundle.MAGIC, bundle.BUNDLE_VERSION, len(head)) + head
            + struct.pack("<I", zlib.crc32(head)) + body)


def test_well_formed_file_with_invalid_content(saved, tmp_path):
    _c, path = saved
    data = bytes(path.read_bytes())
    bad = tmp_path / "bad.trtrefit"
    _expect(bad, _repack(data, lambda h: dict(h, format="something")), "not a refitcore engine")
    _expect(bad, _repack(data, lambda h: b"{not json"), "header")
    _expect(bad, _repack(data, lambda h: "é".encode("latin-1")), "header")
    _expect(bad, _repack(data, lambda h: {k: v for k, v in h.items() if k != "buffers_nbytes"}), "invalid")

    def bad_offset(h):
        h = dict(h)
        h["buffers"] = [dict(b, nbytes=b["nbytes"] + 8) for b in h["buffers"]]
        return h

    _expect(bad, _repack(data, bad_offset), "invalid")

    def wm_version(h):
        return dict(h, weight_map=dict(h["weight_map"], version=99))

    _expect(bad, _repack(data, wm_version), "version")


def test_save_is_atomic(saved, tmp_path):
    _c, path = saved
    assert not list(tmp_path.glob("*.tmp"))
    assert os.listdir(tmp_path) == [path.name]   # no temporary file of any name is left behind


def test_compile_options_are_saved_as_data_and_loaded_back(tmp_path):
    from tests.models import make

    model, x = make(MODEL, 0)
    engine = refitcore.compile(model, x, backend="reference", min_block_size=3,
                               torch_executed_ops=[torch.ops.aten.tanh.default], model_factory="tests.models:nope")
    assert engine.options.min_block_size == 3 and engine.options.torch_executed_ops == ("aten.tanh.default",)
    assert engine.options.backend == "reference" and engine.model_factory == "tests.models:nope"
    engine.save(tmp_path / "e.trtrefit")
    header = json.loads(tmp_path.joinpath("e.trtrefit").read_bytes()[slice(*_header_span(
        tmp_path.joinpath("e.trtrefit").read_bytes()))])
    assert header["options"]["min_block_size"] == 3 and "model_factory" not in header
    loaded = refitcore.load(tmp_path / "e.trtrefit")
    assert loaded.options == engine.options and loaded.model_factory == "tests.models:nope"


def test_a_file_without_options_still_loads(saved, tmp_path):
    """Files written before the options were saved record only the model factory."""
    c, path = saved
    old = tmp_path / "old.trtrefit"

    def before_options(h):
        h = {k: v for k, v in h.items() if k != "options"}
        return dict(h, model_factory="tests.models:residual")

    old.write_bytes(_repack(bytes(path.read_bytes()), before_options))
    loaded = refitcore.load(old)
    assert loaded.model_factory == "tests.models:residual" and loaded.options.backend == "reference"
    _same_engine(c.engine, loaded, c.x)


def test_invalid_options_or_kind_are_bundle_errors(saved, tmp_path):
    _c, path = saved
    data = bytes(path.read_bytes())
    bad = tmp_path / "bad.trtrefit"
    _expect(bad, _repack(data, lambda h: dict(h, options=[1])), "options should be dict")
    _expect(bad, _repack(data, lambda h: dict(h, options=dict(h["options"], strict="yes"))), "options.strict")
    _expect(bad, _repack(data, lambda h: dict(h, options=dict(h["options"], min_block_size=True))),
            "options.min_block_size")
    _expect(bad, _repack(data, lambda h: dict(h, options=dict(h["options"], run="os:system"))), "unknown fields")
    _expect(bad, _repack(data, lambda h: dict(h, impl=dict(h["impl"], kind="torch_tensorrt_v9"))),
            "unknown engine kind")
