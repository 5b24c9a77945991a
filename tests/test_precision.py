"""fp16 and bf16 engines: strongly typed networks whose weights are stored in the engine's type,
bit-identical on every refit path, emulated by the reference backend, and checked against eager
PyTorch in the same dtype (docs/precision.md).

Tolerances (relative to the output's largest magnitude) fit these small models: measured against
eager in the same dtype, fp16 <= 8e-4 and bf16 <= 6e-3, at least 5x below the bounds; the planted
bugs below move outputs by more than 3x the bounds (measured: 0.14 and more). The zoo's errors and the
defaults derived from them are in docs/precision.md ("Measured")."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import refitcore
from refitcore import dtypes
from refitcore.refitting.audit import audit_paths
from refitcore.refitting.mapping import cached_mapping, fallback_mapping
from tests.models import ConvBn, randomize_batchnorm

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Output tolerance against eager in the same dtype, relative to the output's largest magnitude.
TOL = {"fp16": 5e-3, "bf16": 3e-2}
BUG = 3   # a planted bug moves the output by more than BUG * TOL


class Block(nn.Module):
    """Pre-norm attention and an MLP with LayerNorms (a tiny transformer layer), two square
    projections of one shape (q and k) to swap and transpose."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.ln1(x)
        split = lambda t: t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class LinearBn(nn.Module):
    """A BatchNorm that no convolution feeds (LeViT's Linear + BatchNorm1d): an IScaleLayer of its own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x).flatten(0, 1)).unflatten(0, x.shape[:2])


def linear_bn(seed: int = 0):
    torch.manual_seed(seed)
    return randomize_batchnorm(LinearBn().eval(), seed), torch.randn(2, 5, 6)


def conv_bn(seed: int = 0, eps: float = 1e-5):
    torch.manual_seed(seed)
    return randomize_batchnorm(ConvBn(eps).eval(), seed), torch.randn(2, 3, 8, 8)


def block(seed: int = 0):
    torch.manual_seed(seed)
    return Block().eval(), torch.randn(2, 5, 16)


MODELS = {"conv_bn": conv_bn, "block": block, "linear_bn": linear_bn}


def eager(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model and its floating input in ``dtype`` (token ids stay integers), output as float32."""
    with torch.no_grad():
        return copy.deepcopy(model).to(dtype)(x.to(dtype) if x.is_floating_point() else x).float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_compile_cached_fallback_match_eager_and_each_other(name, precision):
    model, x = MODELS[name]()
    engine = refitcore.compile(model, x, backend="reference", precision=precision)
    want = dtypes.precision_dtype(precision)
    assert {s.dtype for s in engine.weight_map.sources.values()} <= {str(want).replace("torch.", ""), "float32"}
    assert any(s.dtype == str(want).replace("torch.", "") for s in engine.weight_map.sources.values())
    assert engine(x).dtype == torch.float32          # I/O keeps the model's dtype
    assert rel_err(engine(x), eager(model, x, want)) < TOL[precision]

    new, _ = MODELS[name](seed=1)
    cached, fallback = cached_mapping(engine.weight_map, new), fallback_mapping(engine, new)
    assert audit_paths(cached, fallback).ok           # exact (AUDIT_RTOL = AUDIT_ATOL = 0)
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, new, path=path, verify_inputs=[x], audit=True, rtol=TOL[precision],
                                 atol=TOL[precision])
        assert result.audit.ok
        assert rel_err(result.engine(x), eager(new, x, want)) < TOL[precision]
    # compile with the new weights gives the very weights both refit paths gave
    rebuilt = refitcore.compile(new, x, backend="reference", precision=precision)
    current = rebuilt.impl.current_weights()
    for k, v in cached.items():
        assert v.dtype == current[k].dtype and np.array_equal(v.reshape(-1), current[k].reshape(-1)), k


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_model_already_in_reduced_precision(precision):
    dt = DTYPES[precision]
    model, x = block()
    model, x = model.to(dt), x.to(dt)
    engine = refitcore.compile(model, x, backend="reference", precision=precision)
    y = engine(x)
    assert y.dtype == dt
    assert rel_err(y, eager(model, x, dt)) < TOL[precision]
    new, _ = block(seed=1)
    result = refitcore.refit(engine, new.to(dt), path="cached", audit=True, verify_inputs=[x],
                             rtol=TOL[precision], atol=TOL[precision])
    assert result and result.audit.ok


def test_weights_are_rounded_once_from_float64():
    """A folded bias (computed in float64) is the correctly rounded bfloat16/float16 of the float64
    value, which torch's own conversion (through float32) is not for every value."""
    x = torch.tensor([1.0 + 2 ** -8 + 2 ** -30, -(1.0 + 2 ** -8 + 2 ** -30)], dtype=torch.float64)
    assert dtypes.round_to(x, torch.bfloat16).tolist() == [1.0078125, -1.0078125]
    assert x.to(torch.bfloat16).tolist() != dtypes.round_to(x, torch.bfloat16).tolist()
    h = torch.tensor([1.0 + 2 ** -11 + 2 ** -40], dtype=torch.float64)
    assert dtypes.round_to(h, torch.float16).item() == 1.0 + 2 ** -10


