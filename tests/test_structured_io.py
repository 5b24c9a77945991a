"""Structured inputs and outputs: positional and keyword pytrees in, the eager structure out, leaves
named by their paths in verify, audit and refit results."""
from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

import refitcore
from refitcore.capture.structured import flatten_with_names, leaf_names, spec_of, unflatten

torch.set_num_threads(1)


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, batch, bias=None, *, mask=None, scale=1.0):
        y = self.a(batch["x"]) + self.b(batch["y"])
        if mask is not None:
            y = y * mask
        return {"out": torch.relu(y) * scale, "pair": (y.sum(-1), [y.amax(-1), 3]), "none": None}


def _make(seed):
    torch.manual_seed(seed)
    return DictIn().eval()


G = torch.Generator().manual_seed(0)
BATCH = {"x": torch.randn(2, 8, generator=G), "y": torch.randn(2, 6, generator=G)}
MASK = torch.ones(2, 4)


@pytest.fixture(scope="module")
def engine():
    return refitcore.compile(_make(0), args=(BATCH, None), kwargs={"mask": MASK, "scale": 2.0}, backend="reference")


def test_leaf_names():
    _leaves, names, _spec = flatten_with_names({"logits": 1, "b": [{"boxes": 2}], "c": (3, None)})
    assert names == ["logits", "b[0]['boxes']", "c[0]", "c[1]"]
    assert leaf_names(spec_of([{"boxes": 1, "scores": 2}])[1]) == ["[0]['boxes']", "[0]['scores']"]
    assert flatten_with_names(torch.zeros(1))[1] == [""]


def test_same_structure_in_and_out(engine):
    out = engine(BATCH, None, mask=MASK, scale=2.0)
    with torch.no_grad():
        ref = _make(0)(BATCH, None, mask=MASK, scale=2.0)
    assert set(out) == {"out", "pair", "none"} and out["none"] is None and out["pair"][1][1] == 3
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    torch.testing.assert_close(out["out"], ref["out"], rtol=1e-5, atol=1e-5)


def test_inputs_checked_against_the_compiled_structure(engine):
    with pytest.raises(ValueError, match="structure"):
        engine(BATCH, None, mask=MASK)                       # a keyword missing
    with pytest.raises(ValueError, match="compiled for the value 2.0"):
        engine(BATCH, None, mask=MASK, scale=3.0)            # a graph constant changed: recompile


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_refit_and_verify_leaf_by_leaf(engine, path):
    new = _make(1)
    sample = refitcore.Inputs(BATCH, None, mask=MASK, scale=2.0)
    result = refitcore.refit(engine, new, path=path, verify_inputs=[sample], audit=True)
    assert result, str(result)
    names = [c.name for c in result.verdict.checks[0]]
    assert names == ["out", "pair[0]", "pair[1][0]", "pair[1][1]", "none"]
    assert "output 0 (out)" in str(result.verdict)


def test_verify_names_the_leaf_that_differs(engine):
    """A wrong eager model: the failing leaf is named; the non-tensor leaves are compared for equality."""
    verdict = refitcore.verify(engine, _make(1), refitcore.Inputs(BATCH, None, mask=MASK, scale=2.0))
    assert not verdict
    assert "(out)" in str(verdict) and "MISMATCH" in str(verdict)
    consts = [c for c in verdict.checks[0] if c.name in ("pair[1][1]", "none")]
    assert consts and all(c.ok for c in consts)

    class Other(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *a, **k):
            out = self.model(*a, **k)
            out["pair"][1][1] = 4
            return out

    bad = refitcore.verify(engine, Other(_make(0)), refitcore.Inputs(BATCH, None, mask=MASK, scale=2.0))
    assert not bad and "pair[1][1]" in str(bad) and "engine 3 vs eager 4" in str(bad)


def test_unflatten_without_the_class_gives_a_dict():
    from refitcore.capture.structured import unresolved_types

    spec = {"t": "custom", "cls": "nowhere.Output", "k": ["logits", "hidden"], "c": [{"t": "leaf"}, {"t": "leaf"}]}
    assert unflatten([1, 2], spec) == {"logits": 1, "hidden": 2}
    assert unresolved_types({"t": "list", "c": [spec]}) == ["nowhere.Output"]


