"""Models as real repositories ship them (transformers, timm, torchvision segmentation/video/detection,
small custom modules with structured inputs and outputs) on the reference backend: compile
(partitioning ops without a converter into PyTorch segments), refit through the cached map and
through the fallback with new random weights, compare with eager leaf by leaf.

Writes a Markdown table to ``benchmarks/results/zoo_repos.md`` (raw rows in ``zoo_repos.json``)
after every model and between markers in README.md. The versions of torch, transformers and timm
each row ran with are in its JSON row and in the line above the table: run the sweep again on the
newest releases (``pip install -U transformers timm``) as well as on the pinned ones.

    python scripts/zoo_repos.py                  # every model
    python scripts/zoo_repos.py bert vit_cls     # some
    python scripts/zoo_repos.py --merge bert     # re-run some, keep the other rows
    python scripts/zoo_repos.py --precision fp32,fp16,bf16 --timeout 300 bert   # the precision sweep

``--precision``: each model compiled at each precision (docs/precision.md) instead; per model and
precision the worst relative output error (max |engine - eager| / max |eager| over every floating
output leaf) after compile, a cached and a fallback refit, against eager in the same dtype (the model
and its floating inputs cast: what the engine should equal up to kernel rounding) and against eager
fp32 (what verification compares with), whether the exact audit (cached vs fallback) passes, and the
verification at the precision's default tolerances (``refitcore.options.PRECISION_TOLERANCES``).
Writes ``benchmarks/results/zoo_precision.md`` (raw rows in ``zoo_precision.json``). ``--timeout``:
seconds per model and precision (a model that takes longer gets a timeout row and the sweep goes on).

Random weights only (tiny configs, ``pretrained=False``/``weights=None``): nothing is downloaded. The
weights are drawn as the plugin's ``state_dicts`` strategy draws them (seed 0 to compile, seed 1 to
refit): fan-in scaled, BatchNorm statistics far from a fresh init's trivial ones.
The reference backend interprets the TensorRT network on the CPU: it proves the networks, the
partition and the weight mapping, not TensorRT's kernels.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def _image(size: int, *lead: int) -> torch.Tensor:
    return torch.randn(*(lead or (1,)), 3, size, size, generator=torch.Generator().manual_seed(0))


# ---- builders: seed -> (model, args, kwargs) ----------------------------------------------------
def _hf(cls_name: str, config_name: str, **extra):
    def build(seed: int):
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, config_name)(**extra)
        return getattr(transformers, cls_name)(config).eval()
    return build


def bert(seed):
    model = _hf("BertModel", "BertConfig", **TEXT)(seed)
    ids = _ids()
    return model, (ids,), {"attention_mask": torch.ones_like(ids)}


def bert_cls(seed):
    return _hf("BertForSequenceClassification", "BertConfig", **TEXT)(seed), (_ids(),), {}


def distilbert(seed):
    model = _hf("DistilBertModel", "DistilBertConfig", vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                max_position_embeddings=64)(seed)
    return model, (_ids(),), {}


def gpt2(seed):
    model = _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                n_positions=64)(seed)
    return model, (_ids(),), {"use_cache": False}


def gpt2_cache(seed):
    model = gpt2(seed)[0]
    return model, (_ids(),), {"use_cache": True}


def t5_encoder(seed):
    model = _hf("T5EncoderModel", "T5Config", vocab_size=100, d_model=32, num_layers=2, num_heads=2, d_ff=64,
                d_kv=16)(seed)
    return model, (_ids(),), {}


def vit_cls(seed):
    model = _hf("ViTForImageClassification", "ViTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, image_size=32, patch_size=8, num_labels=10)(seed)
    return model, (_image(32),), {}


def _timm(name: str, size: int, **options):
    def build(seed):
        import timm

        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **options).eval(), (_image(size),), {}
    return build


def _tv_seg(name: str):
    def build(seed):
        import torchvision

        torch.manual_seed(seed)
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
        return model.eval(), (_image(64),), {}
    return build


def r3d_18(seed):
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.video.r3d_18(weights=None).eval()
    return model, (torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0)),), {}


def fasterrcnn(seed):
    import torchvision

    torch.manual_seed(seed)
    # score threshold 0: random weights score below the default 0.05, and empty detections compare trivially.
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=20)
    return model.eval(), ([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))],), {}


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, batch):
        return torch.relu(self.a(batch["x"]) + self.b(batch["y"]))


class KwargsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)

    def forward(self, x, *, mask=None, scale=None):
        y = self.proj(x)
        if mask is not None:
            y = y * mask
        if scale is not None:
            y = y * scale
        return torch.tanh(self.gate(y))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        f = self.body(x)
        return {"features": f, "logits": self.head(f.mean((2, 3))), "extra": [f.amax((2, 3)), None]}


class CumSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.cumsum(torch.relu(self.inp(x)), dim=1))


class ComplexBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.polar(torch.ones(6, 4), torch.randn(6, 4)))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        rot = torch.view_as_real(self.freqs).flatten(1)      # (6, 8)
        return self.proj(x) * rot + torch.sigmoid(x)


class CondBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.cond(y.sum() > 0, lambda t: self.b(t) * 2.0, lambda t: self.b(t) - 1.0, (y,))


def _padded_ids(batch: int = 2, length: int = 12, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose second row is left-padded by ``pad`` tokens."""
    ids = torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def _decoder_llm(cls_name: str, config_name: str, **extra):
    """A decoder-only LLM on a left-padded batch (the attention_mask masks the padding and, with the
    causal mask, leaves fully masked rows for the padded positions)."""
    def build(seed):
        model = _hf(cls_name, config_name, vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **extra)(seed)
        ids, mask = _padded_ids()
        return model, (ids,), {"attention_mask": mask, "use_cache": False}
    return build


