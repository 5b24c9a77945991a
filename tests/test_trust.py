"""A bundle file may record its model factory, but nothing it names is imported unless the caller
asks (``trust_factory=True``, CLI ``--trust-factory``) or passes the model: not by load, the gate,
refit's verification, or the fallback path."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import refitcore
from refitcore.cli import main as cli
from refitcore.engine import bundle
from tests.cli_models import randomized_state, small_net

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A bundle whose header names ``<fresh module>:build``; the module leaves a file when imported."""
    name = f"trust_probe_{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "imported.flag"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(flag)!r}).write_text("imported")
        from tests.cli_models import small_net as build
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    engine = refitcore.compile(small_net(), X, backend="reference", model_factory=f"{name}:build")
    engine.save(tmp_path / "m.trtrefit")
    torch.save(randomized_state(1), tmp_path / "good.pt")
    yield tmp_path, flag, name
    sys.modules.pop(name, None)


def test_nothing_the_file_names_is_imported_without_trust(probe, capsys):
    d, flag, name = probe
    engine = refitcore.load(d / "m.trtrefit")
    assert engine.model_factory == f"{name}:build" and not flag.exists()
    state = randomized_state(1)
    report = refitcore.gate(d / "m.trtrefit", d / "good.pt", "random:1")
    assert report.exit_code == 2 and "trust_factory=True" in report.error and "--trust-factory" in report.error
    with pytest.raises(refitcore.UntrustedFactoryError, match=f"{name}:build"):
        refitcore.refit(engine, state, verify_inputs=[X])
    # The fallback path converts the graph the file records (data, checked at load): no factory needed.
    assert refitcore.refit(engine, state, path="fallback").ok
    assert refitcore.fallback_mapping(engine, state)
    # A file without that record would have to re-export the model: the factory, which is not trusted.
    header, arrays = engine.to_parts()
    del header["program"]
    bundle.write(d / "no_program.trtrefit", header, arrays)
    bare = refitcore.load(d / "no_program.trtrefit")
    with pytest.raises(refitcore.UntrustedFactoryError, match=f"{name}:build"):
        refitcore.refit(bare, state, path="fallback")
    with pytest.raises(refitcore.UntrustedFactoryError):
        refitcore.fallback_mapping(bare, state)
    assert cli.main(["gate", str(d / "m.trtrefit"), str(d / "good.pt"), "--inputs", "random:1", "-q"]) == 2
    assert "--trust-factory" in capsys.readouterr().err
    assert not flag.exists() and name not in sys.modules


def test_with_trust_the_factory_is_imported(probe):
    d, flag, name = probe
    engine = refitcore.load(d / "m.trtrefit")
    result = refitcore.refit(engine, randomized_state(2), path="fallback", verify_inputs=[X], trust_factory=True)
    assert result.ok and flag.exists(), str(result)
    flag.unlink()
    sys.modules.pop(name, None)
    assert refitcore.gate(d / "m.trtrefit", d / "good.pt", "random:1", trust_factory=True).ok
    assert flag.exists()


def test_a_passed_model_needs_no_trust(probe):
    d, flag, _ = probe
    engine = refitcore.load(d / "m.trtrefit")
    model = small_net()
    model.load_state_dict(randomized_state(3))  # the reference model holds the new weights
    assert refitcore.refit(engine, randomized_state(3), path="fallback", verify_inputs=[X],
                           reference_model=model).ok
    assert refitcore.gate(d / "m.trtrefit", d / "good.pt", "random:1", model="tests.cli_models:small_net").ok
    assert not flag.exists()


def test_a_bundle_naming_os_abort_does_not_kill_the_gate(tmp_path):
    engine = refitcore.compile(small_net(), X, backend="reference", model_factory="os:abort")
    engine.save(tmp_path / "evil.trtrefit")
    torch.save(randomized_state(1), tmp_path / "good.pt")
    proc = subprocess.run([sys.executable, "-m", "refitcore.cli.main", "gate", str(tmp_path / "evil.trtrefit"),
                           str(tmp_path / "good.pt"), "--inputs", "random:1", "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'os:abort'" in proc.stderr and "--trust-factory" in proc.stderr and "Traceback" not in proc.stderr
