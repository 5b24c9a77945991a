"""Declarative model checks: a conftest lists models, pytest-trtrefit generates the property tests.

A ``conftest.py`` that defines ``pytest_trt_refit_models()`` is collected as a file of generated
tests, one per model and check kind::

    conftest.py::trt-refit::weights[tiny_cnn]        random weight sets, each refitted and compared
    conftest.py::trt-refit::perturbations[tiny_cnn]  a weight set, then a fine-tuning-like change
    conftest.py::trt-refit::sequences[tiny_cnn]      A -> B -> ... -> A on one engine
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import zlib
from typing import Any

import pytest

from refitcore.options import check_tolerance, parse_compiler, parse_precision

from .engines import COMPILE_OPTIONS
from .outputs import reproduce_command
from .stash import get_config, get_recorder, get_session

__all__ = ["DeclarationError", "ModelSpec", "parse_specs", "RefitModelsFile", "RefitPropertyItem", "CHECKS",
           "collect_conftest"]

CHECKS = ("weights", "perturbations", "sequences")
DEFAULT_INPUT_FAMILIES = ("normal", "uniform", "positive")
_OPTIONS = {"checks", "examples", "paths", "rtol", "atol", "scales", "specials", "max_specials", "input_families",
            "dynamic_shapes", "precision", "compiler", *COMPILE_OPTIONS}


class DeclarationError(Exception):
    """A conftest's ``pytest_trt_refit_models()`` returned something unusable (a collection error)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Any
    inputs: Any                     # one sample: a tuple of positional inputs or a refitcore.Inputs
    checks: tuple[str, ...] = CHECKS
    examples: int | None = None
    paths: tuple[str, ...] | None = None
    rtol: float | None = None
    atol: float | None = None
    strategy_options: dict = dataclasses.field(default_factory=dict)
    input_families: tuple[str, ...] = DEFAULT_INPUT_FAMILIES
    dynamic_shapes: Any = None      # input ranges, as refitcore.compile takes them (the example is opt)
    compile_options: dict = dataclasses.field(default_factory=dict)   # torch_executed_ops, min_block_size, strict
    precision: str | None = None    # fp32 | fp16 | bf16; None: --trt-refit-precision
    compiler: str | None = None     # refitcore | torch_tensorrt; None: --trt-refit-compiler


def _example(name: str, example: Any, where: str):
    """The example inputs as one sample: a tuple of positional inputs or a ``refitcore.Inputs``."""
    import torch
    import torch.utils._pytree as pytree

    from refitcore.capture.structured import Inputs

    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, Inputs):
        tree = (example.args, example.kwargs)
    elif isinstance(example, (tuple, list)):
        tree = example = tuple(example)
    else:
        tree = None
    leaves = pytree.tree_leaves(tree) if tree is not None else []
    if not any(isinstance(x, torch.Tensor) for x in leaves) or not all(
            isinstance(x, (torch.Tensor, bool, int, float, str, type(None))) for x in leaves):
        raise DeclarationError(f"{where}: model {name!r}: example inputs must be a tensor, a tuple of positional "
                                f"inputs or refitcore.Inputs(*args, **kwargs) (tensors, None and Python scalars, in "
                                f"tuples, lists and dicts), with at least one tensor; got {type(example).__name__}")
    return example


