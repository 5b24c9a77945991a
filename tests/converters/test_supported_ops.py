"""docs/supported-ops.md is generated from the converter registry and must match it."""
from tests.scripts import ROOT, load_script


def _script():
    return load_script("supported_ops")


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
