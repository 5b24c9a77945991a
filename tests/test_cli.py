"""The ``trtrefit`` CLI: compile, gate (exit 0 pass / 1 mismatch / 2 unusable input), audit, doctor.

One tiny model (tests/cli_models.py, 1x3x32x32) is compiled once per module; every other test
calls ``main(argv)`` in-process so the export machinery stays warm.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import refitcore
from refitcore.cli import main as cli
from tests.cli_models import other_net, randomized_state

FACTORY = "tests.cli_models:small_net"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    code = cli.main(["compile", FACTORY, "--input", "1x3x32x32", "--backend", "reference", "-q",
                     "-o", str(d / "m.trtrefit")])
    assert code == 0
    torch.save(randomized_state(1), d / "good.pt")
    return d


def gate(work: Path, checkpoint: str, *extra: str, bundle: str = "m.trtrefit") -> int:
    trust = [] if "--model" in extra else ["--trust-factory"]  # the bundle records tests.cli_models:small_net
    return cli.main(["gate", str(work / bundle), str(work / checkpoint), "--inputs", "random:2", *trust, *extra])


def test_help_teaches_with_examples():
    parser = cli.build_parser()
    text = parser.format_help()
    assert "examples:" in text and "trtrefit gate" in text and "exit codes" in text
    sub = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}
    gate_help = sub["command"].choices["gate"].format_help()
    assert "random:N[:SEED]" in gate_help and "weights_only=True" in gate_help and "recompile" in gate_help


@pytest.mark.parametrize("text, shape", [("1x3x224x224", (1, 3, 224, 224)), ("2,8", (2, 8)), ("16", (16,))])
def test_parse_shape(text, shape):
    assert cli.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1x0x3", "axb", "1x-3"])
def test_parse_shape_rejects(text):
    with pytest.raises(Exception, match="must look like"):
        cli.parse_shape(text)


def test_compile_records_the_factory(work):
    engine = refitcore.load(work / "m.trtrefit")
    assert engine.model_factory == FACTORY
    assert engine.io.input_shapes == ((1, 3, 32, 32),)


def test_good_checkpoint_passes_both_paths(work, capsys):
    code = gate(work, "good.pt", "--report", str(work / "r.json"), "--markdown", str(work / "s.md"))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    report = json.loads((work / "r.json").read_text())
    assert report["status"] == "pass" and report["exit_code"] == 0
    assert set(report["paths"]) == {"cached", "fallback"}
    assert all(p["ok"] and p["max_abs"] < 1e-4 for p in report["paths"].values())
    assert report["audit"]["ok"]
    md = (work / "s.md").read_text()
    assert "PASS" in md and "| path | max abs error | verdict | culprit weight |" in md
    assert "| cached |" in md and "| fallback |" in md
    # progress went to stderr, one line per long step
    assert "fallback: converting the graph again" in out.err and "refitting a copy" in out.err


def test_quiet_prints_no_progress(work, capsys):
    assert gate(work, "good.pt", "--paths", "cached", "-q") == 0
    out = capsys.readouterr()
    assert out.err == "" and "PASS" in out.out


def test_samples_file(work, capsys):
    torch.save(torch.randn(3, 1, 3, 32, 32), work / "samples.pt")
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", str(work / "samples.pt"),
                     "--paths", "cached", "-q", "--report", str(work / "s.json"), "--trust-factory"]) == 0
    assert json.loads((work / "s.json").read_text())["samples"].startswith("3 ")
    torch.save(torch.randn(1, 3, 16, 16), work / "small.pt")
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", str(work / "small.pt"),
                     "-q", "--trust-factory"]) == 2
    assert "the engine takes [1, 3, 32, 32]" in capsys.readouterr().out
    (work / "junk.pt").write_bytes(b"not a tensor file")
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", str(work / "junk.pt"),
                     "-q", "--trust-factory"]) == 2


def test_nan_weight_is_refused_naming_it(work, capsys):
    state = randomized_state(2)
    state["conv2.weight"][1, 0, 0, 0] = float("nan")
    torch.save(state, work / "nan.pt")
    code = gate(work, "nan.pt", "-q", "--report", str(work / "nan.json"))
    out = capsys.readouterr().out
    assert code == 1
    assert "'conv2.weight'" in out and "conv2/conv2d KERNEL" in out and "NaN" in out
    assert json.loads((work / "nan.json").read_text())["status"] == "fail"


def test_swapped_map_entries_fail_naming_the_weight(work, capsys):
    """A bundle whose weight map has two same-shape entries exchanged maps every checkpoint wrongly:
    the cached path disagrees with eager and the gate names the weight (found by auditing against
    the fallback)."""
    engine = refitcore.load(work / "m.trtrefit")
    a, b = "conv/conv2d BIAS", "conv2/conv2d BIAS"
    src = engine.weight_map.sources
    assert src[a].shape == src[b].shape
    src[a], src[b] = src[b], src[a]
    engine.save(work / "swapped.trtrefit")
    code = gate(work, "good.pt", "--paths", "cached", "-q", "--report", str(work / "sw.json"),
                "--markdown", str(work / "sw.md"), bundle="swapped.trtrefit")
    out = capsys.readouterr().out
    assert code == 1, out
    report = json.loads((work / "sw.json").read_text())
    assert report["status"] == "fail"
    assert not report["paths"]["cached"]["ok"]
    assert report["paths"]["cached"]["culprit"] in (a, b)
    assert report["paths"]["cached"]["culprit"] in out
    assert "FAIL" in (work / "sw.md").read_text()
    # both paths: the fallback is right, the audit names the swapped weights
    assert gate(work, "good.pt", "-q", "--report", str(work / "sw2.json"), bundle="swapped.trtrefit") == 1
    report = json.loads((work / "sw2.json").read_text())
    assert report["paths"]["fallback"]["ok"] and not report["paths"]["cached"]["ok"]
    assert {f["name"] for f in report["audit"]["failures"]} == {a, b}


def test_other_architecture_exits_2_saying_recompile(work, capsys):
    torch.save(randomized_state(3, other_net), work / "other.pt")
    code = gate(work, "other.pt", "-q")
    out = capsys.readouterr()
    assert code == 2
    assert "recompile needed" in out.out and "'conv.weight'" in out.out
    assert "recompile needed" in out.err


def test_changed_model_code_exits_2_naming_the_op(work, capsys):
    """--model with the same parameters but another forward: the fallback re-export differs from
    the compiled graph, so the gate says recompile and names the first differing op."""
    code = gate(work, "good.pt", "-q", "--paths", "fallback", "--model", "tests.cli_models:small_net_gelu")
    out = capsys.readouterr()
    assert code == 2, out.out
    assert "recompile needed" in out.out and "gelu" in out.out


def test_model_of_other_shapes_exits_2(work, capsys):
    assert gate(work, "good.pt", "-q", "--paths", "cached", "--model", "tests.cli_models:other_net") == 2
    assert "recompile needed" in capsys.readouterr().out


def test_checkpoint_with_extra_keys_exits_2(work, capsys):
    state = randomized_state(4)
    state["head.weight"] = torch.zeros(3, 3)
    torch.save(state, work / "extra.pt")
    assert gate(work, "extra.pt", "-q") == 2
    assert "head.weight" in capsys.readouterr().out


@pytest.mark.parametrize("keep", [10, 200, -40], ids=["prefix", "header", "weights"])
def test_truncated_bundle_exits_2_with_clear_message(work, capsys, keep):
    data = (work / "m.trtrefit").read_bytes()
    (work / "trunc.trtrefit").write_bytes(data[:keep])
    code = gate(work, "good.pt", "-q", bundle="trunc.trtrefit")
    err = capsys.readouterr().err
    assert code == 2
    assert "truncated" in err and "trunc.trtrefit" in err


def test_missing_files_exit_2(work, capsys):
    assert gate(work, "nope.pt", "-q") == 2
    assert "no such file" in capsys.readouterr().err
    assert gate(work, "good.pt", "-q", bundle="nope.trtrefit") == 2


def test_not_a_checkpoint_exits_2(work, capsys):
    (work / "bad.pt").write_bytes(b"\x00garbage")
    assert gate(work, "bad.pt", "-q") == 2
    assert "checkpoint" in capsys.readouterr().err


def test_audit_bundle_vs_checkpoint_and_bundle(work, capsys):
    bundle = str(work / "m.trtrefit")
    assert cli.main(["audit", bundle, bundle, "-q"]) == 0
    # the bundle holds the compile-time weights, not good.pt's: disagreement, worst weight first
    assert cli.main(["audit", bundle, str(work / "good.pt"), "-q", "--report", str(work / "a.json")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "KERNEL" in out
    assert not json.loads((work / "a.json").read_text())["ok"]
    # refit with good.pt, save: now the bundle holds exactly that checkpoint
    refitted = refitcore.refit(refitcore.load(bundle), str(work / "good.pt"), path="cached").engine
    refitted.save(work / "refitted.trtrefit")
    assert cli.main(["audit", str(work / "refitted.trtrefit"), str(work / "good.pt"), "-q"]) == 0
    assert cli.main(["audit", str(work / "good.pt"), str(work / "refitted.trtrefit"), "-q"]) == 0
    assert cli.main(["audit", bundle, str(work / "refitted.trtrefit"), "-q"]) == 1
    assert cli.main(["audit", str(work / "good.pt"), str(work / "good.pt"), "-q"]) == 2
    torch.save(randomized_state(3, other_net), work / "other2.pt")
    assert cli.main(["audit", bundle, str(work / "other2.pt"), "-q"]) == 2


def test_doctor_delegates(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("refitcore.cli.doctor")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "refitcore.cli.doctor", fake)
    monkeypatch.setattr(sys.modules["refitcore.cli"], "doctor", fake, raising=False)
    assert cli.main(["doctor", "--json"]) == 0
    assert seen == [["--json"]]


def test_doctor_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "refitcore.cli.doctor", None)
    monkeypatch.delattr(sys.modules["refitcore.cli"], "doctor", raising=False)
    assert cli.main(["doctor"]) == 2
    assert "no doctor module" in capsys.readouterr().err


def test_console_entry_point_runs(work):
    """The module runs as a program (what the `trtrefit` script calls) with the same exit codes."""
    (work / "trunc2.trtrefit").write_bytes((work / "m.trtrefit").read_bytes()[:100])
    proc = subprocess.run([sys.executable, "-m", "refitcore.cli.main", "gate", str(work / "trunc2.trtrefit"),
                           str(work / "good.pt"), "--inputs", "random:1", "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "truncated" in proc.stderr


def test_compile_with_checkpoint_holds_its_weights(work, capsys):
    out = work / "from_ckpt.trtrefit"
    assert cli.main(["compile", FACTORY, "--input", "1x3x32x32", "--backend", "reference", "-q",
                     "--checkpoint", str(work / "good.pt"), "-o", str(out)]) == 0
    assert cli.main(["audit", str(out), str(work / "good.pt"), "-q"]) == 0
    torch.save(randomized_state(3, other_net), work / "other3.pt")
    assert cli.main(["compile", FACTORY, "--input", "1x3x32x32", "--backend", "reference", "-q",
                     "--checkpoint", str(work / "other3.pt"), "-o", str(work / "x.trtrefit")]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_compile_with_stripped_weights_writes_a_bundle_the_gate_refits(work, capsys):
    out = work / "stripped.trtrefit"
    assert cli.main(["compile", FACTORY, "--input", "1x3x32x32", "--backend", "reference", "-q",
                     "--checkpoint", str(work / "good.pt"), "--strip-engine-weights", "-o", str(out)]) == 0
    assert "stripped: refit before running" in capsys.readouterr().out
    engine = refitcore.load(out)
    assert engine.weightless and engine.options.strip_engine_weights
    with pytest.raises(refitcore.WeightlessEngineError, match="strip_engine_weights=True"):
        engine(torch.randn(1, 3, 32, 32))
    assert gate(work, "good.pt", "-q", bundle="stripped.trtrefit") == 0


@pytest.mark.parametrize("spec", ["random:0", "random:x", "random:2:3:4"])
def test_bad_random_samples_spec_exits_2(work, capsys, spec):
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", spec, "-q",
                     "--trust-factory"]) == 2
    assert "random:N" in capsys.readouterr().err


# ----------------------------------------------------------------------------- usage errors: exit 2, one line,
# no traceback, found before the work starts


def _compile(*argv: str) -> int:
    return cli.main(["compile", FACTORY, "--backend", "reference", "-q", *argv])


def test_compile_output_into_a_missing_directory_or_onto_a_directory(work, capsys):
    assert _compile("--input", "1x3x32x32", "-o", str(work / "no-such-dir" / "m.trtrefit")) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _compile("--input", "1x3x32x32", "-o", str(work)) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and len(err.strip().splitlines()) == 1


def test_compile_input_shape_the_model_rejects(work, capsys):
    assert _compile("--input", "1x5x32x32", "-o", str(work / "bad-shape.trtrefit")) == 2
    err = capsys.readouterr().err
    assert "rejects input shape(s) 1x5x32x32" in err and len(err.strip().splitlines()) == 1
    assert not (work / "bad-shape.trtrefit").exists()


def test_compile_offers_only_the_dtypes_it_supports(capsys):
    sub = {a.dest: a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)}
    assert "{float32,float16,bfloat16}" in sub["command"].choices["compile"].format_help()
    with pytest.raises(SystemExit) as exc:
        _compile("--input", "1x3x32x32", "--dtype", "float64", "-o", "x.trtrefit")
    assert exc.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--report", "--markdown"])
def test_gate_report_into_a_missing_directory_fails_before_the_gate_runs(work, capsys, flag):
    assert cli.main(["gate", str(work / "m.trtrefit"), str(work / "good.pt"), "--inputs", "random:1",
                     "--trust-factory", flag, str(work / "missing" / "r.out")]) == 2
    out = capsys.readouterr()
    assert "no such directory" in out.err and "loading engine bundle" not in out.err and out.out == ""


@pytest.mark.parametrize("tolerance", ["0", "1e-3"])
def test_cli_tolerances_parse_like_the_plugin(tolerance):
    from pytest_trtrefit.config import parse_tolerance

    args = cli.build_parser().parse_args(["gate", "b", "c", "--inputs", "random:1", "--rtol", tolerance])
    assert args.rtol == parse_tolerance(tolerance)


@pytest.mark.parametrize("bad", ["-1", "inf", "nan", "x"])
def test_cli_rejects_the_tolerances_the_plugin_rejects(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["gate", "b", "c", "--inputs", "random:1", f"--atol={bad}"])
    assert exc.value.code == 2 and "--atol" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint, code", [("good.pt", 0), ("nan-pipe.pt", 1)])
def test_gate_into_a_closed_pipe_ends_quietly_with_its_own_exit_code(work, checkpoint, code):
    """`trtrefit gate ... | head`: the reader is gone before the report is printed."""
    state = randomized_state(2)
    state["fc.bias"][0] = float("nan")
    torch.save(state, work / "nan-pipe.pt")
    proc = subprocess.Popen([sys.executable, "-m", "refitcore.cli.main", "gate", str(work / "m.trtrefit"),
                             str(work / checkpoint), "--inputs", "random:1", "--paths", "cached", "-q",
                             "--trust-factory"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()                     # as `| head` does once it has what it wants
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == code, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