def _spec(name: str, value: Any, where: str) -> ModelSpec:
    if isinstance(value, dict):
        value = dict(value)
        try:
            factory, example = value.pop("factory"), value.pop("inputs")
        except KeyError as err:
            raise DeclarationError(f"{where}: model {name!r}: a dict spec needs the key {err.args[0]!r}") from None
        options = value
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3):
        factory, example = value[0], value[1]
        options = dict(value[2]) if len(value) == 3 else {}
    else:
        raise DeclarationError(f"{where}: model {name!r}: expected (factory, example_inputs[, options]) or a dict, "
                                f"got {type(value).__name__}")
    if not callable(factory):
        raise DeclarationError(f"{where}: model {name!r}: the factory {factory!r} is not callable")
    example = _example(name, example, where)
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise DeclarationError(f"{where}: model {name!r}: unknown option(s) {unknown}; valid: {sorted(_OPTIONS)}")
    checks = tuple(options.get("checks", CHECKS))
    if not checks:   # no test would be generated: the model would vanish from the run and its summary
        raise DeclarationError(f"{where}: model {name!r}: 'checks' is empty, so no test would run; list at least "
                                f"one of {CHECKS}, or leave the option out to run them all")
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        raise DeclarationError(f"{where}: model {name!r}: unknown check(s) {bad}; choose from {CHECKS}")
    paths = options.get("paths")
    if paths is not None and not paths:
        raise DeclarationError(f"{where}: model {name!r}: 'paths' is empty, so no refit path would be checked; give "
                                f"'cached', 'fallback' or 'both', or leave the option out for --trt-refit-paths")
    if isinstance(paths, str):
        paths = ("cached", "fallback") if paths == "both" else (paths,)
    tolerances = {}
    for key in ("rtol", "atol"):
        try:
            tolerances[key] = None if options.get(key) is None else check_tolerance(options[key], key)
        except ValueError as err:
            raise DeclarationError(f"{where}: model {name!r}: {err}") from None
    try:
        precision = None if options.get("precision") is None else parse_precision(options["precision"])
    except argparse.ArgumentTypeError as err:
        raise DeclarationError(f"{where}: model {name!r}: precision: {err}") from None
    try:
        compiler = None if options.get("compiler") is None else parse_compiler(options["compiler"])
    except argparse.ArgumentTypeError as err:
        raise DeclarationError(f"{where}: model {name!r}: compiler: {err}") from None
    if compiler == "torch_tensorrt" and paths and "cached" in paths:
        raise DeclarationError(f"{where}: model {name!r}: compiler 'torch_tensorrt' has no cached refit path "
                               f"(Torch-TensorRT's weight-name map was removed in 2.13); give paths='fallback' or "
                               f"leave 'paths' out")
    strat = {k: options[k] for k in ("scales", "specials", "max_specials") if k in options}
    return ModelSpec(name, factory, example, checks, options.get("examples"), tuple(paths) if paths else None,
                     tolerances["rtol"], tolerances["atol"], strat,
                     tuple(options.get("input_families", DEFAULT_INPUT_FAMILIES)), options.get("dynamic_shapes"),
                     {k: options[k] for k in COMPILE_OPTIONS if k in options}, precision, compiler)


def parse_specs(declared: Any, where: str) -> list[ModelSpec]:
    if not isinstance(declared, dict):
        raise DeclarationError(f"{where}: pytest_trt_refit_models() must return a dict name -> spec, "
                                f"got {type(declared).__name__}")
    return [_spec(str(name), value, where) for name, value in declared.items()]


def collect_conftest(file_path, parent):
    """The collector for a conftest.py that declares models, else None."""
    module = None
    target = os.path.realpath(str(file_path))
    for plugin in parent.config.pluginmanager.get_plugins():
        where = getattr(plugin, "__file__", None)
        if where and os.path.basename(where) == "conftest.py" and os.path.realpath(where) == target:
            module = plugin
            break
    if module is None or not callable(getattr(module, "pytest_trt_refit_models", None)):
        return None
    return RefitModelsFile.from_parent(parent, path=file_path, module=module)


class RefitModelsFile(pytest.File):
    """The generated tests of one conftest's ``pytest_trt_refit_models()``."""

    def __init__(self, *, module, **kwargs):
        super().__init__(**kwargs)
        self.module = module

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, DeclarationError):
            return f"pytest_trt_refit_models(): {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def collect(self):
        # Collected (not only created: pytest creates collectors for every file of the rootdir on its
        # way to a path argument, then drops those that do not match): see collection.py.
        get_recorder(self.config).collection.setdefault("files", []).append(os.path.realpath(str(self.path)))
        specs = parse_specs(self.module.pytest_trt_refit_models(), str(self.path))
        for spec in specs:
            for check in spec.checks:
                item = RefitPropertyItem.from_parent(self, name=f"trt-refit::{check}[{spec.name}]", spec=spec,
                                                     check=check)
                item.add_marker(pytest.mark.trt_refit)
                yield item


