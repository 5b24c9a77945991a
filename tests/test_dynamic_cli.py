"""The CLI with shape ranges: ``--input 1-4x3x16x16`` compiles a dynamic engine, and the gate
compares on samples across the range (min, opt, max and drawn shapes)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import refitcore
from refitcore.capture.shapes import ShapeRangeError, parse_shape_range
from refitcore.cli import main as cli
from tests.cli_models import randomized_state

FACTORY = "tests.cli_models:small_net"


@pytest.mark.parametrize("text, ranges", [
    ("1x3x8x8", ((1, 1, 1), (3, 3, 3), (8, 8, 8), (8, 8, 8))),
    ("1-8x3x8x8", ((1, 1, 8), (3, 3, 3), (8, 8, 8), (8, 8, 8))),
    ("1-4-8x3x8-16", ((1, 4, 8), (3, 3, 3), (8, 8, 16))),
    ("2,3", ((2, 2, 2), (3, 3, 3))),
])
def test_parse_shape_range(text, ranges):
    assert parse_shape_range(text) == ranges


@pytest.mark.parametrize("text", ["", "0-8x3", "8-1x3", "1-9-8x3", "1-2-3-4x3", "ax3", "1--8"])
def test_parse_shape_range_rejects(text):
    with pytest.raises(ShapeRangeError):
        parse_shape_range(text)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dyncli")
    code = cli.main(["compile", FACTORY, "--input", "1-2-4x3x16x16", "--backend", "reference", "-q",
                     "-o", str(d / "m.trtrefit")])
    assert code == 0
    torch.save(randomized_state(1), d / "good.pt")
    return d


def test_compile_records_the_range(work):
    engine = refitcore.load(work / "m.trtrefit")
    assert engine.io.profiles.ranges[0][0] == (1, 2, 4)
    assert engine.io.input_shapes == ((2, 3, 16, 16),)


def test_gate_samples_span_the_range(work):
    engine = refitcore.load(work / "m.trtrefit")
    samples = cli.load_samples("random:3:7", engine.io)
    batches = [s[0].shape[0] for s in samples]
    assert batches[:3] == [1, 2, 4] and all(1 <= b <= 4 for b in batches) and len(batches) >= 4
    assert all(s[0].shape[1:] == (3, 16, 16) for s in samples)


def test_gate_passes_across_the_range_and_refuses_samples_outside_it(work):
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", "random:2", "-q",
                     "--model", FACTORY]) == 0
    torch.save([[torch.randn(1, 3, 16, 16)], [torch.randn(4, 3, 16, 16)]], work / "inside.pt")
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", str(work / "inside.pt"),
                     "-q", "--model", FACTORY]) == 0
    torch.save([[torch.randn(5, 3, 16, 16)]], work / "outside.pt")
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", str(work / "outside.pt"),
                     "-q", "--model", FACTORY]) == cli.EXIT_UNUSABLE


def test_bad_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compile", FACTORY, "--input", "4-1x3x16x16", "-o", "x.trtrefit"])
    assert "needs 1 <= min <= opt <= max" in capsys.readouterr().err
