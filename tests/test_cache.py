"""The engine cache: hits refit the caller's weights, damaged entries are misses that get replaced,
concurrent writers lose nothing, and the size bound evicts the least recently used entry."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import refitcore
from refitcore.cache.store import BaseEngineCache, EngineCache, as_cache, pack_entry, unpack_entry
from refitcore.compiler.native import compile_cache_key as cache_key
from tests.models import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile(model, x, cache, **kw):
    return refitcore.compile(model, x, backend="reference", cache=cache, **kw)


def _close(engine, model, x):
    with torch.no_grad():
        want = model.eval()(x)
    got = engine(x)
    return torch.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache directory holding conv_bn_relu's engine (compiled once for the module)."""
    directory = tmp_path_factory.mktemp("engines")
    model, x = make("conv_bn_relu", 0)
    engine = _compile(model, x, str(directory))
    assert engine.cache_hit is False
    return directory, x


def test_no_cache_says_none():
    model, x = make("tied_mlp", 0)
    assert refitcore.compile(model, x, backend="reference").cache_hit is None


def test_hit_refits_new_weights_through_both_paths(warm, caplog):
    directory, x = warm
    other, _ = make("conv_bn_relu", 7)
    with caplog.at_level(logging.INFO, logger="refitcore"):
        engine = _compile(other, x, str(directory))
    assert engine.cache_hit is True and engine.exported_program is None
    assert "engine cache hit" in caplog.text
    assert _close(engine, other, x)
    third, _ = make("conv_bn_relu", 11)
    for path in ("cached", "fallback"):        # the fallback re-exports the module it is given
        result = refitcore.refit(engine, third, path=path, verify_inputs=[(x,)])
        assert result and result.path == path, str(result)
        assert _close(result.engine, third, x)


def test_verification_inputs_that_do_not_fit_are_the_caller_s_error_not_a_miss(warm):
    """Samples of the wrong shape raise as they do without a cache; the good entry is neither
    evicted nor rebuilt."""
    directory, x = warm
    other, _ = make("conv_bn_relu", 7)
    cache = refitcore.EngineCache(str(directory))
    before = [(key, size) for key, size, _ in cache.entries()]   # (reading an entry refreshes its time)
    with pytest.raises(ValueError, match="shape"):
        _compile(other, x, cache, verify_inputs=[(x[:, :1],)])
    assert [(key, size) for key, size, _ in cache.entries()] == before
    assert _compile(other, x, cache, verify_inputs=[(x,)]).cache_hit is True


def test_hit_with_keep_exported_serves_the_fallback_from_a_state_dict(warm):
    directory, x = warm
    other, _ = make("conv_bn_relu", 3)
    engine = _compile(other, x, str(directory), keep_exported=True, verify_inputs=[(x,)])
    assert engine.cache_hit is True and engine.exported_program is not None
    new = make("conv_bn_relu", 5)[0]
    result = refitcore.refit(engine, new.state_dict(), path="fallback", verify_inputs=[(x,)], reference_model=new)
    assert result, str(result)


def _entry_path(directory, model, x) -> str:
    key = cache_key(model, (x,), backend="reference")
    return os.path.join(str(directory), key.digest + ".engine")


