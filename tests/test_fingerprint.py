"""The architecture fingerprint and the engine cache key: equal across processes for the same code,
different for every change that changes the engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from refitcore.cache.key import (
    CacheKey,
    architecture_entries,
    architecture_fingerprint,
    cache_key,
    code_digest,
    input_signature,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Models with code constants whose repr holds an address: nested code objects (a generator
# expression, a lambda) in forward, and nn.MultiheadAttention (whose forward has them too).
MODULE_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    SCALE = 0.5

    def helper(x):
        return x * SCALE

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.act = lambda t: torch.relu(t)
            self.tags = frozenset({"alpha", "beta", "gamma", "delta"})

        def forward(self, x):
            y = sum(v for v in (x, x))
            y = self.act(helper(self.fc(y)))
            return self.attn(y, y, y, need_weights=False)[0]
''')

PROBE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
    import torch
    import fpmodels
    from refitcore.cache.key import architecture_fingerprint, cache_key
    m = fpmodels.Block()
    key = cache_key(m, (torch.randn(2, 3, 8),), backend="reference")
    print(json.dumps([architecture_fingerprint(m), key.digest]))
''')


@pytest.fixture(scope="module")
def fpmodels(tmp_path_factory):
    here = tmp_path_factory.mktemp("fp")
    (here / "fpmodels.py").write_text(MODULE_SRC)
    sys.path.insert(0, str(here))
    try:
        import fpmodels as mod
        yield here, mod
    finally:
        sys.path.remove(str(here))
        sys.modules.pop("fpmodels", None)


def _probe(here, seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed)     # string hashes (frozenset order) differ per process
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT, here=str(here))], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_repr_of_the_code_constants_holds_addresses():
    """Why the old fingerprint (repr of co_consts) differed between processes."""
    consts = repr(nn.MultiheadAttention.forward.__code__.co_consts) + repr((lambda: (i for i in ()))
                                                                           .__code__.co_consts)
    assert " at 0x" in consts


def test_equal_in_two_fresh_interpreters_and_in_this_one(fpmodels):
    here, mod = fpmodels
    a = _probe(here, "1")
    b = _probe(here, "2")
    assert a == b
    m = mod.Block()
    assert a == [architecture_fingerprint(m), cache_key(m, (torch.randn(2, 3, 8),), backend="reference").digest]


def test_weights_do_not_change_it(fpmodels):
    _, mod = fpmodels
    a, b = mod.Block(), mod.Block()
    with torch.no_grad():
        b.fc.weight.mul_(3)
    assert architecture_fingerprint(a) == architecture_fingerprint(b)


def test_nested_code_is_hashed_by_content():
    def make(k):
        return eval(f"lambda x: sum(v * {k} for v in x)")

    assert code_digest(make(2).__code__) == code_digest(make(2).__code__)
    assert code_digest(make(2).__code__) != code_digest(make(3).__code__)


class Net(nn.Module):
    def __init__(self, width=8, act="relu"):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 4)
        self.act = act

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) if self.act == "relu" else torch.tanh(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


class NetOtherCode(Net):
    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).amax((2, 3)))


class Tied(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        if tie:
            self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def _key(model, x=None, **kw):
    x = torch.randn(1, 3, 8, 8) if x is None else x
    return cache_key(model, (x,) if isinstance(x, torch.Tensor) else x, **{"backend": "reference", **kw})


def _replace_layer(m):
    m.head = nn.Linear(8, 4, bias=False)
    return m


def _other_eps(m):
    m.bn.eps = 1e-3
    return m


def _half(m):
    return m.half()


def _hook(m):
    m.conv.register_forward_hook(lambda mod, inp, out: out * 2)
    return m


def _non_persistent(m):
    m.register_buffer("offset", torch.ones(1), persistent=False)
    return m


CHANGES = [
    ("code", lambda: NetOtherCode(), {}),
    ("parameter shape", lambda: Net(width=6), {}),
    ("config attribute", lambda: Net(act="tanh"), {}),
    ("replaced layer", lambda: _replace_layer(Net()), {}),
    ("batchnorm eps", lambda: _other_eps(Net()), {}),
    ("dtype", lambda: _half(Net()), {}),
    ("forward hook", lambda: _hook(Net()), {}),
    ("non-persistent buffer", lambda: _non_persistent(Net()), {}),
    ("input shape", lambda: Net(), {"x": torch.randn(2, 3, 8, 8)}),
    ("input dtype", lambda: Net(), {"x": torch.randn(1, 3, 8, 8, dtype=torch.float64)}),
    ("input structure", lambda: Net(), {"x": ([torch.randn(1, 3, 8, 8)],)}),
    ("kwargs", lambda: Net(), {"kwargs": {"scale": torch.ones(1)}}),
    ("dynamic shapes", lambda: Net(), {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=8)},)}),
    ("backend", lambda: Net(), {"backend": "tensorrt"}),
    ("precision", lambda: Net(), {"precision": "fp16"}),
]


@pytest.mark.parametrize("what,make,kw", CHANGES, ids=[c[0] for c in CHANGES])
def test_each_change_changes_the_key(what, make, kw):
    torch.manual_seed(0)
    base = _key(Net())
    assert _key(Net()) == base                     # another instance, other weights: same key
    changed = _key(make(), **kw)
    assert changed != base, what
    if kw and set(kw) <= {"x", "kwargs", "dynamic_shapes"}:
        assert changed.differences(base) == ["inputs"]
    elif "backend" in kw or "precision" in kw:
        assert changed.differences(base) == [next(iter(kw))]
    else:
        assert changed.differences(base) == ["architecture"]


def test_tied_groups_change_it():
    assert architecture_fingerprint(Tied(True)) != architecture_fingerprint(Tied(False))


def test_toolchain_and_format_version_change_the_key(monkeypatch):
    from refitcore.cache import key as fingerprint

    base = _key(Net())
    monkeypatch.setattr(fingerprint, "CACHE_FORMAT_VERSION", fingerprint.CACHE_FORMAT_VERSION + 1)
    assert _key(Net()).differences(base) == ["toolchain"]
    monkeypatch.undo()
    from refitcore import _trt

    monkeypatch.setattr(_trt, "version", lambda: "99.0")
    assert _key(Net()).differences(base) == ["toolchain"]
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert _key(Net()).differences(base) == ["toolchain"]


def test_an_input_spec_object_is_folded_in():
    class Spec:
        def __init__(self, profile):
            self.profile = profile

        def to_json(self):
            return {"profile": self.profile}

    x = torch.randn(1, 3, 8, 8)
    a = input_signature((x,), spec=Spec([1, 4, 8]))
    assert a == input_signature((x,), spec=Spec([1, 4, 8]))
    assert a != input_signature((x,), spec=Spec([1, 4, 16]))
    assert _key(Net(), input_spec=Spec([1])) != _key(Net(), input_spec=Spec([2]))


def test_key_round_trips_and_rejects_auto():
    k = _key(Net())
    assert CacheKey.from_json(json.loads(json.dumps(k.to_json()))) == k
    with pytest.raises(ValueError, match="resolved backend"):
        _key(Net(), backend="auto")


def test_entries_are_json_without_addresses(fpmodels):
    _, mod = fpmodels
    text = json.dumps(architecture_entries(mod.Block()))
    assert " at 0x" not in text and "0x7f" not in text


def test_plugin_architecture_key_uses_it(fpmodels):
    from pytest_trtrefit.engines import architecture_key

    _, mod = fpmodels
    assert architecture_key(mod.Block()) == architecture_fingerprint(mod.Block())


BERT_PROBE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {root!r})
    import transformers
    from refitcore.cache.key import architecture_fingerprint
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers={layers}, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    print(json.dumps(architecture_fingerprint(transformers.BertForSequenceClassification(cfg))))
''')


def test_a_transformers_model_is_equal_in_two_fresh_interpreters():
    """transformers' modules hold per-process values (``transformers.utils.hub.SESSION_ID`` is a
    fresh uuid) that its code names: library code is pinned by its version, not hashed, so two
    processes agree (they did not, and a transformers model never hit the cache)."""
    transformers = pytest.importorskip("transformers")

    def probe(layers: int, seed: str) -> str:
        out = subprocess.run([sys.executable, "-c", BERT_PROBE.format(root=ROOT, layers=layers)],
                             env=dict(os.environ, PYTHONHASHSEED=seed), capture_output=True, text=True,
                             timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = probe(2, "1")
    assert probe(2, "2") == first
    assert probe(1, "3") != first                    # another depth: another architecture
    from refitcore.cache.key import class_digest

    assert f"transformers=={transformers.__version__}" in json.dumps(class_digest(transformers.BertModel))


LIB_SRC = textwrap.dedent('''
    import uuid
    import torch
    from torch import nn

    __version__ = "1.0"
    SESSION = uuid.uuid4().hex          # a per-process value, like transformers' SESSION_ID

    def tag():
        return SESSION

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            tag()
            return self.fc(x)
''')


@pytest.mark.parametrize("installed", [True, False], ids=["installed-library", "user-code"])
def test_installed_code_is_pinned_by_version_user_code_is_hashed(tmp_path, monkeypatch, installed):
    """The same module file imported twice (a new uuid each time): installed in a site directory
    it fingerprints equal (and changes with its version); as user code its global is hashed, so it
    differs: what the library rule protects against, and why user code must stay hashed (its
    globals are what its forward reads)."""
    import importlib

    from refitcore.cache import key as fingerprint

    (tmp_path / "fakelib.py").write_text(LIB_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(fingerprint, "_site_directories",
                        lambda: (str(os.path.realpath(tmp_path)),) if installed else ())
    fingerprint._library_of_module.cache_clear()
    monkeypatch.delitem(sys.modules, "fakelib", raising=False)

    def fresh_import():
        sys.modules.pop("fakelib", None)
        fingerprint._library_of_module.cache_clear()
        mod = importlib.import_module("fakelib")
        return mod, architecture_fingerprint(nn.Sequential(mod.Layer()))

    try:
        mod_a, a = fresh_import()
        mod_b, b = fresh_import()
        assert mod_a.SESSION != mod_b.SESSION
        if installed:
            assert a == b
            mod_b.__version__ = "1.1"
            fingerprint._library_of_module.cache_clear()
            assert architecture_fingerprint(nn.Sequential(mod_b.Layer())) != a
        else:
            assert a != b
    finally:
        sys.modules.pop("fakelib", None)
        fingerprint._library_of_module.cache_clear()


def test_a_method_patched_into_a_library_class_changes_it():
    """Library classes are pinned by version, except methods another module assigned to them
    (a common way to swap attention): those are hashed."""
    torchvision = pytest.importorskip("torchvision")
    block = torchvision.models.resnet.BasicBlock
    model = torchvision.models.resnet18()
    before = architecture_fingerprint(model)
    original = block.forward

    def halved(self, x):
        return original(self, x) * 0.5

    block.forward = halved
    try:
        patched = architecture_fingerprint(model)
    finally:
        block.forward = original
    assert patched != before
    assert architecture_fingerprint(model) == before


def test_a_library_patching_another_library_class_does_not_split_the_key(monkeypatch):
    """transformers assigns ``torch.nn.Module.smart_apply`` the first time any of its models is built:
    one model must keep one key in one process, before and after that (installed code patching a
    library class is pinned by its version, not hashed)."""
    import textwrap

    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    before = architecture_fingerprint(model)
    monkeypatch.setattr(torch.nn.Module, "dedented", textwrap.dedent, raising=False)   # stdlib code
    assert architecture_fingerprint(model) == before
    transformers = pytest.importorskip("transformers")
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=16))
    assert architecture_fingerprint(model) == before


def test_scripts_and_user_packages_named_like_the_standard_library_are_user_code(tmp_path, monkeypatch):
    """`python -m pkg.mod` of an installed package runs it as __main__, and a user package may be
    called `wave` or `trace`: both are hashed, not pinned."""
    import types as pytypes

    from refitcore.cache import key as fingerprint

    fingerprint._library_of_module.cache_clear()
    user = pytypes.ModuleType("wave")
    user.__file__ = str(tmp_path / "wave" / "__init__.py")
    monkeypatch.setitem(sys.modules, "wave", user)
    try:
        assert fingerprint._library_of_module("__main__") is None
        assert fingerprint._library_of_module("wave") is None
        assert fingerprint._library_of_module("json") == "python"
        assert fingerprint._library_of_module("torch.nn") == "torch"
    finally:
        fingerprint._library_of_module.cache_clear()


# -- what forward reads besides parameters and buffers -----------------------------------------
# Each case: two models that differ only in a value forward reads (not a parameter or buffer). The
# key must tell them apart (or say it cannot: incomplete), never give both one complete key.
USERCFG_SRC = textwrap.dedent('''
    GAIN = 2.0
    TABLE = {"scale": 1.5}
''')

USERNET_SRC = textwrap.dedent('''
    import torch
    from torch import nn
    import usercfg

    SCALES = {"a": 1.0}
    OFFSETS = [0.0]
    BIAS = torch.zeros(4)
    NORM = nn.LayerNorm(4)

    class Private(nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self._scale = scale

        def forward(self, x):
            return self.fc(x) * self._scale

    class GlobalDict(Private):
        def forward(self, x):
            return self.fc(x) * SCALES["a"]

    class GlobalList(Private):
        def forward(self, x):
            return self.fc(x) + OFFSETS[0]

    class GlobalTensor(Private):
        def forward(self, x):
            return self.fc(x) + BIAS

    class GlobalModule(Private):
        def forward(self, x):
            return NORM(self.fc(x))

    class ConfigModule(Private):
        def forward(self, x):
            return self.fc(x) * usercfg.GAIN * usercfg.TABLE["scale"]

    class ClassDict(Private):
        FACTORS = {"a": 1.0}

        def forward(self, x):
            return self.fc(x) * self.FACTORS["a"]
''')


@pytest.fixture
def usernet(tmp_path, monkeypatch):
    (tmp_path / "usercfg.py").write_text(USERCFG_SRC)
    (tmp_path / "usernet.py").write_text(USERNET_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("usercfg", "usernet"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import usernet as mod
    yield mod
    for name in ("usercfg", "usernet"):
        sys.modules.pop(name, None)


def _private(mod, m):
    m._scale = 3.0


def _global_dict(mod, m):
    mod.SCALES["a"] = 2.0


def _global_list(mod, m):
    mod.OFFSETS[0] = 1.0


def _global_tensor(mod, m):
    mod.BIAS.add_(1.0)


def _global_module(mod, m):
    with torch.no_grad():
        mod.NORM.weight.mul_(2.0)


def _config_module(mod, m):
    sys.modules["usercfg"].TABLE["scale"] = 0.5


def _config_constant(mod, m):
    sys.modules["usercfg"].GAIN = 4.0


def _class_dict(mod, m):
    type(m).FACTORS["a"] = 2.0


READS = [("private attribute", "Private", _private), ("module global dict", "GlobalDict", _global_dict),
         ("module global list", "GlobalList", _global_list), ("module global tensor", "GlobalTensor", _global_tensor),
         ("module global module", "GlobalModule", _global_module),
         ("config module dict", "ConfigModule", _config_module),
         ("config module constant", "ConfigModule", _config_constant),
         ("class attribute dict", "ClassDict", _class_dict)]


@pytest.mark.parametrize("what,cls,edit", READS, ids=[r[0] for r in READS])
def test_a_value_forward_reads_changes_the_key(usernet, what, cls, edit):
    torch.manual_seed(0)
    model = getattr(usernet, cls)()
    x = torch.randn(2, 4)
    before, out = _key(model, x), model(x)
    assert before.complete, before.incomplete_reasons
    assert _key(model, x) == before                       # stable while nothing changes
    edit(usernet, model)
    assert not torch.allclose(model(x), out), what        # the edit changes what forward computes
    after = _key(model, x)
    assert after != before, what
    assert after.differences(before) == ["architecture"]


class _Slotted:
    __slots__ = ("gain",)

    def __init__(self, gain):
        self.gain = gain


class Opaque(nn.Module):
    def __init__(self, gain=1.0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self._gain = _Slotted(gain)

    def forward(self, x):
        return self.fc(x) * self._gain.gain


def test_a_value_that_cannot_be_hashed_makes_the_key_incomplete():
    key = _key(Opaque(), torch.randn(2, 4))
    assert not key.complete
    assert "'_gain'" in key.incomplete_reasons[0] and "_Slotted" in key.incomplete_reasons[0]
    from refitcore.cache.key import architecture

    arch = architecture(Opaque())
    assert not arch.complete and arch.incomplete_reasons == key.incomplete_reasons
    assert _key(Net()).complete                            # ordinary models are complete


def test_common_models_have_complete_keys():
    torchvision = pytest.importorskip("torchvision")
    from refitcore.cache.key import architecture

    for make in (torchvision.models.resnet18, torchvision.models.mobilenet_v3_small):
        assert architecture(make()).complete, make.__name__


def test_a_library_importable_from_outside_a_site_directory_is_pinned_not_hashed(monkeypatch):
    """torch and torchvision on PYTHONPATH (a monorepo layout, ``pip install --target``): the file's
    owning distribution makes them libraries, so the key is the one a site-packages install gives,
    the same on every call (hashed as user code, their per-process state split it)."""
    torchvision = pytest.importorskip("torchvision")
    from refitcore.cache import key as fingerprint

    model = torchvision.models.resnet18()
    usual = architecture_fingerprint(model)
    monkeypatch.setattr(fingerprint, "_site_directories", lambda: ())
    fingerprint._library_of_module.cache_clear()
    try:
        assert fingerprint._library(torchvision.models.ResNet) == f"torchvision=={torchvision.__version__}"
        assert fingerprint._library_of_module("torch.nn") == "torch"
        assert architecture_fingerprint(model) == usual
        assert architecture_fingerprint(model) == usual
    finally:
        fingerprint._library_of_module.cache_clear()
