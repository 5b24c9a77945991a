"""Structured inputs and outputs: pytrees at the engine's edge, flat leaf lists inside.

A compiled model takes and returns what the eager model does (tuples, lists, dicts, ``None``,
Python scalars, transformers ``ModelOutput``...). The engine keeps the *specs* of its inputs
and outputs as JSON data (:func:`spec_to_json`), flattens a call's ``(args, kwargs)`` with
``torch.utils._pytree`` and unflattens its flat outputs into the eager structure.

A spec node is ``{"t": "leaf"}``, ``{"t": "tuple" | "list", "c": [...]}``,
``{"t": "dict", "k": [keys], "c": [...]}`` or, for any other registered pytree type (a
``ModelOutput``, a namedtuple, a transformers ``Cache``), ``{"t": "custom", "cls": "module.QualName",
"k": [keys] | null, "c": [...]}``, with the node's pytree context as ``"ctx"`` when it is plain data
other than its keys (a ``DynamicCache``'s layout). A namedtuple (torch files every one under
``collections.namedtuple``, its class as the context) is a custom node of its own class, its field
names as keys and ``"tuple": true``. Loading a spec never imports anything: a custom node is rebuilt
as its class only when the caller passes the class (``output_types``; the model's own at compile) or
sets ``trust_output_types``; otherwise it becomes a plain ``dict`` (keyed nodes) or ``tuple``, with the
same keys and leaves, and a namedtuple a stand-in namedtuple of the same name and fields, made from
the data (indexing, unpacking and field access work as on the model's own).

Every leaf has a *path name*: top-level keys bare (``logits``), deeper ones in brackets
(``[0]['boxes']``); :func:`leaf_names` lists them in flat order. Verdicts use these names.
"""
from __future__ import annotations

import collections
import functools
import importlib
import keyword
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from refitcore.errors import ShapeRangeError

__all__ = ["Inputs", "spec_to_json", "spec_of", "unflatten", "leaf_names", "flatten_with_names",
           "split_call", "sample_list", "describe_leaf", "unresolved_types", "check_structured_samples",
           "flat_positional", "as_positional", "register_cache_pytrees"]


def register_cache_pytrees() -> None:
    """Make transformers' ``Cache`` types pytree nodes, so that a model returning one (a decoder with
    ``use_cache=True``: ``DynamicCache``; an encoder-decoder: ``EncoderDecoderCache``) exports,
    flattens into its key/value tensors and comes back as that cache, and one taking a cache as input
    (``StaticCache``, which the model updates in place) is refused by name as a mutation. Nothing
    happens until transformers is imported (by the model's code): refitcore never imports it for a
    model that does not use it.

    ``DynamicCache`` goes through transformers' own torch.export support (its context is plain data:
    the layer layout); ``EncoderDecoderCache`` is its two sub-caches with no context; every other
    ``Cache`` subclass through transformers' generic exporter registration where the release has it.
    That registration's context names classes by import path, so it is never recorded with an engine
    (:func:`spec_to_json`) and a loaded engine never unflattens through it.

    Whether a class is registered is asked of torch's registry each time, not remembered: a
    transformers imported again (a test runner restoring ``sys.modules``) brings new classes."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:   # a release without it: a cache output stays a leaf torch.export refuses
        return
    if DynamicCache not in pytree.SUPPORTED_NODES:
        register_dynamic_cache_export_support()
    if EncoderDecoderCache not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(
            EncoderDecoderCache, _encoder_decoder_flatten, _encoder_decoder_unflatten(EncoderDecoderCache),
            serialized_type_name=_qualname(EncoderDecoderCache), flatten_with_keys_fn=_encoder_decoder_keys)
    try:
        from transformers.exporters.exporter_dynamo import register_pytree_node
    except ImportError:
        return
    pending = [Cache]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls not in pytree.SUPPORTED_NODES and cls.__module__ == Cache.__module__:
            register_pytree_node(cls)


def _encoder_decoder_flatten(cache: Any) -> tuple[list, None]:
    return [cache.self_attention_cache, cache.cross_attention_cache], None


def _encoder_decoder_keys(cache: Any) -> tuple[list, None]:
    return [(pytree.GetAttrKey("self_attention_cache"), cache.self_attention_cache),
            (pytree.GetAttrKey("cross_attention_cache"), cache.cross_attention_cache)], None


def _encoder_decoder_unflatten(cls: type) -> Any:
    def unflatten(children: Sequence[Any], _context: None) -> Any:
        return cls(*children)
    return unflatten


def _context_is_data(typ: type) -> bool:
    """False for a type registered through transformers' generic exporter, whose context names
    classes that unflattening imports: such a context is never kept with an engine."""
    node = pytree.SUPPORTED_NODES.get(typ)
    return node is None or not getattr(node.unflatten_fn, "__module__", "").startswith("transformers.exporters")


class Inputs:
    """One call's positional and keyword inputs: ``Inputs(ids, attention_mask=mask)``.

    Use it wherever refitcore takes sample inputs (``verify``, ``refit(verify_inputs=...)``) when the
    model takes keyword arguments."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = tuple(args)
        self.kwargs = dict(kwargs)

    def __repr__(self) -> str:
        return f"Inputs({len(self.args)} positional, keywords {sorted(self.kwargs)})"


