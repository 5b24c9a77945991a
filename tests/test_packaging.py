"""What the set-up installs: the project never forces a CUDA build of torch, and CI runs the README's commands.

A CPU-only machine installs torch/torchvision's CPU wheels first and then the project; that only
works if nothing in the project's requirements asks for a specific build (a CUDA package, an exact
torch version or a local version label such as ``+cu124``): pip then keeps what is installed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

CUDA_PACKAGES = re.compile(r"^(nvidia[-_]|triton\b|cuda[-_]|cupy)", re.I)


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name != "tensorrt":   # NVIDIA's TensorRT: for GPU machines, by definition
            reqs += extra
    return reqs


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0]


def test_no_requirement_forces_a_cuda_build_of_torch():
    reqs = _requirements()
    assert reqs, "pyproject.toml lists no requirements"
    assert [r for r in reqs if CUDA_PACKAGES.match(_name(r))] == []
    for req in reqs:
        if _name(req).lower() in ("torch", "torchvision"):
            assert "==" not in req and "+" not in req, f"{req!r} would replace an installed CPU build"
            assert re.fullmatch(r"torch(vision)?>=[\d.]+", req.replace(" ", "")), req


def test_the_checker_sees_a_forced_build(monkeypatch):
    """The check above fails on requirements that would pull CUDA wheels over a CPU build."""
    for bad in (["torch==2.14.1"], ["torch>=2.6+cu124"], ["nvidia-cublas-cu12>=12"], ["triton"]):
        monkeypatch.setattr(sys.modules[__name__], "_requirements", lambda bad=bad: bad)
        with pytest.raises(AssertionError):
            test_no_requirement_forces_a_cuda_build_of_torch()


def _readme_commands() -> list[str]:
    """The Quick start's first two code blocks: set up and run the main job; run the tests."""
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)[:2]
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_commands():
    """`.ci/run` installs what the README's set-up installs and runs its two commands exactly."""
    setup, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    for step in setup.split(" && "):
        if step.startswith(("python -m pip install", "python -m pytest")):
            assert step.replace("python -m pip install", "python -m pip install -q") in ci or step in ci, step
    assert tests in ci
