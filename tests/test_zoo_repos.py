"""Models as repositories ship them (``scripts/zoo_repos.py`` does the work and writes the table):
compile with partitioning, refit through the cached map and the fallback, compare leaf by leaf.

Without ``-m zoo`` only the fast rows run (the custom structured-I/O modules and a tiny BERT)."""
from __future__ import annotations

import pytest

from tests.scripts import load_script

ZOO = load_script("zoo_repos")


def _check(name: str) -> dict:
    row = ZOO.run_one(name)
    assert row["ok"], row
    for key in ("err_compile", "err_cached", "err_fallback"):
        assert row[key] < 1e-3, (key, row)
    return row


@pytest.mark.parametrize("name", ZOO.FAST)
def test_zoo_repos_fast(name):
    row = _check(name)
    assert 0 <= row["op_share"] <= 1 and row["ops"] > 0


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO.MODELS if n not in ZOO.FAST])
def test_zoo_repos_model(name, request):
    if "zoo" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full zoo runs only when selected: pytest -m zoo")
    if ZOO.MODELS[name][0].startswith("diffusers"):
        pytest.importorskip("diffusers")
    _check(name)


def test_rows_and_table_say_which_versions_they_ran_with():
    versions = ZOO.versions()
    assert set(versions) == {"torch", "transformers", "timm", "diffusers"} and versions["torch"]
    rows = [{"model": "a", "label": "a", "compiles": False, "error": "x", "versions": versions},
            {"model": "b", "label": "b", "compiles": False, "error": "y"}]
    first = ZOO.table(rows).splitlines()[0]
    assert f"Made with torch {versions['torch']}, transformers " in first
    assert first.endswith("; versions not recorded.")