def split_call(sample: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of one sample: an :class:`Inputs`, a tensor (one positional input) or a tuple
    of positional inputs."""
    if isinstance(sample, Inputs):
        return sample.args, sample.kwargs
    if isinstance(sample, tuple):
        return sample, {}
    if isinstance(sample, list):
        return tuple(sample), {}
    return (sample,), {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def spec_to_json(spec: pytree.TreeSpec) -> dict:
    """A TreeSpec as plain JSON data (see the module docstring)."""
    if spec.is_leaf():
        return {"t": "leaf"}
    children = [spec_to_json(c) for c in spec.children()]
    typ = spec.type
    if typ is tuple:
        return {"t": "tuple", "c": children}
    if typ is list:
        return {"t": "list", "c": children}
    if typ is dict or typ is collections.OrderedDict:
        return {"t": "dict", "k": list(spec.context), "c": children}
    ctx = spec.context
    if typ is collections.namedtuple and pytree.is_namedtuple_class(ctx):
        return {"t": "custom", "cls": _qualname(ctx), "k": list(ctx._fields), "c": children, "tuple": True}
    keys = list(ctx) if isinstance(ctx, (list, tuple)) and all(isinstance(k, (str, int)) for k in ctx) else None
    if keys is not None and len(keys) != len(children):
        keys = None
    if keys is None and hasattr(typ, "_fields"):
        keys = list(typ._fields)
    node = {"t": "custom", "cls": _qualname(typ), "k": keys, "c": children}
    if keys is None and ctx is not None and _plain_data(ctx) and _context_is_data(typ):
        node["ctx"] = _as_json(ctx)
    return node


def _plain_data(value: Any) -> bool:
    """True for JSON data: None, str, int, float, bool, and lists/tuples/str-keyed dicts of them."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def _as_json(value: Any) -> Any:
    """Plain data as JSON would give it back (tuples as lists), so that a spec compares equal to its
    own round trip through a file."""
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


def spec_of(tree: Any) -> tuple[list, dict]:
    """(leaves, JSON spec) of a pytree."""
    register_cache_pytrees()
    leaves, spec = pytree.tree_flatten(tree)
    return leaves, spec_to_json(spec)


def _count(spec: Mapping) -> int:
    return 1 if spec["t"] == "leaf" else sum(_count(c) for c in spec["c"])


def _resolve(qualname: str, output_types: Any, trust: bool) -> type | None:
    """The class for a custom node: one the caller passed (``{qualname: cls}`` or classes), or, only
    with ``trust``, imported from the module the spec names."""
    if output_types:
        items = output_types.items() if isinstance(output_types, Mapping) else [(None, c) for c in output_types]
        for key, cls in items:
            if key == qualname or (isinstance(cls, type) and _qualname(cls) == qualname):
                return cls
    if trust:
        # Only on the caller's explicit request: this imports the module the file names.
        module, _, name = qualname.rpartition(".")
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    return None


def unresolved_types(spec: Mapping, *, output_types: Any = None) -> list[str]:
    """Custom types a spec names that :func:`unflatten` would return as plain dicts/tuples."""
    out: list[str] = []
    if spec["t"] == "custom" and _resolve(spec["cls"], output_types, False) is None:
        out.append(spec["cls"])
    for child in spec.get("c", []):
        out += [c for c in unresolved_types(child, output_types=output_types) if c not in out]
    return out


def unflatten(leaves: Sequence[Any], spec: Mapping, *, output_types: Mapping[str, type] | None = None,
              trust_output_types: bool = False) -> Any:
    """Rebuild a pytree from its leaves and JSON spec; unknown custom types become dicts/tuples."""
    it = iter(leaves)

    def build(node):
        t = node["t"]
        if t == "leaf":
            return next(it)
        children = [build(c) for c in node["c"]]
        if t == "tuple":
            return tuple(children)
        if t == "list":
            return children
        if t == "dict":
            return dict(zip(node["k"], children))
        cls = _resolve(node["cls"], output_types, trust_output_types)
        if cls is not None:
            register_cache_pytrees()   # first: whether a registration's context is data is asked of it
            if not _context_is_data(cls):
                cls = None   # it rebuilds from a context that names classes to import: plain data instead
        keys = node.get("k")
        if node.get("tuple") is True:   # a namedtuple: built from its fields in order
            made = cls or _stand_in(node["cls"], keys)
            return made(*children) if made is not tuple else tuple(children)
        if cls is not None:
            if cls in pytree.SUPPORTED_NODES:
                context = node.get("ctx", keys)
                try:
                    return pytree.SUPPORTED_NODES[cls].unflatten_fn(children, context)
                except Exception:  # noqa: BLE001 - a context we could not keep as data: build by keywords
                    pass
            if keys is not None:
                return cls(**dict(zip(keys, children)))
            return cls(*children)
        return dict(zip(keys, children)) if keys is not None else tuple(children)

    out = build(spec)
    rest = list(it)
    if rest:
        raise ValueError(f"{len(rest)} leaves left over when rebuilding the output structure")
    return out


def _stand_in(qualname: str, keys: Any) -> Any:
    """A namedtuple class of a spec's name and fields, made from the data (nothing is imported), or
    ``tuple`` when the names are not plain identifiers; one class per (name, fields)."""
    name = qualname.rpartition(".")[2]
    names = [name, *keys] if isinstance(keys, list) else []
    if not names or not all(isinstance(n, str) and n.isidentifier() and not keyword.iskeyword(n)
                            and not n.startswith("_") for n in names):
        return tuple
    return _namedtuple(name, tuple(keys))


@functools.lru_cache(maxsize=256)
def _namedtuple(name: str, fields: tuple[str, ...]) -> Any:
    return collections.namedtuple(name, fields)


def leaf_names(spec: Mapping) -> list[str]:
    """The path name of every leaf, in flat order: ``logits``, ``[0]['boxes']``, ``[1]``."""
    names: list[str] = []

    def walk(node, prefix: str, top: bool):
        if node["t"] == "leaf":
            names.append(prefix)
            return
        keys = node.get("k")
        for i, child in enumerate(node["c"]):
            if keys is not None:
                key = keys[i]
                part = str(key) if top and isinstance(key, str) else f"[{key!r}]"
            else:
                part = f"[{i}]"
            walk(child, prefix + part, False)

    walk(spec, "", True)
    return names


def flatten_with_names(tree: Any) -> tuple[list, list[str], dict]:
    """(leaves, path names, JSON spec) of a pytree; a bare tensor has the name ''."""
    leaves, spec = spec_of(tree)
    return leaves, leaf_names(spec), spec


def describe_leaf(value: Any) -> Any:
    """A leaf as JSON data: tensors by shape/dtype, anything else by value (Python scalars, None, str)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": [list(value.shape), str(value.dtype).replace("torch.", "")]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"an input leaf of type {type(value).__name__} cannot be compiled; pass tensors, "
                    f"Python scalars or None (inside tuples, lists and dicts)")


def flat_positional(structure: Mapping | None) -> bool:
    """True when an engine takes positional tensors only (no keywords, no nesting, no constants)."""
    if structure is None:
        return True
    top = structure["in"]
    args, kwargs = top["c"]
    return (not kwargs.get("c") and all(c["t"] == "leaf" for c in args["c"])
            and all("tensor" in d for d in structure["in_leaves"]))


def as_positional(inputs: Any) -> Any:
    """Samples with :class:`Inputs` of positional inputs only as plain tuples (others unchanged)."""
    if isinstance(inputs, Inputs):
        return inputs.args if not inputs.kwargs else inputs
    if isinstance(inputs, list):
        return [as_positional(s) for s in inputs]
    return inputs


def sample_list(inputs: Any) -> list:
    """Verification inputs as a list of samples: one tensor, one tuple or :class:`Inputs` is one
    sample; anything else is iterated. ``ValueError`` when there is none or it cannot be iterated."""
    if isinstance(inputs, (torch.Tensor, tuple, Inputs)):
        return [inputs]
    try:
        samples = list(inputs)
    except TypeError:
        raise ValueError(f"verify_inputs: expected a tensor, a tuple (one sample), refitcore.Inputs or a list of "
                         f"samples, got {type(inputs).__name__}") from None
    if not samples:
        raise ValueError("verify_inputs: no samples given; give at least one (a tensor, a tuple of tensors, or a list)")
    return samples


def check_structured_samples(engine, inputs: Any) -> list[Inputs]:
    """Verification inputs of an engine with structured I/O, as :class:`Inputs`, each checked against
    the compiled structure, constants, shapes and dtypes; ``ValueError`` listing every mismatch."""
    try:
        calls = [split_call(s if not isinstance(s, list) else tuple(s)) for s in sample_list(inputs)]
    except TypeError:
        raise ValueError(f"verify_inputs: expected a tensor, a tuple (one sample), refitcore.Inputs or a list of "
                         f"samples, got {type(inputs).__name__}") from None
    problems = []
    for s, (args, kwargs) in enumerate(calls):
        try:
            flat = engine.flatten_inputs(args, kwargs)
        except (TypeError, ValueError) as err:
            problems.append(f"sample {s}: {err}")
            continue
        profiles = engine.io.profiles
        for i, (x, shape, dtype) in enumerate(zip(flat, engine.io.input_shapes, engine.io.input_dtypes)):
            fits = profiles is not None or list(x.shape) == list(shape)   # ranges: checked below
            if not fits or str(x.dtype).replace("torch.", "") != dtype:
                problems.append(f"sample {s}, tensor input {i}: {str(x.dtype).replace('torch.', '')}{list(x.shape)} "
                                f"where the engine takes {dtype}{list(shape)}")
        if profiles is not None:
            try:
                profiles.profile_for([tuple(x.shape) for x in flat])
            except ShapeRangeError as err:
                problems.append(f"sample {s}: {err}")
    if problems:
        raise ValueError("verify_inputs do not fit the engine (nothing was refitted):\n"
                         + "\n".join(f"  - {p}" for p in problems))
    return [Inputs(*args, **kwargs) for args, kwargs in calls]
