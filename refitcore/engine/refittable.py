"""RefittableEngine: an engine plus everything needed to refit and check it; saving and loading it.

An engine is saved as a :mod:`refitcore.engine.bundle` file: :meth:`RefittableEngine.to_parts` gives the
header and arrays (the engine's kind serializes its impl, :mod:`refitcore.engine.kinds`),
:meth:`RefittableEngine.from_parts` validates them and builds the engine back through the kind
the impl header names (:mod:`refitcore.engine.registry`). The header also keeps the compile
options as data (``options``; a file written before them reads as the defaults with its recorded
``model_factory``). :func:`load` is ``refitcore.load``.

A *weightless* engine (``to_parts(weights=False)``, what the engine cache stores) keeps no
refittable weight's value: every weight is derived from the model through the weight map anyway,
so a cache hit reads a few hundred kB instead of the model's size. Loaded back it holds
placeholders and refuses to run (:class:`refitcore.errors.WeightlessEngineError`) until a refit
has set every weight (:func:`refitcore.refitting.driver.apply_mapping` always sets all of them).
``compile(strip_engine_weights=True)`` returns such an engine straight away (:meth:`RefittableEngine.strip_weights`:
TensorRT's weight-stripped plan), built from the model's weights without keeping a copy of them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore.backends.base import EngineImpl
from refitcore.capture.shapes import ShapeProfiles
from refitcore.capture.structured import leaf_names, spec_of, unflatten, unresolved_types
from refitcore.conversion.weight_map import WeightMap
from refitcore.dtypes import NUMPY_NAMES, TORCH_NAMES, numpy_dtype, trt_name
from refitcore.engine import bundle
from refitcore.engine.coverage import Coverage
from refitcore.engine.kinds import CompilerRefit, EngineKind
from refitcore.engine.options import CompileOptions
from refitcore.engine.program_record import check_program, record_program
from refitcore.engine.records import CallSpec, EngineRecord, IOSpec
from refitcore.engine.registry import kind_of_header
from refitcore.errors import BundleContentError, BundleError, ShapeRangeError, WeightlessEngineError
from refitcore.partition.partitioner import PartitionPlan

__all__ = ["RefittableEngine", "IOSpec", "load", "MAX_INPUT_ELEMENTS"]

FORMAT = "refitcore.engine"
MAX_INPUT_ELEMENTS = bundle.MAX_TENSOR_ELEMENTS   # per input or output tensor of a loaded engine


def _from_record(field: str, doc: str) -> Any:
    """A read-only attribute of the engine that is its :class:`EngineRecord`'s ``field``."""
    return property(lambda self: getattr(self.record, field), doc=doc)