def test_positional_example_inputs_still_work():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(1, 4)
    engine = refitcore.compile(model, x, backend="reference")
    torch.testing.assert_close(engine(x), model(x))
    assert len(engine.run([x])) == 1


def _gpt2(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()   # use_cache=True, its default


def _cache_tensors(out):
    cache = out.past_key_values
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_a_decoder_cache_comes_back_as_a_cache(path):
    from transformers.cache_utils import DynamicCache

    ids = torch.tensor([[1, 5, 7, 3, 9]])
    engine = refitcore.compile(_gpt2(0), args=(ids,), backend="reference")
    assert type(engine.impl).__name__ == "ReferenceEngine"     # whole, not the submodule fallback
    with torch.no_grad():
        ref = _gpt2(0)(ids)
    out = engine(ids)
    assert isinstance(out.past_key_values, DynamicCache) and len(out.past_key_values.layers) == 2
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(_cache_tensors(out), _cache_tensors(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The spec is JSON data: rebuilt from it, the cache is a cache again.
    leaves, spec = spec_of(ref)
    rebuilt = unflatten(leaves, spec, output_types=[type(ref), DynamicCache])
    assert isinstance(rebuilt.past_key_values, DynamicCache)

    new = _gpt2(1)
    result = refitcore.refit(engine, new, path=path, verify_inputs=[ids], reference_model=new, audit=True)
    assert result, str(result)
    with torch.no_grad():
        want = new(ids)
    got = result.engine(ids)
    for a, b in zip(_cache_tensors(got), _cache_tensors(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_cache_registration_follows_the_class_torch_knows():
    """A transformers imported again (pytest's in-process runs restore ``sys.modules``) brings a new
    ``DynamicCache`` class: registration asks torch's pytree registry, it does not remember a flag."""
    import torch.utils._pytree as pytree

    from refitcore.capture.structured import register_cache_pytrees

    cache_utils = pytest.importorskip("transformers.cache_utils")
    register_cache_pytrees()
    assert cache_utils.DynamicCache in pytree.SUPPORTED_NODES
    pytree._deregister_pytree_node(cache_utils.DynamicCache)   # as a fresh import's class would be
    assert cache_utils.DynamicCache not in pytree.SUPPORTED_NODES
    register_cache_pytrees()
    assert cache_utils.DynamicCache in pytree.SUPPORTED_NODES


class Pred(typing.NamedTuple):
    scores: torch.Tensor
    total: torch.Tensor


class NamedOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return Pred(scores=y, total=y.sum(-1))


def test_a_namedtuple_keeps_its_class_and_field_names_as_data():
    leaves, spec = spec_of(Pred(torch.zeros(1), torch.ones(1)))
    assert spec == {"t": "custom", "cls": f"{__name__}.Pred", "k": ["scores", "total"],
                    "c": [{"t": "leaf"}, {"t": "leaf"}], "tuple": True}
    assert leaf_names(spec) == ["scores", "total"]
    assert type(unflatten(leaves, spec, output_types=[Pred])) is Pred
    stand_in = unflatten(leaves, spec)                 # nothing imported: a namedtuple made from the data
    assert type(stand_in) is not Pred and type(stand_in).__name__ == "Pred"
    assert stand_in._fields == ("scores", "total") and stand_in.total is leaves[1] and stand_in[0] is leaves[0]
    assert type(unflatten(leaves, spec)) is type(stand_in)          # one stand-in class per name and fields
    crafted = dict(spec, k=["import os", "total"])                  # names that are no identifiers: a tuple
    assert type(unflatten(leaves, crafted)) is tuple


@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_a_namedtuple_output_round_trips_through_a_bundle(tmp_path, path):
    torch.manual_seed(0)
    model, x = NamedOut().eval(), torch.randn(2, 4)
    engine = refitcore.compile(model, x, backend="reference")
    out = engine(x)
    assert type(out) is Pred
    torch.testing.assert_close(out.total, model(x).total, rtol=1e-5, atol=1e-5)
    engine.save(tmp_path / "m.trtrefit")
    plain = refitcore.load(tmp_path / "m.trtrefit")(x)
    assert type(plain).__name__ == "Pred" and plain._fields == ("scores", "total")
    torch.testing.assert_close(plain.total, out.total)
    loaded = refitcore.load(tmp_path / "m.trtrefit", output_types=[Pred])
    assert type(loaded(x)) is Pred
    torch.manual_seed(1)
    new = NamedOut().eval()
    # The loaded engine (given the class) refits through the cache; the fallback converts the model again.
    result = refitcore.refit(loaded if path == "cached" else engine, new, path=path, verify_inputs=[x], audit=True)
    assert result, str(result)
    assert [c.name for c in result.verdict.checks[0]] == ["scores", "total"]
    assert type(result.engine(x)) is Pred


def _bart(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=16, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2)
    return transformers.BartForConditionalGeneration(config).eval()   # use_cache=True, its default


def _encoder_decoder_tensors(out):
    cache = out.past_key_values
    return [t for sub in (cache.self_attention_cache, cache.cross_attention_cache)
            for layer in sub.layers for t in (layer.keys, layer.values)]


def test_an_encoder_decoder_cache_comes_back_as_one(tmp_path):
    """An encoder-decoder's EncoderDecoderCache output (two DynamicCaches) exports whole, comes back
    as the same cache types, round-trips through a file (given the classes) and refits."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    call = dict(input_ids=torch.tensor([[0, 5, 7, 3, 2]]), decoder_input_ids=torch.tensor([[2, 0, 6]]))
    engine = refitcore.compile(_bart(0), kwargs=call, backend="reference")
    assert type(engine.impl).__name__ == "ReferenceEngine", engine.summary()     # whole, not the submodules
    with torch.no_grad():
        ref = _bart(0)(**call)
    out = engine(**call)
    assert isinstance(out.past_key_values, EncoderDecoderCache)
    assert isinstance(out.past_key_values.cross_attention_cache, DynamicCache)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(_encoder_decoder_tensors(out), _encoder_decoder_tensors(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    engine.save(tmp_path / "bart.trtrefit")
    loaded = refitcore.load(tmp_path / "bart.trtrefit", output_types=[type(ref), EncoderDecoderCache, DynamicCache])
    assert isinstance(loaded(**call).past_key_values, EncoderDecoderCache)
    new = _bart(1)
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, new, path=path, verify_inputs=[refitcore.Inputs(**call)], audit=True)
        assert result, str(result)


def test_a_static_cache_input_is_refused_as_a_mutation_and_never_rebuilt_from_a_file():
    """A StaticCache passed in is a pytree (transformers' generic export registration), so compile
    names it as what it is: an input the model updates in place. Its registration's context names
    classes to import, so a spec never keeps it and unflattening gives plain data even given the class."""
    StaticCache = pytest.importorskip("transformers.cache_utils").StaticCache
    model = _gpt2(0)
    ids = torch.tensor([[1, 5, 7]])
    with pytest.raises(refitcore.MutationError, match="forward mutates input 'past_key_values"):
        refitcore.compile(model, args=(ids,), kwargs={"past_key_values": StaticCache(model.config, max_cache_len=8)},
                          backend="reference", strict=True)
    cache = StaticCache(model.config, max_cache_len=8)
    with torch.no_grad():
        model(ids, past_key_values=cache)                 # initialised: its layers hold tensors
    leaves, spec = spec_of(cache)
    assert spec["cls"] == "transformers.cache_utils.StaticCache" and "ctx" not in spec and leaves
    assert type(unflatten(leaves, spec, output_types=[StaticCache])) is tuple
    crafted = dict(spec, ctx={"_t": "type", "p": "refitcore_no_such_module.Payload"})   # a file's context
    assert type(unflatten(leaves, crafted, output_types=[StaticCache])) is tuple       # not imported
