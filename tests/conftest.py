"""Shared fixtures of the refitcore test-suite: every model is compiled once per session and then
refitted many times (refits are copies unless ``in_place=True``, so the cached engines never change)."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import refitcore
from tests.models import MODELS, SMALL, make

LARGE = [n for n in MODELS if n not in SMALL]


@dataclasses.dataclass
class Compiled:
    """A model compiled on the reference backend, with the eager model and input it came from."""

    name: str
    engine: refitcore.RefittableEngine
    model: torch.nn.Module
    x: torch.Tensor

    def fresh(self, seed: int) -> torch.nn.Module:
        """Another instance of the same architecture with other weights."""
        return make(self.name, seed)[0]

    def expected(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.no_grad():
            return (model or self.model).eval()(self.x)


@pytest.fixture(scope="session")
def compiled():
    """``compiled(name)`` -> :class:`Compiled`, compiled once per session (fp32, reference backend).

    Tests must not mutate the returned engine or model: refit without ``in_place`` (the default)
    and make new weights with ``.fresh(seed)``."""
    cache: dict[str, Compiled] = {}

    def get(name: str) -> Compiled:
        if name not in cache:
            model, x = make(name, 0)
            engine = refitcore.compile(model, x, backend="reference")
            cache[name] = Compiled(name, engine, model, x)
        return cache[name]

    return get


def outputs(engine, x) -> list[torch.Tensor]:
    """The engine's outputs as a list (for bit-exact comparisons)."""
    return [o.clone() for o in engine.run([x])]


def bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                                    for x, y in zip(a, b))