class RefittableEngine:
    """A compiled model that can be refitted: callable like the model.

    Made of: ``kind`` (an :class:`refitcore.engine.kinds.EngineKind`: whole network, segments, or
    compiled submodules), ``impl`` (the backend's engine, a :class:`refitcore.backends.base.EngineImpl`),
    ``weight_map``, ``io`` (:class:`refitcore.engine.records.IOSpec`), ``record`` (an
    :class:`refitcore.engine.records.EngineRecord`: fingerprint, compile options, state_dict keys,
    partition, cache outcome), ``calls`` (a :class:`refitcore.engine.records.CallSpec`: the
    pytree structure it is called with), ``exported_program`` (None after :func:`refitcore.load`)
    and ``weightless`` (True while a weightless engine has not been refitted yet: it refuses to run).

    Attributes read from those: ``backend`` ('reference' or 'tensorrt'), ``weight_names`` (the
    engine's refittable weights), ``fingerprint`` (of the exported graph), ``options`` (the
    :class:`refitcore.engine.options.CompileOptions`), ``model_factory``, ``state_keys``,
    ``structure``, ``partition``, ``eager_modules``, ``backend_reason``, ``cache_hit`` (True,
    False, or None without a cache) and ``cache_key``.
    """

    def __init__(self, kind: EngineKind, impl: EngineImpl, weight_map: WeightMap, io: IOSpec, record: EngineRecord,
                 *, calls: CallSpec | None = None, exported_program=None, weightless: bool = False):
        self.kind = kind
        self._impl = impl
        self.weight_map = weight_map
        self.io = io
        self.record = record
        self.calls = calls or CallSpec()
        self.exported_program = exported_program
        self.weightless = weightless
        self._said_plain = False

    # ---- what the record and the call spec say ---------------------------------------------
    fingerprint = _from_record("fingerprint", "The exported graph's digest (str).")
    graph_entries = _from_record("graph_entries", "The exported graph's entries (list), None for a loaded engine.")
    options = _from_record("options", "The :class:`refitcore.engine.options.CompileOptions` it was compiled with.")
    state_keys = _from_record("state_keys", "The model's full state_dict key list at compile time.")
    backend_reason = _from_record("backend_reason", "Why this backend (str).")
    partition = _from_record("partition", "The :class:`refitcore.partition.partitioner.PartitionPlan` of a "
                                          "partitioned engine, else None.")
    eager_modules = _from_record("eager_modules", "[(module path, why it runs eagerly)] of compiled submodules "
                                                  "in an eager model.")
    cache_hit = _from_record("cache_hit", "True (loaded from the cache and refitted), False (compiled and "
                                          "stored), None (no cache).")
    cache_key = _from_record("cache_key", "The engine cache key's digest, None without a cache.")

    @property
    def model_factory(self) -> str | None:
        """The recorded model factory ('module:callable'), imported only when a caller trusts it."""
        return self.record.options.model_factory

    @model_factory.setter
    def model_factory(self, factory: str | None) -> None:
        options = dataclasses.replace(self.record.options, model_factory=factory)
        self.record = dataclasses.replace(self.record, options=options)

    def record_cache(self, hit: bool, key: str) -> None:
        """Say what the engine cache did: ``hit`` (loaded and refitted) or not (compiled and stored), under ``key``."""
        self.record = dataclasses.replace(self.record, cache_hit=hit, cache_key=key)

    @property
    def structure(self) -> dict | None:
        """``{"in": spec, "in_leaves": [leaf], "out": spec}`` (:mod:`refitcore.capture.structured`), None
        for an engine of flat tensors."""
        return self.calls.structure

    @property
    def output_types(self):
        return self.calls.output_types

    @property
    def trust_output_types(self) -> bool:
        return self.calls.trust_output_types

    # ---- the backend engine ------------------------------------------------------------------
    @property
    def impl(self) -> EngineImpl:
        """The backend's engine (what the refit driver and the backend tests talk to)."""
        return self._impl

    @property
    def backend(self) -> str:
        return self._impl.backend_name

    @property
    def note(self) -> str:
        return self._impl.note

    @property
    def weight_names(self) -> list[str]:
        return self._impl.weight_names()

    def current_weights(self) -> dict[str, np.ndarray]:
        """The weights the engine answers with (read-only views); a weightless engine has none."""
        self._check_weights_present()
        return self._impl.current_weights()

    def __call__(self, *args: Any, **kwargs: Any):
        """Run like the eager model: same positional/keyword structure in, same structure out."""
        self._check_weights_present()
        if self.structure is None:
            outs = self.kind.run(self._impl, list(args))
            return outs[0] if len(outs) == 1 else tuple(outs)
        return self.unflatten_outputs(self.kind.run(self._impl, self.flatten_inputs(args, kwargs)))

    def flatten_inputs(self, args: Sequence[Any], kwargs: dict | None = None) -> list[torch.Tensor]:
        """The engine's flat tensor inputs for one call; checks the call's structure and its
        non-tensor leaves (which the compiled graph specialised on) against compile time."""
        if self.structure is None:
            return list(args)
        leaves, spec = spec_of((tuple(args), dict(kwargs or {})))
        if spec != self.structure["in"]:
            raise ValueError(f"the inputs' structure differs from the compiled one: got {spec}, compiled "
                             f"{self.structure['in']}")
        tensors = []
        for name, leaf, want in zip(leaf_names(spec), leaves, self.structure["in_leaves"]):
            if "tensor" in want:
                if not isinstance(leaf, torch.Tensor):
                    raise TypeError(f"input {name}: expected a tensor, got {type(leaf).__name__}")
                tensors.append(leaf)
            elif isinstance(leaf, torch.Tensor) or leaf != want["value"]:
                raise ValueError(f"input {name}: the engine was compiled for the value {want['value']!r} "
                                 f"(non-tensor inputs are constants of the graph), got {leaf!r}; recompile")
        return tensors

    def example_call(self) -> tuple[tuple, dict]:
        """(args, kwargs) shaped like the compile-time example: zero tensors, the same constants."""
        structure = self.structure
        if structure is None:
            raise TypeError("an engine of flat tensors has no recorded call structure; its inputs are io.input_shapes")
        leaves = [torch.zeros(d["tensor"][0], dtype=getattr(torch, d["tensor"][1])) if "tensor" in d else d["value"]
                  for d in structure["in_leaves"]]
        args, kwargs = unflatten(leaves, structure["in"])
        return tuple(args), dict(kwargs)

    def unflatten_outputs(self, outs: Sequence[Any]):
        if self.structure is None:
            return outs[0] if len(outs) == 1 else tuple(outs)
        if self.calls.out_treespec is not None:
            return pytree.tree_unflatten(list(outs), self.calls.out_treespec)
        if not self.trust_output_types and not self._said_plain:
            missing = unresolved_types(self.structure["out"], output_types=self.output_types)
            if missing:
                logging.getLogger("refitcore").warning(
                    "refitcore: outputs of type %s come back as plain dicts or tuples (namedtuples as stand-ins of "
                    "the same fields: a loaded file's types are never "
                    "imported); pass output_types=[cls] or trust_output_types=True to refitcore.load", missing)
            self._said_plain = True
        return unflatten(outs, self.structure["out"], output_types=self.output_types,
                         trust_output_types=self.trust_output_types)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._check_weights_present()
        if self.io.profiles is not None:   # named by the model's inputs, whatever part runs first
            self.io.profiles.profile_for([tuple(x.shape) for x in inputs])
        return self.kind.run(self._impl, list(inputs))

    def _check_weights_present(self) -> None:
        if self.weightless:
            how = ("compiled with strip_engine_weights=True" if self.options.strip_engine_weights
                   else "loaded without its weights")
            raise WeightlessEngineError(
                f"this engine was {how} ({len(self.weight_names)} placeholders): refit it "
                f"with the model's weights first: refitcore.refit(engine, model, path='cached', in_place=True)")

    def strip_weights(self) -> None:
        """Drop every refittable weight's value (placeholders instead, as :func:`load` with
        ``weights=False`` gives): the engine refuses to run until a refit sets them all, and saves
        without them. The arrays it held are released (``compile(strip_engine_weights=True)`` builds
        the engine on views of the model's tensors and strips them before returning: one copy of the
        weights, the model's). Not for engines that refit through their compiler's own code."""
        if isinstance(self.kind, CompilerRefit):
            raise TypeError(f"a {self.kind.name} engine cannot be stripped: its compiler keeps the weights")
        try:
            header, arrays = self.kind.serialize(self._impl, weights=False)
        except BundleError as err:   # an eager model with compiled submodules: not data, so no placeholders
            raise TypeError(f"this engine cannot be stripped of its weights ({err}); compile it without "
                            f"strip_engine_weights=True") from err
        arrays = {**{k: np.array(v, copy=True) for k, v in arrays.items()},   # its own, not the model's
                  **_placeholders(self.weight_map, "<strip>")}
        self._impl = self.kind.deserialize(header, arrays, backend=self.backend)
        self.weightless = True

    def clone(self) -> RefittableEngine:
        """An independent copy (same plan, its own weight store)."""
        if isinstance(self.kind, CompilerRefit):
            return RefittableEngine(self.kind, self.kind.clone_impl(self._impl), self.weight_map, self.io, self.record,
                                    calls=self.calls, exported_program=self.exported_program)
        if self.weightless:    # nothing to copy: the clone gets placeholders of its own
            header, arrays = self._impl.serialize(weights=False)
            arrays = {**{k: np.array(v, copy=True) for k, v in arrays.items()},
                      **_placeholders(self.weight_map, "<clone>")}
        else:
            header, arrays = self._impl.serialize()
            arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        impl = type(self._impl).deserialize(header, arrays)
        return RefittableEngine(self.kind, impl, self.weight_map, self.io, self.record, calls=self.calls,
                                exported_program=self.exported_program, weightless=self.weightless)

    # ---- saving and loading ---------------------------------------------------------------
    def to_parts(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(header, arrays) of a saved engine: plan, weight map, current weights, IO spec, fingerprint.
        ``weights=False``: a weightless engine (no refittable weight's value; see the module doc)."""
        if weights and self.weightless:
            raise BundleError("this engine is weightless (loaded without its weights and not refitted since): "
                              "refit it before saving it with its weights")
        impl_header, impl_arrays = self.kind.serialize(self._impl, weights=weights)
        impl_header = dict(impl_header)
        arrays = {f"w/{k}": v for k, v in impl_arrays.items()}
        for k, v in (impl_header.pop("blobs", None) or {}).items():
            arrays[f"b/{k}"] = np.frombuffer(v, dtype=np.uint8)
        header = {
            "format": FORMAT,
            "backend": self.backend,
            "impl": impl_header,
            "weight_map": self.weight_map.to_json(),
            "io": self.io.to_json(),
            "fingerprint": self.fingerprint,
            "graph_entries": self.graph_entries,
            "options": self.options.to_json(),   # the model factory too (older files: a "model_factory" field)
            "state_keys": self.state_keys,
            "backend_reason": self.backend_reason,
            # Structured I/O specs and the partition plan: JSON data (refitcore.capture.structured, .partition).
            "structure": self.structure,
            "partition": self.partition.to_json() if self.partition is not None else None,
            "weights": "included" if weights else "stripped",
        }
        # The compiled graph as data, for a loaded engine's fallback path (refitcore.engine.program_record).
        program, constants, why = self.record.program, self.record.program_constants, self.record.program_note
        if self.exported_program is not None and not isinstance(self.kind, CompilerRefit):
            program, constants, why = record_program(self.exported_program)
        if program is not None:
            header["program"] = program
            arrays.update({f"p/{k}": v for k, v in constants.items()})
        elif why:
            header["program_note"] = why
        return header, arrays

    @classmethod
    def from_parts(cls, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str = "<engine>", *,
                   output_types=None, trust_output_types: bool = False) -> RefittableEngine:
        """The engine of a saved file's parts; :class:`BundleError` when they do not make one.

        Outputs of a type the file only names (a transformers ``ModelOutput``...) come back as plain
        dicts unless the caller passes the class (``output_types=[cls]`` or ``{qualified name: cls}``)
        or sets ``trust_output_types=True`` (which imports the module the file names)."""
        if header.get("format") != FORMAT:
            raise BundleError(f"{where}: not a refitcore engine (format={str(header.get('format'))[:60]!r})")
        _check_header(header, where)
        try:
            weight_map = WeightMap.from_json(header["weight_map"])
            io = IOSpec.from_json(header["io"])
            impl_header = dict(header["impl"])
            blobs = {k[2:]: bytes(v) for k, v in arrays.items() if k.startswith("b/")}
            if blobs:
                impl_header["blobs"] = blobs
            weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}
            weightless = header.get("weights", "included") == "stripped"
            if weightless:
                weights.update(_placeholders(weight_map, where))
            kind = kind_of_header(impl_header, where)
            impl = kind.deserialize(impl_header, weights, backend=header["backend"])
            plan = PartitionPlan.from_json(header["partition"]) if header.get("partition") else None
            if "options" in header:
                options = CompileOptions.from_json(header["options"])
            else:   # written before the options were saved: what it recorded of them
                options = CompileOptions(backend=header["backend"], model_factory=header.get("model_factory"))
            _check_weights(weight_map, impl, where)
            program = header.get("program")
            program_constants = {k[2:]: v for k, v in arrays.items() if k.startswith("p/")}
            if program is not None:
                check_program(program, program_constants)
        except BundleContentError as err:   # a crafted record (refitcore.conversion.allowed_ops): say which file
            raise BundleError(f"{where}: {err}") from None
        except BundleError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RecursionError) as err:
            # What the explicit checks above do not cover (the weight map's and the backend plan's
            # inner structure) still becomes a BundleError, never a crash with another exception.
            raise BundleError(f"{where}: engine file content is invalid: {type(err).__name__}: "
                              f"{str(err)[:300]}") from err
        record = EngineRecord(header["fingerprint"], options, graph_entries=header.get("graph_entries"),
                              state_keys=list(header.get("state_keys", [])),
                              backend_reason=header.get("backend_reason", ""), partition=plan,
                              program=program, program_constants=program_constants if program is not None else {},
                              program_note=str(header.get("program_note") or "")[:300] or None)
        calls = CallSpec(header.get("structure"), output_types=output_types, trust_output_types=trust_output_types)
        return cls(kind, impl, weight_map, io, record, calls=calls, weightless=weightless)

    def save(self, path: str | os.PathLike, *, weights: bool | None = None) -> None:
        """Write the engine to one file, atomically (see :mod:`refitcore.engine.bundle`). ``weights=False``
        writes a weightless engine (structure and weight map only): loaded back, it runs once
        ``refitcore.refit(engine, model, path="cached", in_place=True)`` has set its weights. The default
        (None) writes the weights, except for an engine compiled with ``strip_engine_weights=True`` and
        not refitted since, which is saved weightless as it is."""
        if weights is None:
            weights = not (self.weightless and self.options.strip_engine_weights)
        header, arrays = self.to_parts(weights=weights)
        bundle.write(path, header, arrays)

    def summary(self) -> Coverage:
        """A :class:`refitcore.engine.coverage.Coverage`: ops and weights in TensorRT, ops that run in PyTorch."""
        return self.kind.coverage(self)

    def __str__(self) -> str:
        return f"{self!r}\n{self.summary()}"

    def __repr__(self) -> str:
        return (f"RefittableEngine(backend={self.backend!r}, weights={len(self.weight_names)}, "
                f"inputs={[list(s) for s in self.io.input_shapes]})")


