"""``refitcore.capture.eager.eager_model``: one loader of the eager reference model, from a module, an exported
program or a factory; it keeps state_dict metadata, casts to the template's dtypes, never writes into
the caller's model, and gives one clear error."""
from __future__ import annotations

import pytest
import torch

import refitcore
from refitcore.capture.eager import EagerModelError, UntrustedFactoryError, eager_model
from tests.cli_models import randomized_state, small_net
from tests.test_refit_metadata import Versioned

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_module_is_copied_never_written():
    original = small_net()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    state = randomized_state(1)
    model = eager_model(state, model=original)
    assert model is not original and not model.training
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    reference = small_net()
    reference.load_state_dict(state)
    assert torch.equal(model(X), reference(X))


def test_an_exported_program_and_the_engine_program_keep_their_tensors():
    engine = refitcore.compile(small_net(), X, backend="reference")
    held = {k: v.clone() for k, v in engine.exported_program.state_dict.items()}
    state = randomized_state(2)
    for model in (eager_model(state, engine=engine), eager_model(state, model=engine.exported_program)):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, held[k]) for k, v in engine.exported_program.state_dict.items())


def test_dtypes_follow_the_template_and_metadata_is_kept():
    state = {k: v.double() if v.is_floating_point() else v for k, v in randomized_state(3).items()}
    model = eager_model(state, model=small_net)
    assert all(v.dtype == small_net().state_dict()[k].dtype for k, v in model.state_dict().items())
    versioned = Versioned().state_dict()        # _metadata carries the module's version
    assert eager_model(versioned, model=Versioned) is not None
    bare = dict(versioned)                      # no _metadata: the template's own is used
    assert eager_model(bare, model=Versioned) is not None


def test_one_clear_error_for_missing_or_misfit_weights():
    state = randomized_state(4)
    del state["fc.bias"]
    with pytest.raises(EagerModelError, match=r"lack \['fc.bias'\]"):
        eager_model(state, model=small_net)
    assert eager_model(state, model=small_net, keep_missing=True) is not None
    state = randomized_state(4)
    state["fc.weight"] = torch.zeros(2, 2)
    with pytest.raises(EagerModelError, match="cannot load"):
        eager_model(state, model=small_net)
    with pytest.raises(TypeError, match="returned int"):
        eager_model({}, model=lambda: 3)


def test_a_recorded_factory_needs_trust(tmp_path):
    engine = refitcore.compile(small_net(), X, backend="reference", model_factory="tests.cli_models:small_net")
    engine.save(tmp_path / "m.trtrefit")
    loaded = refitcore.load(tmp_path / "m.trtrefit")
    with pytest.raises(UntrustedFactoryError, match="trust_factory=True"):
        eager_model(randomized_state(5), engine=loaded)
    assert eager_model(randomized_state(5), engine=loaded, trust_factory=True) is not None
    loaded.model_factory = None
    with pytest.raises(EagerModelError, match="no exported program and records no model factory"):
        eager_model(randomized_state(5), engine=loaded)
