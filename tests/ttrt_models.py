"""Tiny models for checking Torch-TensorRT's refit: one per Torch-TensorRT converter family that
records refittable weights (``ctx.weight_refit_map``: convolution and deconvolution KERNEL/BIAS,
batch norm folded into SCALE/SHIFT, and every tensor a converter turns into a CONSTANT layer:
linear/matmul weights, normalization scale and bias, embedding tables, buffers used elementwise,
complex buffers split into real and imaginary parts, ...), plus the models of Torch-TensorRT's own
refit tests and of the acceptance list (resnet18 and mobilenet_v2 at a tiny input, a tiny BERT
with random weights, the conv + BatchNorm models, cumsum, a graph split into several engines by
``torch_executed_ops``, a dynamic batch).

``MODELS``: name -> (model factory, example-inputs factory); each factory builds a fresh model in
eval mode with random weights, converted in seconds. ``SETTINGS``: name -> the Torch-TensorRT
compile settings a model needs besides the defaults (``torch_executed_ops``, ``dynamic_shapes``
in torch.export's form). ``FAMILIES``: name -> the converter family (or acceptance item) it covers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "SETTINGS", "FAMILIES", "build"]

Factory = Callable[[], nn.Module]
Inputs = Callable[[], tuple[torch.Tensor, ...]]


def _image(c: int = 3, size: int = 16, batch: int = 1) -> Inputs:
    return lambda: (torch.randn(batch, c, size, size),)


class Seq(nn.Sequential):
    """nn.Sequential that is built in eval mode."""

    def __init__(self, *mods: nn.Module):
        super().__init__(*mods)
        self.eval()


class ConvBNNet(nn.Module):
    """Torch-TensorRT's refit-test model (conv, relu, BatchNorm, pools, conv, linear) at 16x16."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12, eps=eps)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = self.bn(F.relu(self.conv1(x)))
        x = F.max_pool2d(x, (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), (2, 2))
        return self.fc1(torch.flatten(x, 1))


def _conv_bn(eps: float = 1e-5) -> nn.Module:
    model = ConvBNNet(eps)
    with torch.no_grad():   # running statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


class CumsumNet(nn.Module):
    """Torch-TensorRT's cumsum refit test: conv, linear, cumsum, square."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 16 * 16, 10)

    def forward(self, x):
        x = torch.flatten(F.relu(self.conv1(x)), 1)
        return torch.cumsum(self.fc1(x), 1) ** 2


class MatmulParam(nn.Module):
    """A bare parameter as matmul operand (aten.mm / aten.matmul, not linear)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 5))

    def forward(self, x):
        return torch.matmul(x, self.w)


class Addmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.addmm(self.b, x, self.w)


