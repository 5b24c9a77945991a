"""The torchvision classification zoo on the reference backend: compile, refit through the cached
map and the fallback with random weights, compare with eager (``scripts/zoo.py`` does the work and
writes the table).

``pytest -m zoo`` runs every model (slow: see benchmarks/results/zoo.md for the times); without
``-m zoo`` only a small representative subset runs."""
from __future__ import annotations

import pytest

from tests.scripts import load_script

# Small and diverse: ceil-mode pooling and concatenation (SqueezeNet), channel shuffle (ShuffleNet V2),
# hardswish / squeeze-excitation / BatchNorm eps 1e-3 (MobileNet V3).
SUBSET = ["squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v3_small"]


def _all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _check(name: str) -> dict:
    row = load_script("zoo").run_one(name)
    assert row["ok"], f"{name}: {row.get('reason') or row}"
    assert row["compile_err"] <= row["compile_bound"]
    return row


@pytest.mark.parametrize("name", SUBSET)
def test_zoo_subset(name):
    row = _check(name)
    assert row["weights"] > 0 and row["input"] <= 64


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", _all_models())
def test_zoo_model(name, request):
    if "zoo" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full zoo runs only when selected: pytest -m zoo")
    _check(name)