def _planted(engine, new, bug: str):
    """The cached mapping of ``new`` with one planted bug."""
    mapping = {k: v.copy() for k, v in cached_mapping(engine.weight_map, new).items()}
    a = next(n for n in engine.weight_names if n.startswith("v/") and n.endswith("weight CONSTANT"))
    if bug == "swap":      # two same-shaped weights exchanged (the v and o projections)
        b = a.replace("v/", "o/", 1)
        mapping[a], mapping[b] = mapping[b], mapping[a]
    elif bug == "transpose":
        w = mapping[a]
        mapping[a] = np.ascontiguousarray(w.reshape(16, 16).T).reshape(w.shape)
    return mapping


@pytest.mark.parametrize("bug", ["swap", "transpose"])
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_planted_mapping_bugs_are_caught(precision, bug):
    dt = DTYPES[precision]
    model, x = block()
    engine = refitcore.compile(model, x, backend="reference", precision=precision)
    new, _ = block(seed=1)
    wrong = refitcore.apply_mapping(engine, _planted(engine, new, bug))
    assert rel_err(wrong(x), eager(new, x, dt)) > BUG * TOL[precision], bug
    right = refitcore.apply_mapping(engine, cached_mapping(engine.weight_map, new))
    assert rel_err(right(x), eager(new, x, dt)) < TOL[precision]


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_batchnorm_fold_with_wrong_eps_is_caught(precision):
    """An engine compiled with another eps folds the new BatchNorm wrongly: verification catches it."""
    dt = DTYPES[precision]
    model, x = conv_bn(eps=1e-5)
    with torch.no_grad():
        model.bn.running_var.uniform_(1e-4, 1e-3)   # eps matters against small variances
    wrong_eps, _ = conv_bn(eps=1e-1)
    engine = refitcore.compile(wrong_eps, x, backend="reference", precision=precision)
    refitted = refitcore.refit(engine, model.state_dict(), path="cached").engine
    assert rel_err(refitted(x), eager(model, x, dt)) > BUG * TOL[precision]
    good = refitcore.compile(model, x, backend="reference", precision=precision)
    assert rel_err(good(x), eager(model, x, dt)) < TOL[precision]


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_bundle_round_trips_reduced_precision_weights(tmp_path, precision):
    model, x = block()
    engine = refitcore.compile(model, x, backend="reference", precision=precision)
    path = tmp_path / "engine.trtrefit"
    engine.save(path)
    loaded = refitcore.load(path)
    a, b = engine.impl.current_weights(), loaded.impl.current_weights()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert torch.equal(engine(x), loaded(x))
    assert loaded.weight_map == engine.weight_map


def test_unknown_precision_is_refused():
    model, x = conv_bn()
    with pytest.raises(ValueError, match="precision must be one of"):
        refitcore.compile(model, x, backend="reference", precision="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_tensorrt_builds_refits_and_verifies_the_same_strongly_typed_network(precision):
    from refitcore.backends import tensorrt as trt_backend

    ok, reason = trt_backend.usable()
    if not ok:
        pytest.skip(f"TensorRT backend unusable here: {reason}")
    dt = DTYPES[precision]
    model, x = block()
    x = x.cuda()
    engine = refitcore.compile(model, x, backend="tensorrt", precision=precision)
    assert rel_err(engine(x).cpu(), eager(model, x.cpu(), dt)) < TOL[precision]
    new, _ = block(seed=1)
    result = refitcore.refit(engine, new, path="cached", verify_inputs=[x], audit=True, rtol=TOL[precision],
                             atol=TOL[precision])
    assert result and result.audit.ok
    assert rel_err(result.engine(x).cpu(), eager(new, x.cpu(), dt)) < TOL[precision]


class TinyLM(nn.Module):
    """LLM-style: embedding, RMSNorm, a non-persistent buffer the forward reads (a table a state_dict
    lacks), an untied head."""

    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.proj = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, d), persistent=False)

    def forward(self, ids):
        h = self.norm(self.embed(ids)) * self.gain
        return self.head(torch.nn.functional.silu(self.proj(h)) + h)


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_reduced_precision_llm_checkpoint_in_safetensors_refits_and_verifies(tmp_path, precision):
    from safetensors.torch import save_file

    dt = DTYPES[precision]
    torch.manual_seed(0)
    model = TinyLM().eval().to(dt)
    ids = torch.randint(0, 32, (2, 7))
    engine = refitcore.compile(model, ids, backend="reference", precision=precision)
    assert engine(ids).dtype == dt
    assert rel_err(engine(ids), eager(model, ids, dt)) < TOL[precision]
    torch.manual_seed(1)
    new = TinyLM().eval().to(dt)
    path = tmp_path / "model.safetensors"
    save_file(new.state_dict(), str(path))
    result = refitcore.refit(engine, str(path), path="cached", audit=True, verify_inputs=[ids],
                             reference_model=new, rtol=TOL[precision], atol=TOL[precision])
    assert result and result.audit.ok
    assert rel_err(result.engine(ids), eager(new, ids, dt)) < TOL[precision]