def _text_padded(cls_name: str, config_name: str, **extra):
    def build(seed):
        model = _hf(cls_name, config_name, **{**TEXT, **extra})(seed)
        ids, mask = _padded_ids()
        return model, (ids,), {"attention_mask": mask}
    return build


def bart(seed):
    model = _hf("BartModel", "BartConfig", vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=64)(seed)
    ids, mask = _padded_ids()
    return model, (ids,), {"attention_mask": mask, "decoder_input_ids": ids[:, :6], "use_cache": False}


def t5(seed):
    model = _hf("T5ForConditionalGeneration", "T5Config", vocab_size=100, d_model=32, num_layers=2,
                num_decoder_layers=2, num_heads=2, d_ff=64, d_kv=16)(seed)
    ids, mask = _padded_ids()
    return model, (ids,), {"attention_mask": mask, "decoder_input_ids": ids[:, :6], "use_cache": False}


def whisper(seed):
    model = _hf("WhisperModel", "WhisperConfig", vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2,
                decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)(seed)
    features = torch.randn(1, 16, 32, generator=_g())       # (batch, mel bins, 2 * max_source_positions)
    return model, (features,), {"decoder_input_ids": _ids()[:, :6], "use_cache": False}


def wav2vec2(seed):
    model = _hf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                feat_extract_norm="layer")(seed)
    return model, (torch.randn(1, 800, generator=_g()),), {}


def _hf_image(cls_name: str, config_name: str, size: int, **extra):
    def build(seed):
        return _hf(cls_name, config_name, **extra)(seed), (_image(size),), {}
    return build


class RNNText(nn.Module):
    """A text classifier as tutorials write it: embedding -> multi-layer bidirectional LSTM/GRU
    (batch_first) -> the last step's features -> a linear head."""

    def __init__(self, kind: str = "lstm"):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.rnn = getattr(nn, kind.upper())(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 5)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


def _rnn_text(kind: str):
    def build(seed):
        torch.manual_seed(seed)
        return RNNText(kind).eval(), (_ids().repeat(2, 1),), {}
    return build


