"""Collection rules of ``pytest --trt-refit``: nothing declared goes silently unchecked.

- Tests that use the ``trt_refit`` fixture carry the ``trt_refit`` marker (so ``-m trt_refit``
  selects them, as the docs promise).
- Models declared by a loaded ``conftest.py``'s ``pytest_trt_refit_models()`` are collected even
  when ``testpaths`` or the path arguments point elsewhere (a root conftest under
  ``pytest tests/``): pytest loads that conftest but never offers it to ``pytest_collect_file``.
  They are added before ``-k``/``-m``/``--deselect`` run, so an explicit deselection still
  applies, and the summary says which declared models the user deselected.
- With node ids on the command line (``pytest tests/test_a.py::test_x``) the user picked tests
  one by one: declared models are not added, and the summary says they were not selected.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .declarative import RefitModelsFile, RefitPropertyItem

__all__ = ["mark_fixture_tests", "declaring_conftests", "add_declared_models", "record_deselected"]


def mark_fixture_tests(items) -> None:
    """Give every test that uses the ``trt_refit`` fixture the ``trt_refit`` marker."""
    for item in items:
        if "trt_refit" in getattr(item, "fixturenames", ()) and item.get_closest_marker("trt_refit") is None:
            item.add_marker(pytest.mark.trt_refit)


def declaring_conftests(config) -> list:
    """Loaded conftest modules that define ``pytest_trt_refit_models``, in a stable order."""
    found = {}
    for plugin in config.pluginmanager.get_plugins():
        where = getattr(plugin, "__file__", None)
        if (where and os.path.basename(where) == "conftest.py"
                and callable(getattr(plugin, "pytest_trt_refit_models", None))):
            found[os.path.realpath(where)] = plugin
    return [found[k] for k in sorted(found)]


def _picked_by_node_id(config) -> bool:
    return any("::" in str(arg) for arg in config.args)


def add_declared_models(session, config, items, state: dict) -> None:
    """Append the generated items of every declaring conftest that collection did not reach.

    ``state`` (the session's collection record) gets ``declared`` (model names per conftest),
    ``added`` (conftests collected here) and ``not_selected`` (models left out because the user
    picked tests by node id)."""
    reached = set(state.get("files", []))     # conftests pytest_collect_file offered (declarative.py)
    for module in declaring_conftests(config):
        path = os.path.realpath(module.__file__)
        if path in reached:
            continue
        if _picked_by_node_id(config):
            state.setdefault("not_selected", []).append(_relative(config, path))
            continue
        collector = RefitModelsFile.from_parent(session, path=Path(path), module=module)
        items.extend(session.genitems(collector))
        state.setdefault("added", []).append(_relative(config, path))


def record_deselected(items, state: dict) -> None:
    """Remember the generated model checks that ``-k``/``-m``/``--deselect`` removed."""
    for item in items:
        if isinstance(item, RefitPropertyItem):
            state.setdefault("deselected", []).append(item.nodeid)



def _relative(config, path: str) -> str:
    try:
        return os.path.relpath(path, str(config.rootpath))
    except ValueError:
        return path