def load(path: str | os.PathLike, *, output_types=None, trust_output_types: bool = False,
         weights: bool = True) -> RefittableEngine:
    """Read an engine written by :meth:`RefittableEngine.save`; raises :class:`BundleError` on a bad file.

    Custom output types (a transformers ``ModelOutput``) come back as plain dicts unless the caller
    passes their classes (``output_types``) or sets ``trust_output_types=True``: nothing a file
    names is imported otherwise. ``weights=False`` loads it weightless (see the module doc): its
    refittable weights are checked in the file but never read into memory, for a caller that sets
    every weight anyway (the gate refits them all)."""
    header, arrays = bundle.read(path, skip=None if weights else _refittable_buffers)
    if not weights:
        header = dict(header, weights="stripped")
    return RefittableEngine.from_parts(header, arrays, os.fspath(path), output_types=output_types,
                                       trust_output_types=trust_output_types)


def _refittable_buffers(header: Mapping[str, Any]) -> set[str]:
    """The buffer names of a file's refittable weights (what a weightless load leaves out); a
    malformed header skips nothing (:meth:`RefittableEngine.from_parts` then says what is wrong)."""
    sources = header.get("weight_map", {}).get("sources") if isinstance(header.get("weight_map"), dict) else None
    return {f"w/{name}" for name in sources} if isinstance(sources, dict) else set()