def test_reference_emulation_computes_in_float32_and_rounds_each_output_once():
    from refitcore.backends.reference_ops import run_layer_rounded

    torch.manual_seed(0)
    a, b = torch.randn(4, 64).half(), torch.randn(64, 3).half()
    layer = {"name": "mm", "type": "MATRIX_MULTIPLY", "attrs": {"op0": "NONE", "op1": "NONE"},
             "outputs": [{"name": "y", "shape": [4, 3], "dtype": "HALF"}]}
    (y,) = run_layer_rounded(layer, [a, b], {})
    assert y.dtype == torch.float16
    assert torch.equal(y, (a.float() @ b.float()).half())            # float32 accumulation, one rounding
    bf = {"name": "sm", "type": "SOFTMAX", "attrs": {"axes": 2},
          "outputs": [{"name": "p", "shape": [4, 64], "dtype": "BF16"}]}
    (p,) = run_layer_rounded(bf, [a.bfloat16()], {})
    assert p.dtype == torch.bfloat16 and torch.equal(p, torch.softmax(a.bfloat16().float(), 1).bfloat16())


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_partitioned_engine_at_reduced_precision(precision):
    """A PyTorch segment between TensorRT segments: each TensorRT segment takes and returns the
    model's type, both refit paths agree exactly, and a model already in the engine's dtype keeps
    its buffers' bit patterns through the PyTorch segments."""
    dt = DTYPES[precision]
    for cast in (False, True):
        model, x = block()
        new, _ = block(seed=1)
        if cast:
            model, new, x = model.to(dt), new.to(dt), x.to(dt)
        engine = refitcore.compile(model, x, backend="reference", precision=precision,
                                   torch_executed_ops=["aten.gelu.default"], min_block_size=1)
        assert [k for k, _ in engine.summary().segments] == ["tensorrt", "torch", "tensorrt"]
        assert rel_err(engine(x), eager(model, x, dt)) < TOL[precision]
        assert audit_paths(cached_mapping(engine.weight_map, new), fallback_mapping(engine, new)).ok
        refitted = refitcore.refit(engine, new, path="fallback").engine
        assert rel_err(refitted(x), eager(new, x, dt)) < TOL[precision]


class MaskedBias(nn.Module):
    """T5's decoder in small: a learned position bias folded with a causal mask of float32's most
    negative value (``finfo.min``), added to attention scores; row 0 of ``pad`` masks every key."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(4, 4, generator=g) * 3)
        with torch.no_grad():
            self.q.weight.copy_(torch.randn(8, 8, generator=g) * 0.3)
        self.register_buffer("pad", torch.tensor([1.0, 0.0, 0.0, 0.0]).view(4, 1).expand(4, 4).clone())

    def forward(self, x):
        low = torch.finfo(torch.float32).min
        hidden = torch.ones(4, 4).triu(1).bool() | self.pad.bool()          # row 0: every key masked
        mask = torch.zeros(4, 4).masked_fill(hidden, low)
        scores = self.q(x) @ x.transpose(-1, -2)
        return torch.softmax(scores + (self.bias + mask), -1)


def test_mask_sentinels_are_structure_not_overflow():
    """float32's finfo.min is a mask, not a number: in an fp16/bf16 engine it becomes that dtype's own
    finfo.min (what the model code writes when it runs in that dtype), identically at compile and in
    both refit paths, and the refit is not refused as an overflow. Without saturation it rounds to -inf:
    the refit refuses it, and the fully masked row turns NaN where eager gives a uniform row."""
    big = torch.tensor([torch.finfo(torch.float32).min, -2.0 ** 127, 1e30, 65504.0, -3.0, float("-inf")])
    assert dtypes.round_to(big, torch.float16).tolist() == [-65504.0, -65504.0, float("inf"), 65504.0, -3.0,
                                                            float("-inf")]
    assert dtypes.round_to(big, torch.bfloat16)[:2].tolist() == [torch.finfo(torch.bfloat16).min] * 2
    assert dtypes.round_to(big, torch.float32).tolist() == big.tolist()        # float32 holds them as they are
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    for precision, dt in sorted(DTYPES.items()):
        if precision == "fp32":
            continue
        engine = refitcore.compile(MaskedBias(), x, backend="reference", precision=precision)
        lowest = {name: float(dtypes.as_torch(w).float().min()) for name, w in engine.impl.current_weights().items()}
        assert torch.finfo(dt).min in lowest.values(), lowest          # the folded mask holds dt's own sentinel
        new = MaskedBias(seed=1)
        cached, fallback = cached_mapping(engine.weight_map, new), fallback_mapping(engine, new)
        assert audit_paths(cached, fallback).ok
        for path in ("cached", "fallback"):
            result = refitcore.refit(engine, new, path=path, verify_inputs=[x])   # the precision's default tolerances
            assert result, result.verdict
            y = result.engine(x)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y[:, 0], torch.full((2, 4), 0.25), rtol=0, atol=1e-3)   # uniform, not NaN
            assert rel_err(y, eager(new, x, torch.float32)) < TOL[precision]
