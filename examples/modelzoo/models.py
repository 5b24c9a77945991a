"""Three small models with the features that make refit hard.

- :class:`TinyResNet`: conv -> BatchNorm pairs that the compiler folds into one convolution (the
  refit must rebuild the folded kernel and bias from the new BatchNorm statistics), and a residual
  branch whose BatchNorm cannot be folded.
- :class:`TiedAutoencoder`: the decoder reuses the encoder's weight, transposed (one parameter
  feeding two layers), and a refinement head whose two linear layers share one weight under two
  state_dict keys (tied parameters).
- :class:`DepthwiseClassifier`: a depthwise-separable block (grouped convolution, BatchNorm without
  affine parameters, hardswish, ReLU6 written as hardtanh) and a linear head.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width, eps=1e-3)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        s = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(s)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + s)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


class TiedAutoencoder(nn.Module):
    def __init__(self, features: int = 24, hidden: int = 8):
        super().__init__()
        self.encoder = nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.decoder_bias = nn.Parameter(torch.zeros(features))
        self.refine = nn.Linear(features, features)
        self.refine_again = nn.Linear(features, features, bias=False)
        self.refine_again.weight = self.refine.weight        # tied: two state_dict keys, one tensor

    def forward(self, x):
        z = F.gelu(self.norm(self.encoder(x)))
        r = F.linear(z, self.encoder.weight.t(), self.decoder_bias)   # the encoder's weight, transposed
        return self.refine_again(torch.tanh(self.refine(r)))


class DepthwiseClassifier(nn.Module):
    def __init__(self, channels: int = 12, classes: int = 5):
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(channels, affine=False)
        self.project = nn.Conv2d(channels, 8, 1, groups=4)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        y = F.hardswish(self.expand_bn(self.expand(x)))
        y = F.hardtanh(self.depthwise_bn(self.depthwise(y)), 0.0, 6.0)   # ReLU6
        y = self.project(y)
        return self.classifier(y.mean(dim=(2, 3)))


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    """A deterministic example input for a model of :data:`MODELS`."""
    return torch.randn(MODELS[name][1], generator=torch.Generator().manual_seed(seed))


# name -> (class, input shape)
MODELS = {
    "tiny_resnet": (TinyResNet, (1, 3, 32, 32)),
    "tied_autoencoder": (TiedAutoencoder, (4, 24)),
    "depthwise_classifier": (DepthwiseClassifier, (1, 3, 32, 32)),
}
