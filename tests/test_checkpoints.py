"""Checkpoints as found in the wild (refitcore.refitting.checkpoints): wrapper prefixes, containers, keys the
engine never reads, damaged files, NaN folds named by their key, meta tensors, safetensors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import refitcore
from refitcore.cli import main as cli
from refitcore.refitting.checkpoints import LoadedCheckpoint, load_checkpoint, load_weights, unwrap
from tests.cli_models import randomized_state

MODEL = "conv_bias_bn"      # conv(bias) -> BatchNorm(eps=1e-3): keys conv.*, bn.* (num_batches_tracked unused)
FACTORY = "tests.cli_models:small_net"
ROOT = Path(__file__).resolve().parents[1]


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


# ----------------------------------------------------------------------------- wrapper prefixes

@pytest.mark.parametrize("prefix, origin", [("module.", "DataParallel"), ("_orig_mod.", "torch.compile"),
                                            ("module._orig_mod.", "then torch.compile")])
@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_wrapper_prefix_is_stripped_with_a_note(compiled, prefix, origin, path):
    c = compiled(MODEL)
    new = c.fresh(3)
    result = refitcore.refit(c.engine, prefixed(new.state_dict(), prefix), path=path, verify_inputs=[c.x])
    assert result.ok, str(result)
    note = next(m for m in result.messages if "stripped the prefix" in m)
    assert repr(prefix) in note and origin in note, note
    assert repr(prefix) in str(result)
    expected = refitcore.refit(c.engine, new.state_dict(), path=path)
    assert torch.equal(result.engine(c.x), expected.engine(c.x))


def test_prefix_from_a_file_and_through_cached_mapping(compiled, tmp_path):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    torch.save(prefixed(state, "module."), tmp_path / "ddp.pt")
    loaded = load_checkpoint(tmp_path / "ddp.pt", weight_map=c.engine.weight_map, state_keys=c.engine.state_keys)
    assert isinstance(loaded, LoadedCheckpoint) and set(loaded.state_dict) == set(state)
    assert "'module.'" in str(loaded) and loaded.path == str(tmp_path / "ddp.pt")
    a = refitcore.cached_mapping(c.engine.weight_map, prefixed(state, "_orig_mod."))
    b = refitcore.cached_mapping(c.engine.weight_map, state)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_prefix_that_does_not_fit_even_stripped_is_explained(compiled):
    c = compiled(MODEL)
    other = {k.replace("conv.", "stem."): v for k, v in c.fresh(3).state_dict().items()}
    with pytest.raises(refitcore.ArchitectureMismatchError) as info:
        refitcore.refit(c.engine, prefixed(other, "module."))
    text = str(info.value)
    assert "every key starts with 'module.'" in text and "DataParallel" in text
    assert "even without it, 2 of 6" in text and "'conv.weight'" in text and "another model" in text


def test_a_partial_prefix_is_not_stripped(compiled):
    """Only a prefix that every key carries is stripped."""
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state = {("module." + k if k.startswith("conv") else k): v for k, v in state.items()}
    with pytest.raises(refitcore.ArchitectureMismatchError, match="no key 'conv.weight'"):
        refitcore.refit(c.engine, state)


# ----------------------------------------------------------------------------- containers

def test_model_container_with_epoch_and_optimizer(compiled, tmp_path):
    c = compiled(MODEL)
    new = c.fresh(4)
    opt = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    new(c.x).sum().backward()
    opt.step()
    new.eval()
    torch.save({"model": new.state_dict(), "epoch": 7, "optimizer": opt.state_dict(), "arch": "convnet"},
               tmp_path / "last.pt")
    result = refitcore.refit(c.engine, tmp_path / "last.pt", verify_inputs=[c.x], reference_model=new)
    assert result.ok, str(result)
    text = "\n".join(result.messages)
    assert "used the state_dict under ['model']" in text
    assert "ignored 3 other entries" in text and "'epoch' (7)" in text and "'optimizer'" in text


def test_several_containers_pick_the_one_that_fits(compiled):
    c = compiled(MODEL)
    good = c.fresh(5).state_dict()
    other = {k.replace("bn.", "norm."): v for k, v in c.fresh(6).state_dict().items()}
    loaded = load_weights({"model": other, "model_ema": good}, weight_map=c.engine.weight_map)
    assert all(torch.equal(loaded.state_dict[k], good[k]) for k in good)
    note = loaded.notes[0]
    assert "used ['model_ema'], which fits the compiled model" in note and "['model'] do(es) not fit" in note


def test_several_prefixed_containers_pick_the_one_that_fits_once_stripped(compiled):
    c = compiled(MODEL)
    good = c.fresh(5).state_dict()
    other = {k.replace("bn.", "norm."): v for k, v in c.fresh(6).state_dict().items()}
    loaded = load_weights({"state_dict": prefixed(other, "module."), "model_ema": prefixed(good, "module.")},
                          weight_map=c.engine.weight_map)
    assert all(torch.equal(loaded.state_dict[k], good[k]) for k in good)
    assert "used ['model_ema'], which fits" in loaded.notes[0] and "'module.'" in loaded.notes[-1]


def test_several_fitting_containers_prefer_the_trained_weights_and_say_so(compiled):
    c = compiled(MODEL)
    trained, ema = c.fresh(5).state_dict(), c.fresh(6).state_dict()
    loaded = load_weights({"state_dict_ema": ema, "state_dict": trained}, weight_map=c.engine.weight_map)
    assert all(torch.equal(loaded.state_dict[k], trained[k]) for k in trained)
    assert "used ['state_dict']" in loaded.notes[0] and "['state_dict_ema'] fit(s) too" in loaded.notes[0]
    explicit = load_weights({"state_dict_ema": ema, "state_dict": trained}, weight_map=c.engine.weight_map,
                            key="state_dict_ema")
    assert all(torch.equal(explicit.state_dict[k], ema[k]) for k in ema)


def test_nested_lightning_style_container_with_a_prefix(compiled, tmp_path):
    """Lightning saves {'state_dict': {'model.<key>': ...}, 'epoch': ..., 'optimizer_states': [...]}."""
    c = compiled(MODEL)
    new = c.fresh(7)
    torch.save({"state_dict": prefixed(new.state_dict(), "model."), "epoch": 1, "optimizer_states": [{}]},
               tmp_path / "epoch=1.ckpt")
    result = refitcore.refit(c.engine, tmp_path / "epoch=1.ckpt", verify_inputs=[c.x], reference_model=new)
    assert result.ok, str(result)
    assert any("['state_dict']" in m for m in result.messages)
    assert any("stripped the prefix 'model.'" in m for m in result.messages)


def test_timm_style_checkpoint_with_argparse_args(compiled, tmp_path):
    """timm saves {'arch', 'epoch', 'state_dict', 'state_dict_ema', 'optimizer', 'args': Namespace}."""
    import argparse

    c = compiled(MODEL)
    new, ema = c.fresh(3), c.fresh(4)
    torch.save({"arch": "convnet", "epoch": 9, "state_dict": new.state_dict(), "state_dict_ema": ema.state_dict(),
                "args": argparse.Namespace(lr=0.1, model="convnet")}, tmp_path / "model_best.pth.tar")
    result = refitcore.refit(c.engine, tmp_path / "model_best.pth.tar", verify_inputs=[c.x], reference_model=new)
    assert result.ok, str(result)
    assert "used ['state_dict'], which fits" in result.messages[0] and "'args' (Namespace)" in result.messages[1]


class NotWeights:
    pass


def test_an_arbitrary_class_is_named_and_refused(compiled, tmp_path):
    torch.save({"state_dict": compiled(MODEL).fresh(3).state_dict(), "hook": NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(refitcore.WeightMappingError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    text = str(info.value)
    assert "NotWeights object, and checkpoints are read weights-only" in text
    assert "torch.save(model.state_dict(), path)" in text


@pytest.mark.parametrize("obj, message", [
    ({"epoch": 3, "lr": 0.1}, "found 'epoch' (3), 'lr' (0.1)"),
    ([torch.zeros(2)], "got list"),
    ({"w": torch.zeros(2), "v": __import__("numpy").zeros(2)}, "'v': expected a torch.Tensor, got ndarray"),
], ids=["no_tensors", "a_list", "numpy_beside_tensors"])
def test_unusable_containers_say_what_was_found(obj, message):
    with pytest.raises(refitcore.WeightMappingError) as info:
        unwrap(obj)
    assert message in str(info.value)


def test_tensors_beside_entries_are_the_state_dict_unless_a_container_fits(compiled):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    flat = dict(state, epoch=4, meta={"w": torch.zeros(1)})
    loaded = load_weights(flat, weight_map=c.engine.weight_map)
    assert loaded.state_dict.keys() == state.keys()
    assert loaded.notes[-1] == "ignored 2 other entries beside the weights: 'epoch' (4), 'meta' (a dict of 1)"
    # without a model to fit, the larger candidate wins over an unknown nested one
    assert unwrap(flat)[0].keys() == state.keys()
    # a known container wins over a stray tensor at the top level
    wrapped = {"model": state, "step": torch.tensor(100)}
    assert unwrap(wrapped)[0] is state
    assert load_weights(wrapped, weight_map=c.engine.weight_map).state_dict.keys() == state.keys()


def test_unwrap_without_a_model_takes_the_preferred_key():
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    state, notes = unwrap({"ema": b, "net": a, "step": 3})
    assert state is a
    assert notes == ["used the state_dict under ['net'] of the checkpoint (also there: ['ema'])",
                     "ignored 2 other entries of the checkpoint: 'ema' (a dict of 1), 'step' (3)"]


# ----------------------------------------------------------------------------- keys the engine never reads

def test_missing_num_batches_tracked_is_ignored_and_verification_works(compiled):
    c = compiled(MODEL)
    assert c.engine.weight_map.unused_keys == ["bn.num_batches_tracked"]
    state = {k: v for k, v in c.fresh(3).state_dict().items() if k != "bn.num_batches_tracked"}
    for path in ("cached", "fallback"):
        result = refitcore.refit(c.engine, state, path=path, verify_inputs=[c.x])
        assert result.ok, str(result)
        assert any("never reads" in m and "bn.num_batches_tracked" in m for m in result.messages), result.messages


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt_cli")
    assert cli.main(["compile", FACTORY, "--input", "1x3x32x32", "--backend", "reference", "-q",
                     "-o", str(d / "m.trtrefit")]) == 0
    return d


def gate(work: Path, state_or_obj, name: str, capsys) -> tuple[int, dict, str]:
    torch.save(state_or_obj, work / name)
    code = cli.main(["gate", str(work / "m.trtrefit"), str(work / name), "--inputs", "random:2", "-q",
                     "--model", FACTORY, "--report", str(work / (name + ".json")),
                     "--markdown", str(work / (name + ".md"))])
    out = capsys.readouterr().out
    return code, json.loads((work / (name + ".json")).read_text()), out


def test_gate_ignores_missing_num_batches_tracked(work, capsys):
    state = {k: v for k, v in randomized_state(2).items() if not k.endswith("num_batches_tracked")}
    code, report, out = gate(work, state, "no_nbt.pt", capsys)
    assert code == 0, out
    assert report["status"] == "pass" and any("never reads" in n for n in report["notes"])
    assert "note: the weights lack 2 key(s) the engine never reads" in out


def test_gate_unwraps_a_ddp_training_checkpoint(work, capsys):
    state = prefixed(randomized_state(2), "module.")
    code, report, out = gate(work, {"model": state, "epoch": 3, "best_acc": 0.5}, "ddp.pt", capsys)
    assert code == 0, out
    notes = "\n".join(report["notes"])
    assert "['model']" in notes and "stripped the prefix 'module.'" in notes and "'epoch' (3)" in notes
    assert "note: stripped the prefix 'module.'" in (work / "ddp.pt.md").read_text()


def test_gate_ignores_an_extra_num_batches_tracked(work, capsys):
    state = randomized_state(2)
    state["bn3.num_batches_tracked"] = torch.tensor(5)
    code, report, out = gate(work, state, "extra_nbt.pt", capsys)
    assert code == 0, out
    assert any("'bn3.num_batches_tracked'" in n for n in report["notes"])


def test_gate_still_refuses_a_real_extra_key(work, capsys):
    state = randomized_state(2)
    state["head.weight"] = torch.zeros(3)
    code, report, out = gate(work, state, "extra_key.pt", capsys)
    assert code == 2 and "another architecture" in out and "head.weight" in out


# ----------------------------------------------------------------------------- damaged files

def test_truncated_checkpoint_says_truncated(compiled, tmp_path):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state["padding"] = torch.randn(256, 256)     # big enough that a cut lands inside tensor data
    torch.save(state, tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:60000])
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.refit(c.engine, tmp_path / "cut.pt")
    text = str(info.value)
    assert "cut short: 60000 bytes" in text and "truncated" in text and "Download or copy it again" in text
    assert "The reader said:" in text


def test_empty_and_foreign_files_say_what_they_are(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_bytes(b"hello, this is text")
    with pytest.raises(refitcore.WeightMappingError, match="is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(refitcore.WeightMappingError, match="neither a torch.save archive nor a safetensors"):
        load_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(refitcore.WeightMappingError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_damaged_safetensors_file(compiled, tmp_path):
    from safetensors.torch import save_file

    save_file(compiled(MODEL).fresh(3).state_dict(), tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(refitcore.WeightMappingError) as info:
        load_checkpoint(tmp_path / "cut.safetensors")
    text = str(info.value)
    assert f"safetensors file that is damaged or truncated ({len(raw) // 2} bytes, where its header says the " \
           f"tensors need {len(raw)}: the file is truncated)" in text


# ----------------------------------------------------------------------------- values named by their key

@pytest.mark.parametrize("path", ["cached", "fallback"])
def test_negative_running_var_names_the_key(compiled, path):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state["bn.running_var"][2] = -5.0
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.refit(c.engine, state, path=path)
    text = str(info.value)
    assert "'bn.running_var': running variance -5.0 at [2]" in text and "eps=0.001" in text
    assert "np." not in text and "conv/conv2d KERNEL" in text


def test_running_var_at_minus_eps_is_refused_and_just_above_is_not(compiled):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state["bn.running_var"][0] = -1e-3
    with pytest.raises(refitcore.WeightMappingError, match="'bn.running_var'"):
        refitcore.cached_mapping(c.engine.weight_map, state)
    state["bn.running_var"][0] = 0.0
    assert all(torch.isfinite(torch.from_numpy(v)).all()
               for v in refitcore.cached_mapping(c.engine.weight_map, state).values())


def test_nan_in_a_key_names_the_key_with_plain_numbers(compiled):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state["conv.weight"][1, 2, 0, 1] = float("inf")
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.refit(c.engine, state)
    text = str(info.value)
    assert "'conv.weight': 1 non-finite value(s) of 216 (first at [1, 2, 0, 1]: inf)" in text
    assert "np." not in text


def test_a_fold_that_overflows_names_its_keys(compiled):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state["bn.weight"][1] = 3e38              # finite, but gamma / sqrt(var + eps) overflows float32
    state["bn.running_var"][1] = 1e-3
    with pytest.raises(refitcore.WeightMappingError) as info:
        refitcore.cached_mapping(c.engine.weight_map, state)
    text = str(info.value)
    assert "engine weight 'conv/conv2d KERNEL' = bn_fold_kernel" in text and "'bn.weight' in [" in text
    assert "first at [1, " in text and "np." not in text


# ----------------------------------------------------------------------------- meta tensors

def test_meta_tensors_are_refused_naming_the_keys(compiled):
    c = compiled(MODEL)
    state = c.fresh(3).state_dict()
    state["conv.weight"] = torch.empty(state["conv.weight"].shape, device="meta")
    for path in ("cached", "fallback"):
        with pytest.raises(refitcore.WeightMappingError) as info:
            refitcore.refit(c.engine, state, path=path)
        assert "['conv.weight']" in str(info.value)
        assert "meta tensors carry no data; load real weights" in str(info.value)
    with torch.device("meta"):
        meta_model = type(c.model)()
    with pytest.raises(refitcore.WeightMappingError, match="meta tensors carry no data"):
        refitcore.refit(c.engine, meta_model)


# ----------------------------------------------------------------------------- safetensors

def test_safetensors_are_read_with_the_safetensors_library(compiled, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    c = compiled(MODEL)
    new = c.fresh(3)
    save_file({k: v.contiguous() for k, v in prefixed(new.state_dict(), "module.").items()},
              tmp_path / "model.safetensors")

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not read a safetensors file")

    monkeypatch.setattr(torch, "load", no_torch_load)
    result = refitcore.refit(c.engine, tmp_path / "model.safetensors", verify_inputs=[c.x])
    assert result.ok, str(result)
    assert any("'module.'" in m for m in result.messages)
    # by content too, whatever the file is called
    os.replace(tmp_path / "model.safetensors", tmp_path / "model.bin")
    assert set(load_checkpoint(tmp_path / "model.bin").state_dict) == {"module." + k for k in new.state_dict()}


def test_safetensors_is_a_dependency():
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert '"safetensors' in deps