class SpeechConv1d(nn.Module):
    """A ResNet-style 1-D convolutional keyword spotter on raw audio (M5-like stem, residual blocks
    with BatchNorm1d, global average pooling, log_softmax head)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 16, 80, stride=16), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(4))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16)) for _ in range(2))
        self.head = nn.Linear(16, classes)

    def forward(self, audio):
        x = self.stem(audio)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return torch.log_softmax(self.head(x.mean(-1)), dim=-1)


def speech_conv1d(seed):
    torch.manual_seed(seed)
    return SpeechConv1d().eval(), (torch.randn(2, 1, 1600, generator=_g()),), {}


def raft_small(seed):
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    frames = torch.rand(2, 1, 3, 128, 128, generator=_g()) * 2 - 1   # at least 128: its correlation pyramid
    return model, (frames[0], frames[1]), {"num_flow_updates": 2}


def unet2d(seed):
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return model, (_image(16), torch.tensor([10])), {"return_dict": False}


def autoencoder_kl(seed):
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), norm_num_groups=8,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2).eval()
    # sample_posterior=False: the decoder reads the posterior's mode (sampling draws new noise each call).
    return model, (_image(16),), {"sample_posterior": False, "return_dict": False}


def _custom(cls, make_args: Callable[[], tuple]):
    def build(seed):
        torch.manual_seed(seed)
        model = cls().eval()
        args, kwargs = make_args()
        return model, args, kwargs
    return build


def _g():
    return torch.Generator().manual_seed(0)


MODELS: dict[str, tuple[str, Callable]] = {
    "bert": ("transformers BertModel(input_ids, attention_mask)", bert),
    "bert_cls": ("transformers BertForSequenceClassification", bert_cls),
    "distilbert": ("transformers DistilBertModel", distilbert),
    "gpt2": ("transformers GPT2LMHeadModel", gpt2),
    "gpt2_cache": ("transformers GPT2LMHeadModel use_cache=True (DynamicCache out)", gpt2_cache),
    "t5_encoder": ("transformers T5EncoderModel", t5_encoder),
    "vit_cls": ("transformers ViTForImageClassification @32", vit_cls),
    "mobilevitv2_050": ("timm mobilevitv2_050 @64", _timm("mobilevitv2_050", 64)),
    "poolformer_s12": ("timm poolformer_s12 @32", _timm("poolformer_s12", 32)),
    "convnext_atto": ("timm convnext_atto @32", _timm("convnext_atto", 32)),
    "efficientnet_b0": ("timm efficientnet_b0 @32", _timm("efficientnet_b0", 32)),
    "levit_128s": ("timm levit_128s @64", _timm("levit_128s", 64, img_size=64)),
    "fcn_resnet50": ("torchvision fcn_resnet50 @64 (dict out)", _tv_seg("fcn_resnet50")),
    "deeplabv3_mobilenet_v3_large": ("torchvision deeplabv3_mobilenet_v3_large @64 (dict out)",
                                     _tv_seg("deeplabv3_mobilenet_v3_large")),
    "lraspp_mobilenet_v3_large": ("torchvision lraspp_mobilenet_v3_large @64 (dict out)",
                                  _tv_seg("lraspp_mobilenet_v3_large")),
    "r3d_18": ("torchvision r3d_18 1x3x4x32x32", r3d_18),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        "torchvision fasterrcnn_mobilenet_v3_large_320_fpn (list of dicts out, 20 detections)", fasterrcnn),
    "dict_input": ("custom: a dict input (min_block_size=1, as every custom row)",
                   _custom(DictIn, lambda: (({"x": torch.randn(2, 8, generator=_g()),
                                              "y": torch.randn(2, 6, generator=_g())},), {}))),
    "kwargs_none": ("custom: keyword inputs with a None",
                    _custom(KwargsNone, lambda: ((torch.randn(2, 8, generator=_g()),),
                                                 {"mask": torch.ones(2, 8), "scale": None}))),
    "dict_output": ("custom: a dict output (with a list and a None)",
                    _custom(DictOut, lambda: ((torch.randn(1, 3, 8, 8, generator=_g()),), {}))),
    "cumsum": ("custom: torch.cumsum", _custom(CumSum, lambda: ((torch.randn(2, 5, 8, generator=_g()),), {}))),
    "complex_buffer": ("custom: a complex buffer through torch.view_as_real",
                       _custom(ComplexBuffer, lambda: ((torch.randn(6, 8, generator=_g()),), {}))),
    "cond": ("custom: a torch.cond branch", _custom(CondBranch, lambda: ((torch.randn(3, 8, generator=_g()),), {}))),
    "llama_padded": ("transformers LlamaForCausalLM, left-padded attention_mask (GQA)",
                     _decoder_llm("LlamaForCausalLM", "LlamaConfig")),
    "mistral_padded": ("transformers MistralModel, left-padded attention_mask (sliding window 8)",
                       _decoder_llm("MistralModel", "MistralConfig", sliding_window=8)),
    "qwen2_padded": ("transformers Qwen2ForCausalLM, left-padded attention_mask",
                     _decoder_llm("Qwen2ForCausalLM", "Qwen2Config")),
    "bart": ("transformers BartModel (encoder-decoder, decoder_input_ids, padded mask)", bart),
    "t5": ("transformers T5ForConditionalGeneration (decoder_input_ids, padded mask)", t5),
    "whisper": ("transformers WhisperModel (log-mel features, decoder_input_ids)", whisper),
    "wav2vec2": ("transformers Wav2Vec2Model (raw audio, 800 samples)", wav2vec2),
    "roberta_padded": ("transformers RobertaModel, padded attention_mask",
                       _text_padded("RobertaModel", "RobertaConfig")),
    "albert": ("transformers AlbertModel (layers share weights)",
               _text_padded("AlbertModel", "AlbertConfig", embedding_size=16)),
    "electra_cls": ("transformers ElectraForSequenceClassification",
                    _text_padded("ElectraForSequenceClassification", "ElectraConfig", embedding_size=16)),
    "mobilebert": ("transformers MobileBertModel",
                   _text_padded("MobileBertModel", "MobileBertConfig", embedding_size=16, intra_bottleneck_size=16,
                                num_feedforward_networks=2)),
    "deit_cls": ("transformers DeiTForImageClassification @32",
                 _hf_image("DeiTForImageClassification", "DeiTConfig", 32, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=10)),
    "swin_cls": ("transformers SwinForImageClassification @32",
                 _hf_image("SwinForImageClassification", "SwinConfig", 32, image_size=32, patch_size=2, embed_dim=16,
                           depths=(1, 1), num_heads=(2, 2), window_size=4, num_labels=10)),
    "convnextv2_atto": ("timm convnextv2_atto @32", _timm("convnextv2_atto", 32)),
    "regnetx_002": ("timm regnetx_002 @32", _timm("regnetx_002", 32)),
    "lstm_text": ("custom: embedding -> 2-layer bidirectional LSTM (batch_first) -> linear", _rnn_text("lstm")),
    "gru_text": ("custom: embedding -> 2-layer bidirectional GRU (batch_first) -> linear", _rnn_text("gru")),
    "speech_conv1d": ("custom: ResNet-style 1-D conv keyword spotter on raw audio", speech_conv1d),
    "raft_small": ("torchvision raft_small 128x128, 2 flow updates (list of flows out)", raft_small),
    "unet2d": ("diffusers UNet2DModel @16 (attention blocks, timestep)", unet2d),
    "autoencoder_kl": ("diffusers AutoencoderKL @16 (posterior mode)", autoencoder_kl),
}
CUSTOM = ("dict_input", "kwargs_none", "dict_output", "cumsum", "complex_buffer", "cond")
FAST = ("dict_input", "kwargs_none", "dict_output", "cumsum", "complex_buffer", "cond", "bert", "gpt2_cache",
        "lstm_text", "gru_text", "speech_conv1d")


VERSIONED = ("torch", "transformers", "timm", "diffusers")


def versions() -> dict[str, str | None]:
    """The installed version of each library the zoo's models come from (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def versions_line(rows: list[dict]) -> str:
    """Which versions the rows ran with (each distinct set once; rows of an older file have none)."""
    seen: list[str] = []
    for r in rows:
        v = r.get("versions")
        text = ", ".join(f"{k} {v.get(k) or 'not installed'}" for k in VERSIONED) if v else "versions not recorded"
        if text not in seen:
            seen.append(text)
    return "Made with " + "; ".join(seen) + "." if seen else ""


