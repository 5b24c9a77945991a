"""The weight map: data that says where every engine weight comes from.

``WeightMap.sources`` is ``{engine weight name: WeightSource}``. A WeightSource names a
recipe from the closed set in :mod:`refitcore.conversion.recipes`, the operands it reads and its
parameters (BatchNorm eps included), and the engine shape and dtype. An operand is a
small JSON tree:

- ``{"key": "layer1.0.conv1.weight"}``: a state_dict entry;
- ``{"const": "c0"}``: a literal recorded in ``WeightMap.constants`` (scalars of the
  graph, non-persistent buffers, lifted tensor constants: anything a state_dict lacks).
  ``WeightMap.constant_origins`` names, per constant, the model tensor it was read from (a
  plain tensor attribute or non-persistent buffer, e.g. ``"head.scale"``): the cached path
  reads those afresh from a new model (:meth:`WeightMap.constants_for`);
- ``{"op": "aten.permute.default", "args": [...], "kwargs": {...}}``: an ATen op that the
  graph applies to weights before they reach a layer (transpose, slice, reshape, ...),
  replayed exactly on the new weights;
- ``null``: an optional operand that is absent (a conv without bias, BatchNorm without affine).

The map round-trips through JSON and carries a format version.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from refitcore import dtypes
from refitcore.conversion import allowed_ops
from refitcore.conversion.recipes import RECIPES, apply_recipe, check_operand
from refitcore.errors import BundleContentError, MapCannotServeError
from refitcore.options import MAX_TENSOR_ELEMENTS

__all__ = ["WeightSource", "WeightMap", "FORMAT_VERSION", "operand_keys", "operand_constants", "has_key", "rename_keys",
           "map_operand", "prefix_consts", "encode_array", "decode_array"]

FORMAT_VERSION = 1


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _shape(value: Any, where: str) -> tuple[int, ...]:
    """A declared shape: non-negative ints, at most MAX_TENSOR_ELEMENTS elements."""
    if (not isinstance(value, (list, tuple)) or len(value) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)):
        raise BundleContentError(f"{where}: shape {str(value)[:80]} is not a list of non-negative ints")
    if math.prod(value) > MAX_TENSOR_ELEMENTS:
        raise BundleContentError(f"{where}: shape {list(value)} has more than {MAX_TENSOR_ELEMENTS} elements")
    return tuple(value)


def decode_array(d: Mapping[str, Any], where: str = "weight map constant") -> np.ndarray:
    dtype = np.dtype(d["dtype"]) if isinstance(d["dtype"], str) else None
    if dtype is None or dtype.kind not in "biufc" or dtype.itemsize == 0:
        raise BundleContentError(f"{where}: dtype {str(d['dtype'])[:40]!r} is not a numeric dtype")
    shape = _shape(d["shape"], where)
    raw = base64.b64decode(d["data"])
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise BundleContentError(f"{where}: {len(raw)} bytes do not hold a {dtype} array of shape {list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def operand_keys(operand: Any) -> Iterator[str]:
    """Every state_dict key an operand tree reads, in order (may repeat)."""
    if isinstance(operand, dict):
        if "key" in operand:
            yield operand["key"]
        elif "op" in operand:
            for arg in operand.get("args", []):
                yield from operand_keys(arg)
            for arg in operand.get("kwargs", {}).values():
                yield from operand_keys(arg)
    elif isinstance(operand, (list, tuple)):
        for item in operand:
            yield from operand_keys(item)


def operand_constants(operand: Any) -> Iterator[str]:
    """Every constant id (``{"const": id}``) an operand tree reads, in order (may repeat)."""
    if isinstance(operand, dict):
        if "const" in operand:
            yield operand["const"]
        elif "op" in operand:
            for arg in list(operand.get("args", [])) + list(operand.get("kwargs", {}).values()):
                yield from operand_constants(arg)
    elif isinstance(operand, (list, tuple)):
        for item in operand:
            yield from operand_constants(item)


def has_key(operand: Any) -> bool:
    """Whether an operand tree reads the state_dict at all (else it is a literal)."""
    return next(iter(operand_keys(operand)), None) is not None


def map_operand(operand: Any, fn) -> Any:
    """A copy of an operand tree with every leaf operand (``{"key"}``, ``{"const"}``...) replaced by
    ``fn(leaf)``; ``{"op"}`` nodes and lists are walked."""
    if isinstance(operand, dict):
        if "op" in operand:
            return dict(operand, args=map_operand(operand.get("args", []), fn),
                        kwargs={k: map_operand(v, fn) for k, v in operand.get("kwargs", {}).items()})
        return fn(operand)
    if isinstance(operand, (list, tuple)):
        return [map_operand(item, fn) for item in operand]
    return operand


def rename_keys(operand: Any, rename: Mapping[str, str]) -> Any:
    """A copy of an operand tree with its state_dict keys renamed."""
    return map_operand(operand, lambda o: dict(o, key=rename.get(o["key"], o["key"])) if "key" in o else o)


def prefix_consts(operand: Any, prefix: str) -> Any:
    """A copy of an operand tree whose literals (``{"const": id}``) read ``prefix + id``."""
    return map_operand(operand, lambda o: {"const": prefix + o["const"]} if "const" in o else o)


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Why one engine weight has its value: ``recipe(inputs, **params)`` cast to ``dtype`` and
    reshaped to ``shape``."""

    recipe: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def keys(self) -> tuple[str, ...]:
        """The state_dict keys this weight depends on (deduplicated, in order)."""
        return tuple(dict.fromkeys(k for v in self.inputs.values() for k in operand_keys(v)))

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "inputs": self.inputs, "params": self.params,
                "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "weight map source") -> WeightSource:
        recipe, dtype = d["recipe"], d.get("dtype", "float32")
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise BundleContentError(f"{where}: unknown recipe {str(recipe)[:80]!r}")
        allowed_ops.decode_dtype(dtype, where)
        if not isinstance(d["inputs"], dict) or not isinstance(d.get("params", {}), dict):
            raise BundleContentError(f"{where}: inputs and params must be objects")
        return cls(recipe=recipe, inputs=dict(d["inputs"]), params=dict(d.get("params", {})),
                   shape=_shape(d["shape"], where), dtype=dtype)

    def with_keys_renamed(self, rename: Mapping[str, str]) -> WeightSource:
        """The same source reading ``rename[key]`` wherever it read ``key``."""
        return dataclasses.replace(self, inputs={k: rename_keys(v, rename) for k, v in self.inputs.items()})

    def describe(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        keys = ", ".join(self.keys) or "literal"
        return f"{self.recipe}({keys}{'; ' + params if params else ''}) -> {self.dtype}{list(self.shape)}"


@dataclasses.dataclass
class WeightMap:
    """``{engine weight name: WeightSource}`` plus the literals they use and the tied-parameter groups."""

    sources: dict[str, WeightSource] = dataclasses.field(default_factory=dict)
    constants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Groups of state_dict keys that are one tensor in the model (tied parameters). The map
    # reads the first key of each group; a state_dict giving them different values is an error.
    tied: list[list[str]] = dataclasses.field(default_factory=list)
    # state_dict keys of the model that no engine weight reads (e.g. num_batches_tracked).
    unused_keys: list[str] = dataclasses.field(default_factory=list)
    # shape and dtype of every state_dict key the model had at compile time: {key: [shape, dtype]}
    key_specs: dict[str, list] = dataclasses.field(default_factory=dict)
    # constant id -> the model tensor it holds, by attribute path (tensor attributes and
    # non-persistent buffers: not in a state_dict, yet a new model may hold other values).
    # None: a map written before origins were recorded, which cannot tell them from code constants.
    constant_origins: dict[str, str] | None = dataclasses.field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self):
        return iter(self.sources)

    def __getitem__(self, name: str) -> WeightSource:
        return self.sources[name]

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    @property
    def keys_used(self) -> list[str]:
        return list(dict.fromkeys(k for s in self.sources.values() for k in s.keys))

    @property
    def constant_weights(self) -> frozenset[str]:
        """Engine weights that read no state_dict key: literals of the graph (a ``-inf`` of
        ``masked_fill``, a causal mask) and model tensors outside the state_dict. They are structure,
        not weights: a refit never takes them from a checkpoint, and they may hold NaN/Inf as the model
        does; only values derived from the state_dict must be finite."""
        return frozenset(name for name, s in self.sources.items() if not s.keys)

    def consumers(self, key: str) -> list[str]:
        """Engine weights that read a state_dict key."""
        return [name for name, s in self.sources.items() if key in s.keys]

    def to_json(self) -> dict:
        return {
            "format": "refitcore.weight_map",
            "version": self.version,
            "sources": {name: s.to_json() for name, s in self.sources.items()},
            "constants": {cid: encode_array(a) for cid, a in self.constants.items()},
            "tied": [list(g) for g in self.tied],
            "unused_keys": list(self.unused_keys),
            "key_specs": {k: [list(v[0]), v[1]] for k, v in self.key_specs.items()},
            "constant_origins": None if self.constant_origins is None else dict(self.constant_origins),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightMap:
        if d.get("format") != "refitcore.weight_map":
            raise ValueError(f"not a refitcore weight map (format={d.get('format')!r})")
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"weight map format version {version!r} is not supported (this refitcore reads "
                f"version {FORMAT_VERSION}); recompile the engine with this version")
        key_specs = {k: [list(_shape(v[0], f"key_specs {k!r}")), v[1]] for k, v in d.get("key_specs", {}).items()}
        for k, (_, dtype) in key_specs.items():
            allowed_ops.decode_dtype(dtype, f"key_specs {k!r}")
        wm = cls(
            sources={name: WeightSource.from_json(s, f"weight map source {name!r}")
                     for name, s in d["sources"].items()},
            constants={cid: decode_array(a, f"weight map constant {cid!r}")
                       for cid, a in d.get("constants", {}).items()},
            tied=[list(g) for g in d.get("tied", [])],
            unused_keys=list(d.get("unused_keys", [])),
            key_specs=key_specs,
            constant_origins=(dict(d["constant_origins"]) if d.get("constant_origins") is not None
                              else None),   # absent in maps written before origins were recorded
            version=version,
        )
        wm.check()
        return wm

    def element_bound(self) -> int:
        """The most elements any tensor the map computes may have: the largest tensor it declares
        (an engine weight, a state_dict entry, a constant), each at most MAX_TENSOR_ELEMENTS."""
        sizes = [s.count for s in self.sources.values()]
        sizes += [math.prod(v[0]) for v in self.key_specs.values()]
        sizes += [a.size for a in self.constants.values()]
        return max(sizes, default=1)

    def check(self) -> None:
        """Evaluate every source on the ``meta`` device from the declared shapes (``key_specs``, the
        constants): no memory, no side effects. :class:`~refitcore.errors.BundleContentError` when
        a source names an op outside :mod:`refitcore.conversion.allowed_ops`, an unknown operand kind,
        a state_dict key it does not declare, a bad index or recipe parameter, would make a tensor
        larger than :meth:`element_bound`, or does not give as many values as its engine weight."""
        bound = self.element_bound()

        def leaf_of(where):
            def leaf(kind: str, name: str) -> torch.Tensor:
                if kind == "const":
                    if name not in self.constants:
                        raise BundleContentError(f"{where}: reads constant {name[:80]!r}, which the map does not hold")
                    return allowed_ops.to_meta(dtypes.as_torch(self.constants[name]))
                if name not in self.key_specs:
                    raise BundleContentError(f"{where}: reads state_dict key {name[:80]!r}, which key_specs "
                                             f"does not declare")
                shape, dtype = self.key_specs[name]
                return torch.empty(shape, dtype=allowed_ops.decode_dtype(dtype, where), device="meta")
            return leaf

        for name, src in self.sources.items():
            where = f"weight map source {name!r}"
            inputs = {str(k): check_operand(v, leaf_of(f"{where} input {k!r}"), max_elements=bound,
                                            where=f"{where} input {k!r}") for k, v in src.inputs.items()}
            try:
                with torch.no_grad():
                    out = apply_recipe(src.recipe, inputs, src.params)
                count = out.numel()
            except BundleContentError:
                raise
            except Exception as err:  # noqa: BLE001 - any refusal of the recipe is a bad source
                raise BundleContentError(f"{where}: recipe {src.recipe!r} refuses its operands or params: "
                                         f"{type(err).__name__}: {str(err)[:200]}") from None
            if count != src.count:
                raise BundleContentError(f"{where}: recipe {src.recipe!r} gives {count} values, the engine "
                                         f"weight of shape {list(src.shape)} needs {src.count}")

    @classmethod
    def loads(cls, text: str) -> WeightMap:
        return cls.from_json(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightMap):
            return NotImplemented
        return (self.sources == other.sources and self.tied == other.tied
                and self.unused_keys == other.unused_keys and self.version == other.version
                and self.key_specs == other.key_specs and self.constant_origins == other.constant_origins
                and self.constants.keys() == other.constants.keys()
                and all(self.constants[k].dtype == other.constants[k].dtype
                        and np.array_equal(self.constants[k], other.constants[k], equal_nan=True)
                        for k in self.constants))

    def constants_for(self, source: Any = None, *, model: Any = None) -> tuple[dict[str, np.ndarray], list[str]]:
        """The constants to map new weights with, and notes for the caller.

        ``source`` is what the new weights came from: an ``nn.Module`` or ``ExportedProgram``
        supplies every constant named in :attr:`constant_origins` afresh (cast and reshaped as
        recorded); ``None`` (a bare state_dict or checkpoint, which cannot hold them) keeps the
        compile-time values and says so in the notes. ``model``: with a bare state_dict, a module
        the new weights are for (e.g. the one verification compares with): only the constants it
        holds other values of are noted (one that it holds equal, such as BERT's ``position_ids``,
        the same in every model of the architecture, is no news). Raises
        :class:`~refitcore.errors.MapCannotServeError` when the source lacks such a tensor or holds
        one of another size: the weight map cannot express that model; convert it again (the
        fallback path)."""
        if self.constant_origins is None and self.constants:
            what = (f"this weight map predates recorded constant origins: its {len(self.constants)} "
                    f"constant(s) may hold model tensors that a state_dict lacks")
            if source is None:
                return self.constants, [f"{what}; they keep their compile-time values (recompile to record them)"]
            raise MapCannotServeError([f"{what}, so the map cannot read them from the new model "
                                       f"(recompile to record them)"])
        if not self.constant_origins:
            return self.constants, []
        if source is None:
            if model is None:
                names = sorted(set(self.constant_origins.values()))
                where = ""
            else:
                names = self._constants_differing(model)
                where = ", which the model compared with holds other values of"
            if not names:
                return self.constants, []
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            return self.constants, [
                f"{len(names)} tensor constant(s) that a state_dict does not hold ({shown}) keep their "
                f"compile-time values{where}; pass the model (nn.Module) instead of its state_dict to refit "
                f"them from it"]
        lookup = _tensor_lookup(source)
        out = dict(self.constants)
        problems = []
        for cid, name in self.constant_origins.items():
            recorded = self.constants[cid]
            value = lookup(name)
            if value is None:
                problems.append(f"the new model has no tensor {name!r} (a constant of the compiled graph)")
                continue
            arr = _as_recorded(value, recorded)
            if arr.size != recorded.size:
                problems.append(f"tensor constant {name!r}: {list(arr.shape)} where the compiled model had "
                                f"{list(recorded.shape)}")
                continue
            out[cid] = np.ascontiguousarray(arr.reshape(recorded.shape))
        if problems:
            raise MapCannotServeError(problems)
        return out, []


    def _constants_differing(self, model: Any) -> list[str]:
        """The model tensors behind the map's constants that ``model`` lacks or holds other values of."""
        lookup = _tensor_lookup(model)
        names = set()
        for cid, name in (self.constant_origins or {}).items():
            recorded, value = self.constants[cid], lookup(name)
            if value is None or value.numel() != recorded.size or not np.array_equal(
                    _as_recorded(value, recorded).reshape(recorded.shape), recorded, equal_nan=True):
                names.add(name)
        return sorted(names)


def _as_recorded(value: Any, recorded: np.ndarray) -> np.ndarray:
    """A model tensor as an array of the recorded constant's dtype (bfloat16 as its bit patterns)."""
    want = dtypes.as_torch(np.zeros(0, recorded.dtype)).dtype
    return dtypes.to_numpy(value.detach().cpu().to(want).contiguous())


def _tensor_lookup(source: Any):
    """name -> tensor (or None) for an nn.Module (attribute path) or an ExportedProgram (its constants)."""
    constants = getattr(source, "constants", None)
    if isinstance(constants, Mapping) and hasattr(source, "graph_signature"):
        return lambda name: constants.get(name)

    def get(name: str):
        obj = source
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj if hasattr(obj, "detach") and hasattr(obj, "numel") else None

    return get