def _check_header(header: Mapping[str, Any], where: str) -> None:
    expect = bundle.expect
    expect(header.get("backend"), str, "backend", where)
    expect(header.get("impl"), dict, "impl", where)
    expect(header.get("weight_map"), dict, "weight_map", where)
    expect(header.get("fingerprint"), str, "fingerprint", where)
    expect(header.get("backend_reason", ""), str, "backend_reason", where)
    expect(header.get("model_factory"), (str, type(None)), "model_factory", where)
    expect(header.get("options", {}), dict, "options", where)
    expect(header.get("graph_entries"), (list, type(None)), "graph_entries", where)
    _check_structure(header.get("structure"), where)
    if header.get("weights", "included") not in ("included", "stripped"):
        raise BundleError(f"{where}: engine file content is invalid: weights should be 'included' or 'stripped', "
                          f"got {str(header.get('weights'))[:40]!r}")
    keys = expect(header.get("state_keys", []), list, "state_keys", where)
    for k in keys:
        expect(k, str, "a state_keys entry", where)
    io = expect(header.get("io"), dict, "io", where)
    lists = {}
    for field in ("input_names", "input_shapes", "input_dtypes", "output_names", "output_shapes"):
        lists[field] = expect(io.get(field), list, f"io.{field}", where)
    if not (len(lists["input_names"]) == len(lists["input_shapes"]) == len(lists["input_dtypes"])) \
            or len(lists["output_names"]) != len(lists["output_shapes"]):
        raise BundleError(f"{where}: engine file content is invalid: the IO spec's names, shapes and dtypes "
                          f"differ in length")
    dynamic = io.get("profiles") is not None
    for side in ("input", "output"):
        for i, name in enumerate(lists[f"{side}_names"]):
            expect(name, str, f"io.{side}_names[{i}]", where)
            shape = lists[f"{side}_shapes"][i]
            if dynamic and side == "output" and isinstance(shape, list):   # -1: a size that varies
                shape = [1 if d == -1 else d for d in shape]
            bundle.expect_shape(shape, f"the shape of {side} {name!r}", where, max_elements=MAX_INPUT_ELEMENTS)
    if dynamic:
        _check_profiles(io["profiles"], lists["input_names"], lists["input_shapes"], where)
    for i, d in enumerate(lists["input_dtypes"]):
        if d not in TORCH_NAMES:
            raise BundleError(f"{where}: engine file content is invalid: io.input_dtypes[{i}] is "
                              f"{str(d)[:40]!r}, not one of {list(TORCH_NAMES)}")