def max_err(a: Any, b: Any) -> float:
    """Largest abs difference over every tensor leaf (inf where the structures or non-tensor leaves differ)."""
    from refitcore.capture.structured import flatten_with_names

    la, na, _ = flatten_with_names(a)
    lb, nb, _ = flatten_with_names(b)
    if na != nb:
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return float("inf")
            if x.numel():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
        elif x != y:
            return float("inf")
    return worst


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """The model with weights drawn as the plugin's ``state_dicts`` strategy draws them (fan-in scaled,
    valid BatchNorm statistics, not the trivial ones of a fresh init; tied parameters identical)."""
    from pytest_trtrefit.strategies import weight_set

    state = model.state_dict()
    state.update(weight_set(model, seed=seed, scale="fan_in"))
    model.load_state_dict(state)
    return model.eval()


def run_one(name: str) -> dict:
    import refitcore

    label, build = MODELS[name]
    row: dict[str, Any] = {"model": name, "label": label, "versions": versions()}
    model, args, kwargs = build(0)
    model = _randomized(model, 0)
    t0 = time.perf_counter()
    # The custom modules are a handful of ops: min_block_size=1 gives them TensorRT segments
    # between their PyTorch ops (the default, 5, would run such small runs in PyTorch).
    options = {"min_block_size": 1} if name in CUSTOM else {}
    engine = refitcore.compile(model, args=args, kwargs=kwargs, backend="reference", **options)
    row["compile_s"] = time.perf_counter() - t0
    cov = engine.summary()
    row.update(compiles=True, op_share=cov.op_share, weight_share=cov.weight_share, ops=cov.ops_total,
               ops_trt=cov.ops_tensorrt, fallback=sorted({f[1] for f in cov.fallback}),
               eager_modules=[p for p, _ in cov.eager_modules], segments=len(cov.segments) or 1)
    with torch.no_grad():
        row["err_compile"] = max_err(engine(*args, **kwargs), model(*args, **kwargs))
    new_model = _randomized(build(1)[0], 1)
    sample = refitcore.Inputs(*args, **kwargs)
    for path in ("cached", "fallback"):
        t0 = time.perf_counter()
        result = refitcore.refit(engine, new_model, path=path, verify_inputs=[sample], reference_model=new_model)
        row[f"{path}_s"] = time.perf_counter() - t0
        row[f"ok_{path}"] = bool(result)
        with torch.no_grad():
            row[f"err_{path}"] = max_err(result.engine(*args, **kwargs), new_model(*args, **kwargs))
        if not result:
            row.setdefault("note", str(result.verdict or result.audit).splitlines()[0][:200])
    row.update(_loaded_fallback(engine, new_model))
    row["ok"] = row["ok_cached"] and row["ok_fallback"] and row["loaded"] != "MISMATCH"
    return row


