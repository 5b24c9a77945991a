"""Crafted content outside the weight map: an elementwise layer of an unknown operation in the
reference plan and an unknown node type in the recorded call structure are BundleErrors at load
(CLI exit 2, one line, no traceback), whatever the file's checksums."""
from __future__ import annotations

import copy

import pytest
import torch

import refitcore
from refitcore.cli import main as cli
from refitcore.errors import BundleError
from tests.cli_models import randomized_state, small_net
from tests.test_bundle_fuzz import _repack, _split

FACTORY = "tests.cli_models:small_net"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("crafted_plan")
    refitcore.compile(small_net(), torch.randn(1, 3, 32, 32), backend="reference").save(d / "m.trtrefit")
    torch.save(randomized_state(1), d / "good.pt")
    header, body = _split((d / "m.trtrefit").read_bytes())
    return d, header, body


def _elementwise(h, op):
    layer = next(layer for layer in h["impl"]["plan"]["layers"] if layer["type"] == "ELEMENTWISE")
    layer["attrs"]["op"] = op


def _output_node(h, node):
    h["structure"]["out"] = dict(node, c=[h["structure"]["out"]])


CASES = {
    "unknown-elementwise-op": (lambda h: _elementwise(h, "EXPLODE"), "unknown elementwise operation 'EXPLODE'"),
    "non-string-elementwise-op": (lambda h: _elementwise(h, ["SUM"]), "unknown elementwise operation"),
    "unknown-output-node": (lambda h: _output_node(h, {"t": "namedtuple"}), "unknown node type 'namedtuple'"),
    "unknown-custom-output-type": (lambda h: _output_node(h, {"t": "custom", "cls": "os.system(1)", "k": None}),
                                   "unknown custom output type 'os.system(1)'"),
    "custom-keys-mismatch": (lambda h: _output_node(h, {"t": "custom", "cls": "m.Out", "k": ["a", "b"]}),
                             "do not match its 1 children"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_plan_content_is_a_bundle_error_and_cli_exit_2(saved, tmp_path, capsys, case):
    d, header, body = saved
    edit, message = CASES[case]
    crafted = copy.deepcopy(header)
    edit(crafted)
    path = tmp_path / "crafted.trtrefit"
    path.write_bytes(_repack(crafted, body))
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        refitcore.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value), str(info.value)
    capsys.readouterr()
    code = cli.main(["gate", str(path), str(d / "good.pt"), "--inputs", "random:2", "-q", "--model", FACTORY])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and "Traceback" not in err
    assert cli.main(["audit", str(path), str(d / "m.trtrefit"), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err, err