_SPEC_NODES = ("leaf", "tuple", "list", "dict", "custom")
_QUALNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_<>][A-Za-z0-9_<>]*)+")


def _check_structure(structure: Any, where: str) -> None:
    """The call structure a file records (:mod:`refitcore.capture.structured`): known node types
    only, children and keys that agree, custom output types named as ``module.QualName``, input
    leaves that are a tensor of a bounded shape and a known dtype, or a constant."""
    if structure is None:
        return
    bad = f"{where}: engine file content is invalid: structure"
    bundle.expect(structure, dict, "structure", where)

    def count(node: Any, what: str, depth: int) -> int:
        if not isinstance(node, dict) or node.get("t") not in _SPEC_NODES:
            t = node.get("t") if isinstance(node, dict) else node
            raise BundleError(f"{bad} {what}: unknown node type {str(t)[:40]!r}; expected one of {list(_SPEC_NODES)}")
        if node["t"] == "leaf":
            return 1
        if depth > 64:
            raise BundleError(f"{bad} {what}: nested more than 64 deep")
        children = bundle.expect(node.get("c"), list, f"structure {what}: children", where)
        keys = node.get("k")
        if node["t"] == "custom" and not (isinstance(node.get("cls"), str) and _QUALNAME.fullmatch(node["cls"])):
            raise BundleError(f"{bad} {what}: unknown custom output type {str(node.get('cls'))[:60]!r}; a custom "
                              f"node names its type as module.QualName")
        if (node["t"] == "dict" or keys is not None) and not (
                isinstance(keys, list) and len(keys) == len(children)
                and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys)):
            raise BundleError(f"{bad} {what}: the keys {str(keys)[:60]} do not match its {len(children)} children")
        return sum(count(c, f"{what}[{i}]", depth + 1) for i, c in enumerate(children))

    count(structure.get("out"), "out", 0)
    leaves = bundle.expect(structure.get("in_leaves"), list, "structure.in_leaves", where)
    if count(structure.get("in"), "in", 0) != len(leaves):
        raise BundleError(f"{bad}: the inputs' spec and its {len(leaves)} leaves differ in number")
    for i, leaf in enumerate(leaves):
        bundle.expect(leaf, dict, f"structure.in_leaves[{i}]", where)
        if "tensor" in leaf:
            tensor = bundle.expect(leaf["tensor"], list, f"structure.in_leaves[{i}].tensor", where)
            if len(tensor) != 2 or tensor[1] not in TORCH_NAMES:
                raise BundleError(f"{bad}.in_leaves[{i}]: a tensor leaf is [shape, dtype of {list(TORCH_NAMES)}], "
                                  f"got {str(tensor)[:60]}")
            bundle.expect_shape(tensor[0], f"the shape of structure.in_leaves[{i}]", where,
                                max_elements=MAX_INPUT_ELEMENTS)
        elif "value" not in leaf:
            raise BundleError(f"{bad}.in_leaves[{i}]: a leaf is a tensor or a value")