def _loaded_fallback(engine, new_model: nn.Module) -> dict:
    """The engine saved and loaded back, then refitted through the fallback path with no model: the
    graph its file records, converted again. ``loaded``: 'exact' (the same weights, bit for bit, as the
    fallback of the engine compiled here), 'MISMATCH' (another or an error), or why there is none
    ('not saved: ...' for an engine a file cannot hold, 'no record: ...')."""
    import tempfile

    import refitcore

    state = new_model.state_dict()
    with tempfile.TemporaryDirectory() as d:
        try:
            engine.save(Path(d) / "e.trtrefit")
        except refitcore.BundleError as err:
            return {"loaded": f"not saved: {str(err)[:120]}"}
        loaded = refitcore.load(Path(d) / "e.trtrefit")
    if loaded.record.program is None:
        return {"loaded": f"no record: {loaded.record.program_note}"}
    t0 = time.perf_counter()
    try:
        mine = refitcore.fallback_mapping(loaded, state)
    except refitcore.RefitCoreError as err:
        return {"loaded": "MISMATCH", "loaded_error": str(err)[:300]}
    seconds = time.perf_counter() - t0
    exact = refitcore.audit_paths(mine, refitcore.fallback_mapping(engine, state)).ok
    return {"loaded": "exact" if exact else "MISMATCH", "loaded_s": seconds}