class NativeLayerNorm(nn.Module):
    """aten.native_layer_norm called directly (its own converter)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.ops.aten.native_layer_norm(x, [6], self.weight, self.bias, 1e-5)[0]


class EmbedMLP(nn.Module):
    """Embedding, LayerNorm, GELU MLP (integer token inputs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(F.gelu(self.norm(self.emb(ids))))


class SDPA(nn.Module):
    """Multi-head self attention through F.scaled_dot_product_attention (IAttention)."""

    def __init__(self, causal: bool = False, heads: int = 2, dim: int = 8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.causal, self.heads = causal, heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class BufferElementwise(nn.Module):
    """Buffers and a parameter used elementwise (CONSTANT layers Torch-TensorRT records)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.randn(1, 4, 1, 1))
        self.register_buffer("gain", torch.rand(4, 1, 1) + 0.5)
        self.scale = nn.Parameter(torch.randn(5))
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (self.conv(x) + self.offset) * self.gain * self.scale


class ComplexBuffer(nn.Module):
    """Rotary embedding with a complex64 buffer (freqs_cis): view_as_complex, multiply by the
    buffer, view_as_real; Torch-TensorRT's complex rewrite stores the buffer as real/imag pairs."""

    def __init__(self, seq: int = 6, heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.proj = nn.Linear(heads * head_dim, heads * head_dim)
        angles = torch.rand(seq, head_dim // 2) * 6.28
        self.register_buffer("freqs_cis", torch.polar(torch.rand(seq, head_dim // 2) + 0.5, angles))
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x):
        b, s, _ = x.shape
        q = self.proj(x).reshape(b, s, self.heads, self.head_dim // 2, 2)
        rotated = torch.view_as_complex(q) * self.freqs_cis[None, :, None, :]
        return torch.view_as_real(rotated).flatten(2)


class ComplexMul(nn.Module):
    """A complex buffer times a complex view of the input, returned as real (the second complex
    shape Torch-TensorRT's refit had trouble with: a complex constant without a rotary layout)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(3, dtype=torch.complex64))
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        z = torch.view_as_complex(self.lin(x).reshape(x.shape[0], 3, 2))
        return torch.view_as_real(z * self.w)


class EmbeddingBag(nn.Module):
    """nn.EmbeddingBag (mean) with constant offsets."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 6, mode="mean")
        self.register_buffer("offsets", torch.tensor([0, 3]))

    def forward(self, ids):
        return self.bag(ids.reshape(-1), self.offsets)


class RMSNormMLP(nn.Module):
    """Linear, RMSNorm (an LLM's normalization), SiLU."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.RMSNorm(8, eps=1e-6)

    def forward(self, x):
        return F.silu(self.norm(self.fc(x)))


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, type_vocab_size=2,
                        attn_implementation="sdpa")
    return BertModel(config).eval()


def _torchvision(name: str) -> Factory:
    def factory() -> nn.Module:
        import torchvision.models as models

        return getattr(models, name)(weights=None).eval()
    return factory


def _ids(batch: int = 1, seq: int = 8, vocab: int = 20) -> Inputs:
    return lambda: (torch.randint(0, vocab, (batch, seq), dtype=torch.int32),)


def _embed_mlp() -> nn.Module:
    return EmbedMLP().eval()


MODELS: dict[str, tuple[Factory, Inputs]] = {
    # one per converter family that records refittable weights
    "conv1d": (lambda: Seq(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU()), lambda: (torch.randn(1, 3, 10),)),
    "conv2d": (lambda: Seq(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()), _image()),
    "conv2d_groups_nobias": (lambda: Seq(nn.Conv2d(4, 8, 3, groups=2, bias=False)), _image(4)),
    "conv3d": (lambda: Seq(nn.Conv3d(2, 3, 3, padding=1)), lambda: (torch.randn(1, 2, 4, 5, 5),)),
    "conv_transpose2d": (lambda: Seq(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)),
                         _image(size=8)),
    "conv_transpose1d": (lambda: Seq(nn.ConvTranspose1d(3, 2, 4, stride=2)), lambda: (torch.randn(1, 3, 7),)),
    "linear": (lambda: Seq(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: (torch.randn(2, 8),)),
    "linear_3d": (lambda: Seq(nn.Linear(8, 5)), lambda: (torch.randn(2, 3, 8),)),
    "matmul_param": (lambda: MatmulParam().eval(), lambda: (torch.randn(3, 8),)),
    "addmm": (lambda: Addmm().eval(), lambda: (torch.randn(3, 8),)),
    "batch_norm": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), _image()),
    "batch_norm_1d": (lambda: Seq(nn.Linear(6, 4), nn.BatchNorm1d(4)), lambda: (torch.randn(3, 6),)),
    "layer_norm": (lambda: Seq(nn.Linear(6, 6), nn.LayerNorm(6)), lambda: (torch.randn(2, 3, 6),)),
    "native_layer_norm": (lambda: NativeLayerNorm().eval(), lambda: (torch.randn(2, 3, 6),)),
    "group_norm": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)), _image(size=6)),
    "instance_norm": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, affine=True)), _image(size=6)),
    "embedding": (lambda: Seq(nn.Embedding(20, 6)), _ids()),
    "embedding_layernorm_mlp": (_embed_mlp, _ids()),
    "prelu": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.PReLU(4)), _image(size=6)),
    "embedding_bag": (lambda: EmbeddingBag().eval(), _ids(seq=6)),
    "rms_norm": (lambda: RMSNormMLP().eval(), lambda: (torch.randn(2, 3, 8),)),
    "sdpa": (lambda: SDPA().eval(), lambda: (torch.randn(1, 5, 8),)),
    "sdpa_causal": (lambda: SDPA(causal=True).eval(), lambda: (torch.randn(1, 5, 8),)),
    "buffer_elementwise": (lambda: BufferElementwise().eval(), _image(size=5)),
    "cumsum": (lambda: CumsumNet().eval(), _image()),
    "complex_buffer": (lambda: ComplexBuffer().eval(), lambda: (torch.randn(1, 6, 16),)),
    "complex_mul": (lambda: ComplexMul().eval(), lambda: (torch.randn(2, 6),)),
    # the models of Torch-TensorRT's refit tests and the acceptance list
    "conv_bn": (_conv_bn, _image()),
    "conv_bn_eps1e-3": (lambda: _conv_bn(eps=1e-3), _image()),
    "multi_engine": (_conv_bn, _image()),
    "dynamic_batch": (_conv_bn, _image(batch=2)),
    "resnet18": (_torchvision("resnet18"), _image(size=32)),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), _image(size=32)),
    "tiny_bert": (_tiny_bert, _ids(seq=8, vocab=64)),
}


def _dynamic_batch() -> dict:
    batch = torch.export.Dim("batch", min=1, max=8)
    return {"dynamic_shapes": ({0: batch},)}


SETTINGS: dict[str, dict] = {
    "multi_engine": {"torch_executed_ops": {"torch.ops.aten.convolution.default"}},
    "dynamic_batch": _dynamic_batch(),
}

FAMILIES: dict[str, str] = {
    "conv1d": "convolution", "conv2d": "convolution", "conv2d_groups_nobias": "convolution",
    "conv3d": "convolution", "conv_transpose2d": "deconvolution", "conv_transpose1d": "deconvolution",
    "linear": "linear", "linear_3d": "linear", "matmul_param": "matmul", "addmm": "addmm",
    "batch_norm": "batch_norm", "batch_norm_1d": "batch_norm", "layer_norm": "layer_norm",
    "native_layer_norm": "native_layer_norm", "group_norm": "group_norm", "instance_norm": "instance_norm",
    "embedding": "embedding", "embedding_layernorm_mlp": "embedding", "prelu": "prelu",
    "embedding_bag": "embedding_bag", "rms_norm": "rms_norm",
    "sdpa": "scaled_dot_product_attention", "sdpa_causal": "scaled_dot_product_attention",
    "buffer_elementwise": "constants used elementwise", "cumsum": "cumsum",
    "complex_buffer": "complex buffers", "complex_mul": "complex buffers",
    "conv_bn": "acceptance: conv + BatchNorm", "conv_bn_eps1e-3": "acceptance: conv + BatchNorm",
    "multi_engine": "acceptance: torch_executed_ops", "dynamic_batch": "acceptance: dynamic batch",
    "resnet18": "acceptance: resnet18", "mobilenet_v2": "acceptance: mobilenet_v2",
    "tiny_bert": "acceptance: tiny BERT",
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model ``name`` and its example inputs, both drawn from ``seed``."""
    factory, inputs = MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    torch.manual_seed(seed + 1)
    return model, inputs()
