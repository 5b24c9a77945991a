"""Both backends implement the backend interface (refitcore/backends/base.py): the module, the
engine and the refitter. The TensorRT classes are checked without a GPU: on the class, and on a
refitter adapter over a fake ``trt.Refitter``."""
from __future__ import annotations

import inspect

import pytest

from refitcore.backends import base, get_backend
from refitcore.backends.reference import ReferenceEngine, ReferenceRefitter
from refitcore.backends.tensorrt import TensorRTEngine
from refitcore.backends.tensorrt_refit import TensorRTRefitter
from tests.backends.fake_trt import LAYERS, W0, FakeImpl


def members(protocol) -> list[str]:
    """The attributes and methods a Protocol declares (typing.get_protocol_members, Python 3.13)."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) or isinstance(v, (classmethod, property))}
    return sorted(n for n in names if not n.startswith("_"))


def _signature_matches(cls, protocol, name):
    want = [p for p in inspect.signature(getattr(protocol, name)).parameters if p != "self"]
    got = [p for p in inspect.signature(getattr(cls, name)).parameters if p != "self"]
    return got[:len(want)] == want or any(p.kind == inspect.Parameter.VAR_KEYWORD
                                          for p in inspect.signature(getattr(cls, name)).parameters.values())


def test_protocols_declare_the_contract():
    assert members(base.EngineImpl) == sorted([
        "backend_name", "note", "weight_names", "prototype", "current_weights", "rollback_weights", "run",
        "create_refitter", "serialize", "deserialize"])
    assert members(base.Refitter) == sorted([
        "errors", "get_all_weights", "get_weights_prototype", "set_named_weights", "get_missing_weights", "refit"])
    assert members(base.Backend) == sorted(["NAME", "NOTE", "usable", "build", "load_engine"])


@pytest.mark.parametrize("name", ["reference", "tensorrt"])
def test_backend_modules_are_backends(name):
    module = get_backend(name)
    assert isinstance(module, base.Backend)
    assert name == module.NAME and module.NOTE


def test_reference_engine_and_refitter_satisfy_the_protocols(compiled):
    impl = compiled("residual").engine.impl
    assert isinstance(impl, ReferenceEngine) and isinstance(impl, base.EngineImpl)
    refitter = impl.create_refitter()
    assert isinstance(refitter, ReferenceRefitter) and isinstance(refitter, base.Refitter)
    for name in members(base.EngineImpl):
        if callable(getattr(base.EngineImpl, name, None)):
            assert _signature_matches(ReferenceEngine, base.EngineImpl, name), name


@pytest.mark.parametrize("cls,protocol", [(ReferenceEngine, base.EngineImpl), (TensorRTEngine, base.EngineImpl),
                                          (ReferenceRefitter, base.Refitter), (TensorRTRefitter, base.Refitter)],
                         ids=["reference-engine", "tensorrt-engine", "reference-refitter", "tensorrt-refitter"])
def test_classes_define_every_method_with_the_protocols_signature(cls, protocol):
    for name in members(protocol):
        if name == "errors":     # an instance attribute, set in __init__ (checked on instances)
            continue
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        if callable(getattr(protocol, name, None)):
            assert _signature_matches(cls, protocol, name), f"{cls.__name__}.{name}"


def test_tensorrt_refitter_instance_satisfies_the_protocol():
    refitter = FakeImpl(W0, LAYERS).create_refitter()
    assert isinstance(refitter, TensorRTRefitter) and isinstance(refitter, base.Refitter)


def test_the_check_can_fail():
    class NoRollback:
        backend_name, note = "x", ""

        def weight_names(self): ...
        def prototype(self, name): ...
        def current_weights(self): ...
        def run(self, inputs): ...
        def create_refitter(self, *, adopt=False): ...
        def serialize(self, *, weights=True): ...

        @classmethod
        def deserialize(cls, header, arrays): ...

    assert not isinstance(NoRollback(), base.EngineImpl)
    assert not hasattr(NoRollback, "rollback_weights")
    assert not isinstance(object(), base.Refitter)
