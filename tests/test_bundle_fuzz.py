"""Fuzzing saved engines: bit flips, truncations and crafted headers (with recomputed checksums, as
another tool could write them). Every load either gives an engine equivalent to the saved one or
raises BundleError, never another exception; crafted shapes never make anything allocate."""
from __future__ import annotations

import json
import random
import struct
import zlib

import numpy as np
import pytest

import refitcore
from refitcore.engine import bundle
from tests.conftest import bit_identical, outputs

MODEL = "residual"
# Bounded and deterministic: a fixed number of seeded mutations per test (a time budget would try
# more on a fast machine and make the outcome depend on the machine).
FLIPS = 150
CRAFTED = 400


@pytest.fixture(scope="module")
def original(compiled, tmp_path_factory):
    c = compiled(MODEL)
    path = tmp_path_factory.mktemp("fuzz") / "engine.trtrefit"
    c.engine.save(path)
    return c, path.read_bytes()


def _split(data: bytes):
    _magic, _version, head_len = struct.unpack_from("<8sIQ", data)
    start = struct.calcsize("<8sIQ")
    return json.loads(data[start:start + head_len]), data[start + head_len + 4:]


def _repack(header, body: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (struct.pack("<8sIQ", bundle.MAGIC, bundle.BUNDLE_VERSION, len(head)) + head
            + struct.pack("<I", zlib.crc32(head)) + body)


def _load(tmp_path, data: bytes):
    """The loaded engine, or None for a BundleError; any other exception fails the test."""
    path = tmp_path / "fuzzed.trtrefit"
    path.write_bytes(data)
    try:
        return refitcore.load(path)
    except refitcore.BundleError as err:
        assert str(path) in str(err)
        return None


def _equivalent(a, b, x) -> bool:
    wa, wb = a.current_weights(), b.current_weights()
    return (a.weight_names == b.weight_names and a.weight_map == b.weight_map and a.io == b.io
            and all(wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa)
            and bit_identical(outputs(a, x), outputs(b, x)))


def test_bit_flips_and_truncations(original, tmp_path):
    c, data = original
    rng = random.Random(1234)
    for tried in range(FLIPS):
        mutated = bytearray(data)
        if tried % 3 == 2:
            mutated = mutated[:rng.randrange(len(data))]
        else:
            for _ in range(rng.choice((1, 1, 2, 8))):
                mutated[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        loaded = _load(tmp_path, bytes(mutated))
        if loaded is not None:
            assert _equivalent(c.engine, loaded, c.x), "a damaged file loaded as a different engine"


NASTY = [None, True, -1, 0, 2 ** 63, -2 ** 63, 1e308, float("nan"), "", "x" * 300, [], {}, [[[[]]]],
         [-1, 3], [2 ** 20, 2 ** 20, 2 ** 20], {"name": 5}, [{"name": "w/x"}], "FLOAT", "float64", "object"]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):     # a few elements of each list: the structure repeats
            yield from _paths(v, prefix + (i,))


def _replace(node, path, value):
    if not path:
        return value
    node = dict(node) if isinstance(node, dict) else list(node)
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


def _delete(node, path):
    node = dict(node) if isinstance(node, dict) else list(node)
    if len(path) == 1:
        del node[path[0]]
    else:
        node[path[0]] = _delete(node[path[0]], path[1:])
    return node


def test_crafted_headers(original, tmp_path):
    c, data = original
    header, body = _split(data)
    paths = [p for p in _paths(header) if p and not (p[0] == "weight_map" and len(p) > 4)]
    rng = random.Random(99)
    loaded_ok = 0
    for _ in range(CRAFTED):
        path = rng.choice(paths)
        mutated = _delete(header, path) if rng.random() < 0.15 else _replace(header, path, rng.choice(NASTY))
        loaded = _load(tmp_path, _repack(mutated, body))
        if loaded is not None:
            loaded_ok += 1
            # A header that still loads must describe an engine that holds the saved weights.
            wa, wb = c.engine.current_weights(), loaded.current_weights()
            assert set(wa) == set(wb) and all(np.array_equal(wa[k].reshape(-1), wb[k].reshape(-1)) for k in wa)


@pytest.mark.parametrize("edit,needle", [
    (lambda h: dict(h, io=dict(h["io"], input_shapes=[[100000, 100000, 3, 16]])), "elements, more than"),
    (lambda h: dict(h, io=dict(h["io"], input_shapes=[[-4, 3]])), "non-negative"),
    (lambda h: dict(h, io=dict(h["io"], input_names=[])), "differ in length"),
    (lambda h: dict(h, io=dict(h["io"], input_dtypes=["complex128"])), "input_dtypes"),
    (lambda h: dict(h, buffers=[dict(b, dtype="object") for b in h["buffers"]]), "dtype"),
    (lambda h: dict(h, buffers=[dict(b, shape=[b["nbytes"]]) for b in h["buffers"]]), "do not hold"),
    (lambda h: dict(h, buffers=[dict(b, offset=-1) for b in h["buffers"]]), "outside"),
    (lambda h: dict(h, buffers=h["buffers"] + h["buffers"][:1]), "listed twice"),
    (lambda h: dict(h, buffers=[h["buffers"][0], dict(h["buffers"][1], offset=0)] + h["buffers"][2:]),
     "end to end"),
    (lambda h: dict(h, buffers=[dict(b, offset=0) for b in h["buffers"]]), "overlap"),
    (lambda h: dict(h, buffers={"not": "a list"}), "buffers should be list"),
    (lambda h: dict(h, buffers_nbytes="12"), "buffers_nbytes should be int"),
    (lambda h: dict(h, state_keys=[1, 2]), "state_keys"),
    (lambda h: dict(h, fingerprint=None), "fingerprint"),
    (lambda h: dict(h, impl=dict(h["impl"], plan=dict(h["impl"]["plan"], layers=[{"type": "NOPE"}]))), "invalid"),
    (lambda h: dict(h, impl=dict(h["impl"], plan=dict(h["impl"]["plan"], layers=[]))), "invalid"),
    (lambda h: dict(h, weight_map=dict(h["weight_map"], sources={})), "different weights"),
    (lambda h: dict(h, graph_entries=json.loads("[" * 500 + "]" * 500)), "nests deeper"),
], ids=["huge-input", "negative-dim", "io-lengths", "input-dtype", "object-dtype", "shape-vs-bytes", "negative-offset",
        "duplicate-buffer", "aliased-buffer", "overlapping-buffers", "buffers-not-list", "nbytes-not-int", "state-keys",
        "fingerprint", "unknown-layer",
        "no-layers", "map-vs-engine", "deep-nesting"])
def test_crafted_header_is_a_bundle_error(original, tmp_path, edit, needle):
    _c, data = original
    header, body = _split(data)
    path = tmp_path / "bad.trtrefit"
    path.write_bytes(_repack(edit(header), body))
    with pytest.raises(refitcore.BundleError) as info:
        refitcore.load(path)
    assert needle in str(info.value) and str(path) in str(info.value), str(info.value)


def test_json_deeper_than_the_parser_allows_is_a_bundle_error(original, tmp_path):
    _c, data = original
    _header, body = _split(data)
    path = tmp_path / "bad.trtrefit"
    path.write_bytes(_repack(b"[" * 200000 + b"]" * 200000, body))
    with pytest.raises(refitcore.BundleError, match="nest"):
        refitcore.load(path)


def test_nesting_is_counted_outside_strings_only():
    """Brackets, quotes and backslashes inside strings do not count; an unterminated string of
    escaped quotes (a crafted header) is settled in one pass, then refused by the parser."""
    from refitcore.engine.bundle import MAX_DEPTH, check_depth

    inner = json.dumps({"name": "a[[[{{{\"]]]" + "\\" * 3 + "\"[" * 100, "list": [[1, [2]], "]]]}"]}).encode()
    check_depth(inner, "<test>")                                   # depth 3: accepted
    deep = json.dumps(json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))).encode()
    with pytest.raises(refitcore.BundleError, match="nests deeper"):
        check_depth(deep, "<test>")
    check_depth(b'"' + b'\\"' * 500_000, "<test>")               # 1 MB unterminated string: no depth at all
    with pytest.raises(refitcore.BundleError, match="nests deeper"):
        check_depth(b'"' + b'\\"' * 1000 + b'"' + b"[" * (MAX_DEPTH + 1), "<test>")
