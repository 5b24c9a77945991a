"""The models the test-suite compiles (issue 'compile'), each small and deterministic."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "make", "randomize_batchnorm"]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (default init makes BN an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


class ConvBnReluStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )

    def forward(self, x):
        return self.body(x)


class ConvBiasBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvBn(nn.Module):
    """Conv, BatchNorm (folded into the conv's kernel), ReLU, pooled linear head."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, eps=eps)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class DepthwiseBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1, bias=False)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 8, 3, padding=1, groups=4, bias=True)
        self.bn2 = nn.BatchNorm2d(8, affine=False)

    def forward(self, x):
        return self.bn2(self.grouped(torch.relu(self.bn(self.dw(self.pw(x))))))


class StridedDilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c = nn.Conv2d(8, 4, 3, stride=(2, 1), padding=(1, 3), dilation=(1, 3))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class ResidualBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut_bn = nn.BatchNorm2d(c)  # BatchNorm on the stem output, which also feeds conv1: not foldable

    def forward(self, x):
        s = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(s)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut_bn(s))


class TiedMLP(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear(no bias); the first and last Linear share one weight."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(d)
        self.fc2 = nn.Linear(d, d, bias=False)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


def _tv(name):
    def factory():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    return factory


# name -> (factory, input shape)
MODELS = {
    "conv_bn_relu": (ConvBnReluStack, (1, 3, 64, 64)),
    "conv_bias_bn": (ConvBiasBn, (1, 3, 64, 64)),
    "depthwise_bn": (DepthwiseBn, (1, 3, 64, 64)),
    "strided_dilated": (StridedDilated, (1, 3, 64, 64)),
    "residual": (ResidualBlock, (1, 3, 64, 64)),
    "tied_mlp": (TiedMLP, (4, 32)),
    "resnet18": (_tv("resnet18"), (1, 3, 64, 64)),
    "mobilenet_v2": (_tv("mobilenet_v2"), (1, 3, 64, 64)),
    "vgg11_bn": (_tv("vgg11_bn"), (1, 3, 64, 64)),
}
SMALL = ["conv_bn_relu", "conv_bias_bn", "depthwise_bn", "strided_dilated", "residual", "tied_mlp"]


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(model in eval mode with random BatchNorm statistics, example input)."""
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_batchnorm(factory(), seed).eval()
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
