"""The repository's scripts (``scripts/*.py``, not a package) loaded as modules for the tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a fresh module named ``trtrefit_<name>``."""
    spec = importlib.util.spec_from_file_location(f"trtrefit_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