# ---- the precision sweep (--precision) -------------------------------------------------------------
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a pytree cast to ``dtype`` (integer ids and masks stay)."""
    return torch.utils._pytree.tree_map(
        lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, value)


def rel_err(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over the floating leaves of two outputs (inf where a leaf is not finite)."""
    from refitcore.capture.structured import flatten_with_names

    la, _, _ = flatten_with_names(a)
    lb, _, _ = flatten_with_names(b)
    diff = scale = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.is_floating_point() and y.numel():
            diff = max(diff, float((x.double() - y.double()).abs().max()))
            scale = max(scale, float(y.double().abs().max()))
    return diff / scale if scale else diff


def _eager_in(model: nn.Module, args, kwargs, dtype: torch.dtype):
    """Eager ``model`` with its floating weights and inputs in ``dtype`` (complex and integer tensors
    kept: ``Module.to(dtype)`` would turn a complex buffer real)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(dtype)
        return model(*_cast(args, dtype), **_cast(kwargs, dtype))


def run_precision(name: str, precision: str) -> dict:
    """One model at one precision: errors vs eager in the same dtype and in fp32, the exact audit and
    the verification at the precision's default tolerances, for compile and each refit path."""
    import refitcore
    from refitcore.options import tolerances_for
    from refitcore.refitting.audit import audit_paths
    from refitcore.refitting.mapping import cached_mapping, fallback_mapping

    label, build = MODELS[name]
    dt = PRECISION_DTYPES[precision]
    model, args, kwargs = build(0)
    model = _randomized(model, 0)
    row: dict[str, Any] = {"model": name, "label": label, "precision": precision, "versions": versions(),
                           "tolerances": list(tolerances_for(precision))}
    options = {"min_block_size": 1} if name in CUSTOM else {}
    t0 = time.perf_counter()
    engine = refitcore.compile(model, args=args, kwargs=kwargs, backend="reference", precision=precision, **options)
    row["compile_s"] = time.perf_counter() - t0
    def same(out, m):
        """Error vs eager in the engine's dtype; None where PyTorch's CPU kernels cannot run the model in it."""
        try:
            return rel_err(out, _eager_in(m, args, kwargs, dt))
        except RuntimeError as err:        # e.g. torchvision's nms has no CPU kernel for Half
            row["same_note"] = f"eager {precision} cannot run on the CPU: {str(err).splitlines()[0][-120:]}"
            return None

    with torch.no_grad():
        out = engine(*args, **kwargs)
    row["compile_same"] = same(out, model)
    row["compile_fp32"] = rel_err(out, _eager_in(model, args, kwargs, torch.float32))
    new = _randomized(build(1)[0], 1)
    row["audit_exact"] = audit_paths(cached_mapping(engine.weight_map, new), fallback_mapping(engine, new)).ok
    sample = refitcore.Inputs(*args, **kwargs)
    for path in ("cached", "fallback"):
        result = refitcore.refit(engine, new, path=path, verify_inputs=[sample], reference_model=new)
        with torch.no_grad():
            out = result.engine(*args, **kwargs)
        row[f"{path}_same"] = same(out, new)
        row[f"{path}_fp32"] = rel_err(out, _eager_in(new, args, kwargs, torch.float32))
        row[f"{path}_verified"] = bool(result.verdict)
        row[f"{path}_margin"] = result.verdict.margin     # worst |err| / allowed error at the default tolerances
    row["ok"] = row["audit_exact"] and row["cached_verified"] and row["fallback_verified"]
    return row


