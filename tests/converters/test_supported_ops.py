"""docs/supported-ops.md is generated from the converter registry and must match it."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("trtrefit_supported_ops", ROOT / "scripts" / "supported_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_table_matches_the_registry():
    script = _script()
    committed = (ROOT / "docs" / "supported-ops.md").read_text()
    assert committed == script.render(), "docs/supported-ops.md is stale: run python scripts/supported_ops.py"


def test_table_lists_every_registered_overload():
    from refitcore.conversion.registry import registered_targets

    text = _script().render()
    for name in registered_targets():
        assert f"| `{name}` |" in text
    assert "`aten.embedding.default`" in text and "`aten.upsample_bilinear2d.vec`" in text
