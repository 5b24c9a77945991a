"""Refit keeps a state_dict's per-module version metadata: modules that check it (as torchvision's
MNASNet does) must still load the new weights for verification, from a state_dict or a checkpoint."""
from __future__ import annotations

import torch
from torch import nn

import refitcore


class Versioned(nn.Module):
    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if local_metadata.get("version") != self._version:
            raise AssertionError(f"state_dict lacks this module's version metadata: {local_metadata}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def test_version_metadata_survives_refit(tmp_path):
    """A loaded engine rebuilds its eager model from the recorded factory (a real ``Versioned``),
    so the new weights must reach ``load_state_dict`` with their version metadata."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    compiled = refitcore.compile(Versioned().eval(), x, backend="reference", model_factory=f"{__name__}:Versioned")
    compiled.save(tmp_path / "engine.trtrefit")
    engine = refitcore.load(tmp_path / "engine.trtrefit")
    new = Versioned().eval()
    path = tmp_path / "new.pt"
    torch.save(new.state_dict(), path)
    for weights in (new.state_dict(), str(path)):
        result = refitcore.refit(engine, weights, verify_inputs=[x], trust_factory=True)
        assert result.ok, str(result)
        assert refitcore.verify(result.engine, new, [x]).ok