def precision_table(rows: list[dict]) -> str:
    lines = [f"{sum(1 for r in rows if r.get('ok'))} of {len(rows)} runs pass the exact audit and verification at "
             f"the precision's default tolerances. Relative worst output error (max |engine - eager| / max |eager| "
             f"over every floating output leaf), reference backend: 'same' is eager in the engine's dtype, 'fp32' "
             f"eager fp32. 'err/allowed': the worst element's error over the error the default tolerances allow "
             f"(<= 1 passes), cached / fallback. {versions_line(rows)}".rstrip(), "",
             "| model | precision | compile same | cached same | fallback same | compile fp32 | cached fp32 | "
             "fallback fp32 | exact audit | default tolerances (rtol, atol): err/allowed | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['precision']} | {r['error'][:140]} | | | | | | | | "
                         f"{r.get('total_s', 0):.0f} |")
            continue
        errors = " | ".join(_fmt(r[k], ".1e") for k in ("compile_same", "cached_same", "fallback_same",
                                                         "compile_fp32", "cached_fp32", "fallback_fp32"))
        rtol, atol = r["tolerances"]
        verdict = "pass" if r["cached_verified"] and r["fallback_verified"] else "FAIL"
        lines.append(f"| {r['label']} | {r['precision']} | {errors} | {'yes' if r['audit_exact'] else 'NO'} | "
                     f"{verdict} ({rtol:g}, {atol:g}): {r['cached_margin']:.2g} / {r['fallback_margin']:.2g} | "
                     f"{r['total_s']:.0f} |")
    notes = [f"- {r['label']}, {r['precision']}: {r['same_note']} ('same' not measured)" for r in rows
             if r.get("same_note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


class ModelTimeout(Exception):
    """A model ran past ``--timeout``."""


def _run_with_timeout(seconds: int, run: Callable[..., dict], *args: Any) -> dict:
    """``run(*args)`` stopped after ``seconds`` (0: no limit) with :class:`ModelTimeout` (SIGALRM; main thread)."""
    def expire(signum, frame):
        raise ModelTimeout(f"timeout: more than {seconds} s")

    if not seconds:
        return run(*args)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return run(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    ok = sum(1 for r in rows if r.get("ok"))
    lines = [f"{ok} of {len(rows)} models compile, refit (cached and fallback) and match eager leaf by leaf "
             f"(reference backend; max abs error over every output leaf). {versions_line(rows)}".rstrip(), "",
             "| model | compiles | TensorRT ops | TensorRT weights | err compile | err cached | err fallback | "
             "compile s | cached s | fallback s | loaded fallback (recorded graph) | runs in PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("compiles"):
            lines.append(f"| {r['label']} | no: {r.get('error', '?')[:120]} | | | | | | | | | | |")
            continue
        torch_part = ", ".join(r.get("fallback", [])[:6]) + (" ..." if len(r.get("fallback", [])) > 6 else "")
        if r.get("eager_modules"):
            torch_part = (torch_part + "; " if torch_part else "") + "eager modules: " + ", ".join(
                r["eager_modules"][:4])
        lines.append(
            f"| {r['label']} | {'yes' if r['ok'] else 'MISMATCH'} | {r['ops_trt']}/{r['ops']} ({r['op_share']:.0%}) | "
            f"{r['weight_share']:.0%} | {_fmt(r['err_compile'], '.1e')} | {_fmt(r['err_cached'], '.1e')} | "
            f"{_fmt(r['err_fallback'], '.1e')} | {r['compile_s']:.1f} | {r['cached_s']:.2f} | {r['fallback_s']:.1f} | "
            f"{_loaded_cell(r)} | {torch_part or '-'} |")
    return "\n".join(lines) + "\n"


def _loaded_cell(r: dict) -> str:
    if "loaded" not in r:
        return "-"
    if r["loaded"] == "exact":
        return f"exact, {r['loaded_s']:.2f} s"
    return r["loaded"] + (f": {r['loaded_error'][:100]}" if r.get("loaded_error") else "")


README_BEGIN, README_END = "<!-- zoo_repos table: begin (scripts/zoo_repos.py) -->", "<!-- zoo_repos table: end -->"


def update_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    content = readme.read_text()
    block = f"{README_BEGIN}\n{text}{README_END}"
    if README_BEGIN in content and README_END in content:
        head, rest = content.split(README_BEGIN, 1)
        content = head + block + rest.split(README_END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n## Models as repositories ship them\n\n" + block + "\n"
    readme.write_text(content)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"models to run (default: all of {', '.join(MODELS)})")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of zoo_repos.json")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--precision", default=None, metavar="LIST",
                        help="the precision sweep: compile each model at each of these precisions (e.g. "
                             "fp32,fp16,bf16) and write benchmarks/results/zoo_precision.md")
    parser.add_argument("--timeout", type=int, default=0, metavar="SECONDS",
                        help="stop a model (at one precision) after this many seconds; 0: no limit")
    args = parser.parse_args(argv)
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.precision is not None:
        from refitcore.options import parse_precision

        try:
            precisions = [parse_precision(p) for p in args.precision.split(",")]
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
        return sweep_precisions(names, precisions, merge=args.merge, timeout=args.timeout)
    raw = RESULTS / "zoo_repos.json"
    kept = json.loads(raw.read_text()) if args.merge and raw.exists() else []
    if isinstance(kept, dict):
        kept = kept["rows"]
    rows = {r["model"]: r for r in kept}
    for name in names:
        t0 = time.perf_counter()
        try:
            row = _run_with_timeout(args.timeout, run_one, name)
        except Exception as err:  # noqa: BLE001 - one model's failure is that model's row
            traceback.print_exc()
            row = {"model": name, "label": MODELS[name][0], "versions": versions(), "compiles": False,
                   "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        row["total_s"] = time.perf_counter() - t0
        rows[name] = row
        print(json.dumps(row, default=str), flush=True)
        ordered = [rows[n] for n in MODELS if n in rows]
        raw.write_text(json.dumps({"versions": versions(), "rows": ordered}, indent=1, default=str))
        text = table(ordered)
        (RESULTS / "zoo_repos.md").write_text("# Models as repositories ship them\n\n" + text)
    print(text)
    if not args.no_readme:
        update_readme(text)
    return 0 if all(r.get("ok") for r in rows.values()) else 1


def sweep_precisions(names: list[str], precisions: list[str], *, merge: bool, timeout: int) -> int:
    """The ``--precision`` sweep: a row per model and precision in zoo_precision.json/.md, written after each."""
    raw = RESULTS / "zoo_precision.json"
    kept = json.loads(raw.read_text()) if merge and raw.exists() else []
    rows = {(r["model"], r["precision"]): r for r in (kept["rows"] if isinstance(kept, dict) else kept)}
    order = list(MODELS)
    for name in names:
        for precision in precisions:
            t0 = time.perf_counter()
            try:
                row = _run_with_timeout(timeout, run_precision, name, precision)
            except Exception as err:  # noqa: BLE001 - one model's failure is that model's row
                if not isinstance(err, ModelTimeout):
                    traceback.print_exc()
                row = {"model": name, "label": MODELS[name][0], "precision": precision, "versions": versions(),
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            row["total_s"] = time.perf_counter() - t0
            rows[(name, precision)] = row
            print(json.dumps(row, default=str), flush=True)
            ordered = sorted(rows.values(), key=lambda r: (order.index(r["model"]) if r["model"] in order else
                                                           len(order), list(PRECISION_DTYPES).index(r["precision"])))
            raw.write_text(json.dumps({"versions": versions(), "rows": ordered}, indent=1, default=str))
            text = precision_table(ordered)
            (RESULTS / "zoo_precision.md").write_text("# Zoo models at fp32, fp16 and bf16\n\n" + text)
    print(text)
    return 0 if all(r.get("ok") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
