"""Layout traps fed deliberately wrong: a weight map whose recipe reads a weight in the wrong layout
(a transposed convolution's BatchNorm folded along axis 0, an embedding table or a Conv1D weight
transposed) must make verification fail and the audit name that engine weight, and the auto path
must fall back and say which weight disagreed."""
import dataclasses

import pytest
import torch
from torch import nn

import refitcore

from .harness import random_weights


def _transposed(source, key_input="x"):
    op = source.inputs[key_input]
    return dataclasses.replace(source, inputs={**source.inputs, key_input: {"op": "aten.t.default", "args": [op],
                                                                          "kwargs": {}}})


def _fold_axis0(source):
    return dataclasses.replace(source, params={"eps": source.params["eps"]})


class Conv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def _embedding():
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))


CASES = [
    pytest.param(lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, stride=2), nn.BatchNorm2d(4)),
                 lambda: (torch.randn(1, 4, 3, 3),), "bn_fold_kernel", _fold_axis0, id="convT_bn_folded_along_axis0"),
    pytest.param(lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)),
                 lambda: (torch.randn(1, 4, 3, 3),), "bn_fold_kernel", _fold_axis0,
                 id="grouped_convT_bn_folded_along_axis0"),
    pytest.param(_embedding, lambda: (torch.tensor([[1, 5, 9]]),), "0.weight", _transposed,
                 id="embedding_table_transposed"),
    pytest.param(Conv1D, lambda: (torch.randn(3, 4),), "weight", _transposed, id="conv1d_weight_transposed"),
]


def _target(engine, what):
    """The engine weight whose recipe is ``what`` or whose copy reads state_dict key ``what``."""
    for name, src in engine.weight_map.sources.items():
        if src.recipe == what or src.inputs.get("x") == {"key": what}:
            return name
    raise AssertionError(f"no engine weight for {what}")


@pytest.mark.parametrize("make, inputs, what, corrupt", CASES)
def test_wrong_layout_fails_verify_and_audit_names_the_weight(make, inputs, what, corrupt):
    model = make().eval()
    x = inputs()
    engine = refitcore.compile(model, x, backend="reference")
    name = _target(engine, what)
    engine.weight_map.sources[name] = corrupt(engine.weight_map.sources[name])
    new = random_weights(model, seed=5)

    result = refitcore.refit(engine, new.state_dict(), path="cached", verify_inputs=[x], audit=True,
                             reference_model=new)
    assert not result.ok and not result.verdict.ok, str(result)
    assert not result.audit.ok and result.audit.first_failure(engine.weight_names).name == name, str(result.audit)
    assert [d.name for d in result.audit.failures] == [name], str(result.audit)
    assert name in str(result.audit)

    auto = refitcore.refit(engine, new.state_dict(), path="auto", verify_inputs=[x], reference_model=new)
    assert auto.ok and auto.fell_back, str(auto)
    assert any(name in m for m in auto.messages), auto.messages