def _damage_by(kind: str):
    def damage(path):
        with open(path, "rb") as fh:
            data = bytearray(fh.read())
        if kind == "flipped payload byte":
            data[len(data) // 2] ^= 0xFF
        elif kind == "flipped header byte":
            data[20] ^= 0x01
        elif kind == "truncated":
            data = data[: len(data) * 2 // 3]
        elif kind == "empty":
            data = bytearray()
        elif kind == "not an entry":
            data = bytearray(b"hello" * 10)
        with open(path, "wb") as fh:
            fh.write(bytes(data))
    return damage


DAMAGE = ["flipped payload byte", "flipped header byte", "truncated", "empty", "not an entry"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_entry_is_a_miss_and_is_replaced(tmp_path, kind, caplog):
    model, x = make("tied_mlp", 0)
    _compile(model, x, str(tmp_path))
    path = _entry_path(tmp_path, model, x)
    _damage_by(kind)(path)
    other, _ = make("tied_mlp", 4)
    with caplog.at_level(logging.WARNING, logger="refitcore"):
        engine = _compile(other, x, str(tmp_path))
    assert engine.cache_hit is False
    assert kind == "empty" or "treated as a miss and replaced" in caplog.text
    assert _close(engine, other, x)
    again = _compile(make("tied_mlp", 5)[0], x, str(tmp_path))       # the replacement is whole
    assert again.cache_hit is True


def test_entry_stored_under_another_key_is_a_miss(tmp_path, caplog):
    small, x = make("tied_mlp", 0)
    _compile(small, x, str(tmp_path))
    wider_x = torch.randn(2, 32)                 # another input spec: another key
    src, dst = _entry_path(tmp_path, small, x), _entry_path(tmp_path, small, wider_x)
    os.replace(src, dst)
    with caplog.at_level(logging.WARNING, logger="refitcore"):
        engine = _compile(small, wider_x, str(tmp_path))
    assert engine.cache_hit is False and "stored under another key (differs in inputs)" in caplog.text
    assert list(engine.io.input_shapes[0]) == [2, 32]


def test_unpack_checks_the_key():
    model, x = make("tied_mlp", 0)
    engine = refitcore.compile(model, x, backend="reference")
    key = cache_key(model, (x,), backend="reference")
    blob = pack_entry(key, engine)
    assert unpack_entry(blob, key).weight_names == engine.weight_names
    with pytest.raises(refitcore.BundleError, match="another key"):
        unpack_entry(blob, cache_key(model, (x,), backend="reference", precision="fp16"))


class OtherEps(nn.Module):
    """conv_bias_bn's architecture but another BatchNorm eps: same state_dict, other engine."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8, eps=0.5)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_verification_on_a_hit_rejects_a_wrong_engine(tmp_path, caplog):
    """A wrong map under the right key (planted) is served without verify_inputs, caught with them."""
    model, x = make("conv_bias_bn", 0)
    wrong = OtherEps().eval()
    wrong.load_state_dict(model.state_dict())
    wrong_engine = refitcore.compile(wrong, x, backend="reference")
    cache = EngineCache(tmp_path)
    key = cache_key(model, (x,), backend="reference")
    cache.save(key.digest, pack_entry(key, wrong_engine))
    served = _compile(model, x, cache)
    assert served.cache_hit is True and not _close(served, model, x)       # unverified: the planted engine
    cache.save(key.digest, pack_entry(key, wrong_engine))
    with caplog.at_level(logging.WARNING, logger="refitcore"):
        checked = _compile(model, x, cache, verify_inputs=[(x,)])
    assert checked.cache_hit is False and "does not fit this model" in caplog.text
    assert _close(checked, model, x)
    assert _compile(model, x, cache, verify_inputs=[(x,)]).cache_hit is True   # replaced by a right one


class DictCache(BaseEngineCache):
    def __init__(self):
        self.blobs, self.calls = {}, []

    def save(self, key, blob):
        self.calls.append("save")
        self.blobs[key] = bytes(blob)

    def load(self, key):
        self.calls.append("load")
        return self.blobs.get(key)

    def evict(self, key):
        self.calls.append("evict")
        self.blobs.pop(key, None)


def test_a_custom_cache_object():
    cache = DictCache()
    model, x = make("tied_mlp", 0)
    assert _compile(model, x, cache).cache_hit is False
    other, _ = make("tied_mlp", 2)
    engine = _compile(other, x, cache)
    assert engine.cache_hit is True and _close(engine, other, x)
    assert cache.calls == ["load", "save", "load"]


def test_as_cache_rejects_other_things():
    assert as_cache(None) is None
    assert isinstance(as_cache("/tmp/x"), EngineCache)
    with pytest.raises(TypeError, match="save\\(key, blob\\)"):
        as_cache(42)
    with pytest.raises(ValueError, match="positive number of bytes"):
        EngineCache("/tmp/x", max_bytes=0)
    with pytest.raises(ValueError, match="hex digest"):
        EngineCache("/tmp/x").path("../escape")


def test_lru_eviction_respects_the_bound(tmp_path):
    cache = EngineCache(tmp_path, max_bytes=3000)
    for i, key in enumerate("abc"):
        cache.save(key, bytes([i]) * 1000)
        os.utime(cache.path(key), ns=(i * 10 ** 9, i * 10 ** 9))      # a, b, c: oldest first
    assert cache.load("a") == b"\0" * 1000                               # a is now the most recent
    cache.save("d", b"\3" * 1000)
    assert [k for k, _, _ in cache.entries()] == ["c", "a", "d"]      # b (least recently used) went
    assert cache.size_bytes() <= 3000
    cache.save("e", b"\4" * 2500)
    assert cache.size_bytes() <= 3000 and cache.load("e") is not None
    cache.save("huge", b"x" * 3001)                                      # larger than the bound: not stored
    assert cache.load("huge") is None and cache.load("e") is not None
    n = len(cache.entries())
    assert n == 1 and cache.clear() == n
    assert cache.entries() == []


def test_clear_removes_entries_and_temporary_files(tmp_path):
    cache = EngineCache(tmp_path)
    cache.save("k1", b"1")
    cache.save("k2", b"2")
    (tmp_path / ".k3.engine.x1y2z3.tmp").write_bytes(b"partial")     # a killed writer's temporary file
    (tmp_path / "notes.txt").write_bytes(b"not ours")
    assert cache.clear() == 2
    assert os.listdir(tmp_path) == ["notes.txt"]


WRITER = textwrap.dedent('''
    import hashlib, os, sys
    sys.path.insert(0, {root!r})
    from refitcore.cache.store import EngineCache
    cache = EngineCache({directory!r}, max_bytes=1 << 40)
    me = sys.argv[1]
    def blob(key):
        body = hashlib.sha256(key.encode()).digest() * (2000 + (hash(key) % 7) * 100)
        return hashlib.sha256(body).digest() + body
    bad = 0
    for i in range(60):
        for key in (f"{{me}}-{{i}}", f"shared-{{i % 10}}"):
            cache.save(key, blob(key))
            got = cache.load(f"shared-{{(i * 7) % 10}}")
            if got is not None and hashlib.sha256(got[32:]).digest() != got[:32]:
                bad += 1
    print("partial reads:", bad)
''')


def test_two_processes_filling_one_cache_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    directory = tmp_path / "cache"
    script.write_text(WRITER.format(root=ROOT, directory=str(directory)))
    procs = [subprocess.Popen([sys.executable, str(script), name], stdout=subprocess.PIPE, text=True)
             for name in ("p1", "p2")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("partial reads: 0" in o for o in outs), outs
    cache = EngineCache(directory)
    keys = {k for k, _, _ in cache.entries()}
    expected = {f"{p}-{i}" for p in ("p1", "p2") for i in range(60)} | {f"shared-{i}" for i in range(10)}
    assert keys == expected
    for key in expected:
        data = cache.load(key)
        assert hashlib.sha256(data[32:]).digest() == data[:32], key
    assert not [n for n in os.listdir(directory) if not n.endswith(".engine")]     # no temporary file left


def test_cli_compile_with_a_cache(tmp_path, capsys):
    from refitcore.cli import main as cli

    args = ["compile", "tests.cli_models:small_net", "--input", "1x3x32x32", "--backend", "reference", "-q",
            "--cache", str(tmp_path / "engines")]
    assert cli.main(args + ["-o", str(tmp_path / "a.trtrefit")]) == 0
    assert "engine cache miss (stored)" in capsys.readouterr().out
    assert cli.main(args + ["-o", str(tmp_path / "b.trtrefit")]) == 0
    assert "engine cache hit (loaded and refitted)" in capsys.readouterr().out
    a, b = refitcore.load(tmp_path / "a.trtrefit"), refitcore.load(tmp_path / "b.trtrefit")
    assert a.weight_names == b.weight_names and a.model_factory == b.model_factory == "tests.cli_models:small_net"
    x = torch.randn(1, 3, 32, 32)
    # small_net is seeded: the refitted engine matches the built one (BatchNorm folded in float32 by the
    # cached map, in float64 by the converter: equal up to rounding)
    assert torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-6)


# -- a hit is never stale: the key sees what forward reads, or the hit is verified ----------------
class PrivateScale(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self._scale = scale

    def forward(self, x):
        return self.fc(x) * self._scale


class ClassTable(nn.Module):
    TABLE = {"gain": 1.0}

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * self.TABLE["gain"]


class _Gain:
    __slots__ = ("value",)           # no __dict__: the key cannot hash it

    def __init__(self, value: float):
        self.value = value


class OpaqueGain(nn.Module):
    def __init__(self, gain: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self._gain = _Gain(gain)

    def forward(self, x):
        return self.conv(x) * self._gain.value


def gain_net():
    """A factory for the CLI test: its output scales with $TEST_GAIN, which the key cannot see."""
    return OpaqueGain(float(os.environ.get("TEST_GAIN", "1")))


def test_a_private_attribute_or_a_class_dict_edit_is_a_miss_not_a_stale_hit(tmp_path):
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    model = PrivateScale()
    assert _compile(model, x, str(tmp_path)).cache_hit is False
    model._scale = 3.0
    engine = _compile(model, x, str(tmp_path))
    assert engine.cache_hit is False and torch.allclose(engine(x), model(x), atol=1e-5)
    table = ClassTable()
    assert _compile(table, x, str(tmp_path)).cache_hit is False
    ClassTable.TABLE["gain"] = 2.5
    try:
        engine = _compile(table, x, str(tmp_path))
        assert engine.cache_hit is False and torch.allclose(engine(x), table(x), atol=1e-5)
    finally:
        ClassTable.TABLE["gain"] = 1.0


def test_an_incomplete_key_is_served_only_when_verified(tmp_path, caplog):
    x = torch.randn(1, 3, 8, 8)
    model = OpaqueGain(1.0)
    key = cache_key(model, (x,), backend="reference")
    assert not key.complete and "_Gain" in key.incomplete_reasons[0]
    assert _compile(model, x, str(tmp_path)).cache_hit is False
    with caplog.at_level(logging.WARNING, logger="refitcore"):
        again = _compile(model, x, str(tmp_path))
    assert again.cache_hit is False and "incomplete" in caplog.text and "'_gain'" in caplog.text
    assert _compile(model, x, str(tmp_path), verify_inputs=[(x,)]).cache_hit is True
    other = OpaqueGain(3.0)                 # same key, other behaviour: verification rejects the hit
    assert cache_key(other, (x,), backend="reference") == key
    engine = _compile(other, x, str(tmp_path), verify_inputs=[(x,)])
    assert engine.cache_hit is False and torch.allclose(engine(x), other(x), atol=1e-5)


def test_cli_compile_verifies_a_cache_hit(tmp_path, capsys, monkeypatch):
    from refitcore.cli import main as cli

    args = ["compile", "tests.test_cache:gain_net", "--input", "1x3x8x8", "--backend", "reference", "-q",
            "--cache", str(tmp_path / "engines")]
    monkeypatch.setenv("TEST_GAIN", "1")
    assert cli.main(args + ["-o", str(tmp_path / "a.trtrefit")]) == 0
    assert "engine cache miss (stored)" in capsys.readouterr().out
    assert cli.main(args + ["-o", str(tmp_path / "b.trtrefit")]) == 0
    assert "engine cache hit (loaded and refitted)" in capsys.readouterr().out     # verified: the same model
    monkeypatch.setenv("TEST_GAIN", "3")
    assert cli.main(args + ["-o", str(tmp_path / "c.trtrefit")]) == 0
    assert "engine cache miss (stored)" in capsys.readouterr().out                 # the stale hit was refused
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = gain_net()(x)
    assert torch.allclose(refitcore.load(tmp_path / "c.trtrefit")(x), want, atol=1e-5)
