"""GPU tests: real TensorRT engines. Every test here is marked ``gpu`` and skips, with the reason
the capability probe gave, where no GPU + TensorRT can build, run and refit an engine."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import refitcore
from refitcore.backends import tensorrt as trt_backend
from tests.models import make


@pytest.fixture(scope="session")
def tensorrt_usable():
    ok, reason = trt_backend.usable()
    if not ok:
        pytest.skip(f"TensorRT backend unusable here: {reason}")
    return reason


@dataclasses.dataclass
class GpuCompiled:
    name: str
    engine: refitcore.RefittableEngine
    model: torch.nn.Module
    x: torch.Tensor


@pytest.fixture(scope="session")
def trt_compiled(tensorrt_usable):
    """``trt_compiled(name)``: compiled once per session on the TensorRT backend (fp32, TF32 off).
    Tests must not mutate it: refit without ``in_place``."""
    cache: dict[str, GpuCompiled] = {}

    def get(name: str) -> GpuCompiled:
        if name not in cache:
            model, x = make(name, 0)
            engine = refitcore.compile(model, x, backend="tensorrt")
            cache[name] = GpuCompiled(name, engine, model, x)
        return cache[name]

    return get