class RefitPropertyItem(pytest.Item):
    """One generated property test: a model and a check kind, run through Hypothesis."""

    def __init__(self, *, spec: ModelSpec, check: str, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        self.check = check

    def runtest(self) -> None:
        from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

        from refitcore.capture.structured import Inputs

        from .strategies import boundary_samples, inputs, perturbations, refit_sequences, refit_settings, state_dicts

        session = get_session(self.config)
        if not session.config.enabled:
            pytest.skip("needs --trt-refit")
        spec = self.spec
        cfg = session.config
        options = dict(paths=spec.paths, rtol=spec.rtol, atol=spec.atol, name=spec.name,
                       dynamic_shapes=spec.dynamic_shapes, compile_options=spec.compile_options,
                       precision=spec.precision, compiler=spec.compiler)
        # Dtype-limit specials (dtype_max, ...) aim at the limits of the dtype the engine is compiled in.
        strategy = dict(spec.strategy_options, precision=spec.precision or cfg.precision)
        example = spec.inputs
        profiles = None
        if spec.dynamic_shapes is not None:
            # Compiled once, before Hypothesis runs: its recorded ranges are what inputs are drawn in.
            profiles = session.engine_for(spec.factory, example, name=spec.name, dynamic_shapes=spec.dynamic_shapes,
                                          compile_options=spec.compile_options, precision=spec.precision,
                                          compiler=spec.compiler).io.profiles
        drawn_inputs = (inputs(example if isinstance(example, Inputs) else list(example), families=spec.input_families,
                               profiles=profiles)
                        if spec.input_families else st.just(None))
        # Every example checks the range's ends (min, max) next to the example input (opt).
        fixed = [example] + ([tuple(b) for b in boundary_samples(list(example), profiles)] if profiles else [])

        def samples(extra) -> list:
            return fixed + ([extra if isinstance(extra, Inputs) else tuple(extra)] if extra is not None else [])

        def named(fn):   # the name Hypothesis prints in "Failing test case: ..." (an identifier, as it requires)
            fn.__name__ = fn.__qualname__ = re.sub(r"\W", "_", f"{self.check}_{spec.name}")
            return fn

        if self.check == "weights":
            @given(weights=state_dicts(spec.factory, **strategy), sample=drawn_inputs)
            @named
            def prop(weights, sample):
                session.check(spec.factory, weights, samples(sample), **options)
        elif self.check == "perturbations":
            @given(data=st.data(), sample=drawn_inputs)
            @named
            def prop(data, sample):
                base = data.draw(state_dicts(spec.factory, **strategy), label="base")
                new = data.draw(perturbations(base), label="perturbed")
                session.check_sequence(spec.factory, [base, new], samples(sample), **options)
        else:
            @given(sequence=refit_sequences(spec.factory, **strategy), sample=drawn_inputs)
            @named
            def prop(sequence, sample):
                session.check_sequence(spec.factory, sequence, samples(sample), **options)

        item_seed = cfg.seed ^ zlib.crc32(self.nodeid.encode())
        self.user_properties.append(("trt_refit_seed", cfg.seed))
        # No database (one seed reproduces a run) and no "explain" phase (the report says what failed).
        phases = [p for p in settings.default.phases if p != Phase.explain]
        run = seed(item_seed)(refit_settings(max_examples=spec.examples or cfg.examples, database=None,
                                             phases=phases, suppress_health_check=list(HealthCheck))(prop))
        run()

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, AssertionError):
            err = excinfo.value
            notes = getattr(err, "__notes__", [])
            return "\n".join([str(err), *notes, self._reproduce()])
        rep = super().repr_failure(excinfo, style=style or "short")
        if hasattr(rep, "addsection"):
            rep.addsection("trt-refit", self._reproduce())
        return rep

    def _reproduce(self) -> str:
        return "reproduce with: " + reproduce_command(get_config(self.config), self.nodeid)

    def reportinfo(self):
        return self.path, 0, f"trt-refit {self.check}[{self.spec.name}]"

