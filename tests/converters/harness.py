"""One harness for every converter test: compile a tiny module on the reference backend, compare
with eager, then refit it with new random weights through the cached and the fallback path."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

import refitcore
from pytest_trtrefit.strategies import weight_set

__all__ = ["Proj", "check_converter", "random_weights", "tolerance"]


class Proj(nn.Module):
    """A linear projection (so there are weights to refit) followed by ``fn`` (a function or a module)."""

    def __init__(self, fn, d: int = 4):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x))


def tolerance(expected: torch.Tensor) -> float:
    """The suite's bound: max abs error <= 1e-4 * max(1, max|eager|)."""
    return 1e-4 * max(1.0, float(expected.double().abs().max())) if expected.numel() else 1e-4


def random_weights(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every floating parameter and buffer redrawn by the plugin's
    ``weight_set`` (fan-in scaled; tied parameters stay tied: the copy shares them as the original
    does; BatchNorm variances stay positive; integer buffers keep their values)."""
    new = copy.deepcopy(model).eval()
    new.load_state_dict(weight_set(new, seed=seed, keep_integers=True))
    return new


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def check_converter(model: nn.Module, *inputs: torch.Tensor, seed: int = 1,
                    paths: Sequence[str] = ("cached", "fallback"), strict: bool = True) -> refitcore.RefittableEngine:
    """Compile ``model`` on the reference backend, check it against eager, refit it with random
    weights through each path (verify + audit) and check the refit changed the answer. Returns the
    compiled engine. ``strict``: every op must convert (a converter that declines its op fails the
    test instead of passing with the op in PyTorch); ``strict=False`` for models meant to partition."""
    model = model.eval()
    engine = refitcore.compile(model, inputs, backend="reference", strict=strict)
    with torch.no_grad():
        expected = _outputs(model(*inputs))
    actual = _outputs(engine(*inputs))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"output {i}: shape {tuple(a.shape)} != eager {tuple(e.shape)}"
        err = float((a.double() - e.double()).abs().max()) if e.numel() else 0.0
        assert err <= tolerance(e), f"output {i}: max abs error {err:.3g} > {tolerance(e):.3g}"
    new = random_weights(model, seed)
    # The weight map survives JSON (operands of folded ops included) and still maps new weights the same.
    from refitcore.conversion.weight_map import WeightMap
    from refitcore.refitting.mapping import cached_mapping

    loaded = WeightMap.loads(engine.weight_map.dumps())
    want, got = cached_mapping(engine.weight_map, new.state_dict()), cached_mapping(loaded, new.state_dict())
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), f"{name}: differs after the weight map's JSON round trip"
    for path in paths:
        # A state_dict reuses the exported program for the fallback path (exporting again is what
        # the zoo measures); verification compares with the new eager module itself.
        result = refitcore.refit(engine, new.state_dict(), path=path, verify_inputs=[tuple(inputs)], audit=True,
                                 reference_model=new)
        assert result.ok, str(result)
        assert result.verdict is not None and result.verdict.ok, str(result)
        assert result.audit is not None and result.audit.ok, str(result)
        assert result.path == path and not result.fell_back, str(result)
        if len(engine.weight_map.sources) and any(t.is_floating_point() for t in model.state_dict().values()):
            refitted = _outputs(result.engine(*inputs))
            assert any(not torch.equal(r, a) for r, a in zip(refitted, actual)), \
                f"refit via {path} left the outputs unchanged"
    return engine