def _placeholders(weight_map: WeightMap, where: str) -> dict[str, np.ndarray]:
    """Read-only zero arrays of every mapped weight's shape and dtype for a weightless engine: one
    zero broadcast to the shape, so a placeholder costs no time and no memory (a refit replaces it)."""
    out = {}
    for name, src in weight_map.sources.items():
        shape = bundle.expect_shape(list(src.shape), f"the shape of weight {name!r}", where,
                                    max_elements=bundle.MAX_TENSOR_ELEMENTS)
        # A weight's dtype is a torch name ('bfloat16': its uint16 bit patterns) or a stored NumPy one.
        if src.dtype in TORCH_NAMES:
            dtype = numpy_dtype(trt_name(getattr(torch, src.dtype), ""))
        elif src.dtype in NUMPY_NAMES:
            dtype = np.dtype(src.dtype)
        else:
            raise BundleError(f"{where}: engine file content is invalid: weight {name!r} has dtype "
                              f"{str(src.dtype)[:40]!r}, not one of {sorted(set(NUMPY_NAMES + TORCH_NAMES))}")
        out[name] = np.broadcast_to(np.zeros((), dtype=dtype), shape)
    return out


def _check_profiles(profiles: Any, names: list, shapes: list, where: str) -> None:
    """The recorded shape ranges: well formed, one per input, each range bounded and containing the
    example's size (see :meth:`refitcore.capture.shapes.ShapeProfiles.from_json`)."""
    try:
        sp = ShapeProfiles.from_json(bundle.expect(profiles, dict, "io.profiles", where))
    except ShapeRangeError as err:
        raise BundleError(f"{where}: engine file content is invalid: io.profiles: {err}") from None
    except (KeyError, ValueError, TypeError) as err:
        raise BundleError(f"{where}: engine file content is invalid: io.profiles is malformed "
                          f"({type(err).__name__}: {str(err)[:200]})") from None
    if list(sp.input_names) != list(names):
        raise BundleError(f"{where}: engine file content is invalid: io.profiles names inputs {list(sp.input_names)}, "
                          f"the IO spec {list(names)}")
    for name, ranges, shape in zip(names, sp.ranges, shapes):
        if len(ranges) != len(shape) or any(hi > MAX_INPUT_ELEMENTS for _, _, hi in ranges):
            raise BundleError(f"{where}: engine file content is invalid: io.profiles ranges of input {name!r} do not "
                              f"fit its shape {shape}")
        if math.prod(hi for _, _, hi in ranges) > MAX_INPUT_ELEMENTS:
            raise BundleError(f"{where}: engine file content is invalid: input {name!r} may have more than "
                              f"{MAX_INPUT_ELEMENTS} elements at its largest shape")


def _check_weights(weight_map: WeightMap, impl: EngineImpl, where: str) -> None:
    """The weight map and the engine must name the same weights, of the same sizes."""
    names = impl.weight_names()
    if set(names) != set(weight_map.sources):
        raise BundleError(f"{where}: engine file content is invalid: the weight map and the engine name different "
                          f"weights (only in the map: {sorted(set(weight_map.sources) - set(names))[:5]}, only in "
                          f"the engine: {sorted(set(names) - set(weight_map.sources))[:5]})")
    for name in names:
        count = impl.prototype(name).count
        if count != weight_map[name].count:
            raise BundleError(f"{where}: engine file content is invalid: weight {name!r} holds {count} values where "
                              f"the weight map says {weight_map[name].count}")
