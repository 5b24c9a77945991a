"""Stable fingerprints of a model's architecture and of everything else a compiled engine depends
on, without exporting: the key of the engine cache.

The same code gives the same fingerprint in every process, on every machine and in every
pytest-xdist worker: nothing hashed may contain a memory address, a hash-randomised ordering or
a file path. Code objects are hashed by their bytecode, names and constants, with constants
normalised recursively (a nested code object, e.g. a generator expression inside ``forward``,
by its own digest; ``repr`` of it would print its address). Python bytecode differs between
Python minor versions, so a key is only shared between interpreters of one minor version.

What the key covers (:func:`cache_key`; :func:`compile_key` for ``refitcore.compile``'s options):
the architecture (:func:`architecture_entries`: every
submodule's path and class, the code of user-defined classes and of the user functions and
module constants that code names, configuration attributes, hooks, state_dict names/shapes/
dtypes, tied groups, values of non-persistent buffers and tensor attributes, which become
constants of the engine), the input spec (shapes, dtypes, pytree structure, dynamic-shape
profiles, or any spec object with ``to_json()``), the backend, the precision, and the toolchain
(this package's format versions and source files, torch's version, TensorRT's flavour and
version). Library code (torch, the standard library, anything installed in site-packages) is
identified by qualified name and pinned by the library's version, not hashed: library modules may
hold per-process values (a session uuid) that hashing would pick up, and their code only changes
with their version. User code (a checkout, an editable install) is hashed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import site
import sys
import sysconfig
import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from refitcore import _trt
from refitcore.engine.bundle import BUNDLE_VERSION
from refitcore.engine.options import CompileOptions

__all__ = ["CacheKey", "cache_key", "compile_key", "architecture_fingerprint", "architecture_entries",
           "input_signature", "toolchain_signature", "code_digest", "function_digest", "CACHE_FORMAT_VERSION"]

CACHE_FORMAT_VERSION = 2                # 2: entries are weightless engines
_PRIMS = (bool, int, str, bytes, type(None))
_MAX_DEPTH = 6


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _library(obj: Any) -> str | None:
    """The installed library that defines ``obj`` ('torch', 'python' for the standard library,
    'transformers==5.24.0'...), or None for user code. A library's code is identified by qualified
    name and pinned by the library's version instead of being hashed: library modules may hold
    per-process values (``transformers.utils.hub.SESSION_ID`` is a fresh uuid in every process)
    that code reachable from a model names."""
    mod = getattr(obj, "__module__", None)
    return _library_of_module(mod) if isinstance(mod, str) and mod else None


@functools.cache
def _library_of_module(modname: str) -> str | None:
    top = modname.partition(".")[0]
    if top == "__main__":
        return None                              # a script, even one run from an installed package: hashed
    module = sys.modules.get(modname) or sys.modules.get(top)
    file = getattr(module, "__file__", None)
    path = os.path.realpath(file) if isinstance(file, str) else None
    if top == "torch" and (path is None or _under(path, _site_directories())):
        return "torch"                           # its version is in the toolchain signature
    # By location too: a user package named like a standard module (`trace`, `code`) is user code.
    if (top in getattr(sys, "stdlib_module_names", ()) or top == "builtins") and (
            path is None or _under(path, _stdlib_directories())):
        return "python"                          # pinned by the interpreter's version (toolchain)
    if path is None or not _under(path, _site_directories()):
        return None                              # user code (a checkout, an editable install): hashed
    version = getattr(sys.modules.get(top), "__version__", None)
    if not isinstance(version, str):
        dists = importlib.metadata.packages_distributions().get(top, [])
        version = ",".join(sorted(f"{d} {importlib.metadata.version(d)}" for d in dists)) or "unknown"
    return f"{top}=={version}"


@functools.lru_cache(maxsize=1)
def _site_directories() -> tuple[str, ...]:
    dirs: set[str] = set()
    for getter in (lambda: site.getsitepackages(), lambda: [site.getusersitepackages()],
                   lambda: [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]):
        with contextlib.suppress(AttributeError, OSError):  # site.getsitepackages is missing in some virtualenvs
            dirs.update(os.path.realpath(d) for d in getter() if d)
    return tuple(sorted(dirs))


@functools.lru_cache(maxsize=1)
def _stdlib_directories() -> tuple[str, ...]:
    return tuple(sorted({os.path.realpath(p) for p in (sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"))
                         if p}))


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


# -- code --------------------------------------------------------------------------------------
# Code objects are immutable: a digest is memoised per object, keeping the object alive so that
# its id cannot be reused by another one.
_CODE_MEMO: dict[int, tuple[types.CodeType, str]] = {}


def code_digest(code: types.CodeType) -> str:
    """Digest of a code object: bytecode, names, argument layout and normalised constants (nested
    code objects by their own digest). No file name, line numbers or addresses."""
    hit = _CODE_MEMO.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    parts = [code.co_name, getattr(code, "co_qualname", code.co_name), code.co_argcount,
             code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, code.co_code.hex(),
             list(code.co_names), list(code.co_varnames), list(code.co_freevars), list(code.co_cellvars),
             [_const(c) for c in code.co_consts]]
    digest = _sha(parts)[:32]
    _CODE_MEMO[id(code)] = (code, digest)
    return digest


def _const(c: Any):
    """A code constant as JSON, identical in every process."""
    if isinstance(c, types.CodeType):
        return ["code", code_digest(c)]
    if isinstance(c, float):
        return ["float", repr(c)]
    if isinstance(c, complex):
        return ["complex", repr(c)]
    if isinstance(c, _PRIMS):
        return [type(c).__name__, repr(c)]
    if c is Ellipsis:
        return ["ellipsis"]
    if isinstance(c, tuple):
        return ["tuple", [_const(x) for x in c]]
    if isinstance(c, frozenset):
        # A frozenset's iteration order follows string hashes, randomised per process.
        return ["frozenset", sorted((_const(x) for x in c), key=json.dumps)]
    return ["object", _qualname(type(c))]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


# Digests already computed during one architecture_entries() call, by (kind, id): code reachable
# along many paths (a library's functions naming each other's classes) is digested once, not once
# per path (exponential on transformers models). Per call, so a fingerprint never depends on what
# an earlier call computed; the traversal order is fixed, so it stays equal across processes.
_MEMO: dict | None = None


def _memoized(kind: str, fn):
    def wrapper(obj, _seen: frozenset = frozenset()):
        if _MEMO is None:
            return fn(obj, _seen)
        key = (kind, id(obj))
        hit = _MEMO.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        # A digest of the digest: shared code appears once per entry as a short hash, so the JSON
        # hashed stays small however often it is reached.
        out = [kind, _sha(fn(obj, _seen))]
        _MEMO[key] = (obj, out)     # the object is kept so that its id is not reused meanwhile
        return out

    wrapper.__doc__, wrapper.__name__, wrapper.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
    return wrapper


def function_digest(fn: Any, _seen: frozenset = frozenset()) -> Any:
    """A function as JSON: its code, defaults, closure values, and the user functions, classes and
    constants its code names from its module's globals (torch's own functions by name only)."""
    if isinstance(fn, functools.partial):
        return ["partial", function_digest(fn.func, _seen), [_value(a, 1, _seen) for a in fn.args],
                {k: _value(v, 1, _seen) for k, v in sorted(fn.keywords.items())}]
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    while hasattr(fn, "__wrapped__") and not _library(fn):
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    if code is None or _library(fn):
        return ["callable", _qualname(fn), _library(fn)]
    if id(fn) in _seen:                          # recursion (a function naming itself)
        return ["recursive", _qualname(fn)]
    seen = _seen | {id(fn)}
    closure = [_value(cell.cell_contents, 1, seen) if _cell_full(cell) else None for cell in (fn.__closure__ or ())]
    used = {}
    glb = getattr(fn, "__globals__", {})
    for name in sorted(_global_names(code)):
        if name not in glb:
            continue
        v = glb[name]
        if isinstance(v, types.ModuleType):
            continue
        if isinstance(v, type):
            used[name] = class_digest(v, seen)       # a library class: by name, version and patched members
        elif isinstance(v, types.FunctionType) and _library(v):
            used[name] = ["library", _qualname(v), _library(v)]
        elif isinstance(v, types.FunctionType):
            used[name] = function_digest(v, seen)
        elif isinstance(v, (_PRIMS, float, tuple, frozenset, enum.Enum)):
            used[name] = _value(v, 1, seen)
    return ["function", _qualname(fn), code_digest(code), _value(getattr(fn, "__defaults__", None), 1, seen),
            _value(getattr(fn, "__kwdefaults__", None), 1, seen), closure, used]


function_digest = _memoized("function", function_digest)


def _cell_full(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


def class_digest(cls: type, _seen: frozenset = frozenset()) -> Any:
    """A class as JSON: for user classes every function it and its bases define (methods,
    static/class methods, properties); a library class by qualified name, library version and the
    methods other modules assigned to it."""
    out = []
    for klass in cls.__mro__:
        if _library(klass):
            out.append(["class", _qualname(klass), _library(klass)] + _patched_members(klass, _seen))
            continue
        if id(klass) in _seen:
            out.append(["recursive", _qualname(klass)])
            continue
        seen = _seen | {id(klass)}
        members = []
        for name, member in sorted(vars(klass).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                members.append([name, [function_digest(f, seen) if f else None
                                       for f in (member.fget, member.fset)]])
            elif isinstance(member, (types.FunctionType, functools.partial)):
                members.append([name, function_digest(member, seen)])
            elif not name.startswith("__") and isinstance(member, (_PRIMS, float, tuple, frozenset)):
                members.append([name, _value(member, 1, seen)])
        out.append(["class", _qualname(klass), members])
    return out


class_digest = _memoized("class", class_digest)


def _patched_members(klass: type, seen: frozenset) -> list:
    """The methods of a library class that user code assigned to it (``Block.forward = patched``, a
    common way to swap attention): hashed, since the library's version does not pin them.

    Members another *installed library* assigned (transformers adds ``torch.nn.Module.smart_apply``
    the first time any of its models is built) are not: they would give one model two keys in one
    process, before and after that library's import, and a library's own patches are pinned by its
    version whenever its code is part of the model. (Functions a library's code names from its module
    globals are not followed either: a patch of a library module's global is not seen.)"""
    out = []
    for name, member in sorted(vars(klass).items()):
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        funcs = [f for f in ((member.fget, member.fset) if isinstance(member, property) else (member,))
                 if isinstance(f, (types.FunctionType, functools.partial))]
        if any(_library(f) is None for f in funcs):
            out.append([name, [function_digest(f, seen) for f in funcs]])
    return out


# -- values (module attributes, closure contents, constants) --------------------------------
def _tensor_value(t: torch.Tensor) -> list:
    t = t.detach()
    if t.is_meta or t.layout != torch.strided:
        return ["tensor", list(t.shape), str(t.dtype)]
    data = t.cpu().contiguous().reshape(-1)
    try:
        blob = data.numpy().tobytes()
    except TypeError:                         # bfloat16, float8...: numpy has no such dtype
        blob = data.view(torch.uint8).numpy().tobytes()
    return ["tensor", list(t.shape), str(t.dtype), hashlib.sha256(blob).hexdigest()[:32]]


def _value(v: Any, depth: int = 0, seen: frozenset = frozenset()):
    """Any attribute value as JSON without addresses: containers recursively, tensors by shape, dtype
    and content hash, functions by :func:`function_digest`, other objects by class and fields."""
    if isinstance(v, float):
        return ["float", repr(v) if math.isfinite(v) else str(v)]
    if isinstance(v, _PRIMS):
        return v if not isinstance(v, bytes) else ["bytes", v.hex()]
    if isinstance(v, enum.Enum):
        return ["enum", _qualname(type(v)), v.name]
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return ["torch", str(v)]
    if isinstance(v, torch.Tensor):
        return _tensor_value(v)
    if depth > _MAX_DEPTH:
        return ["deep", _qualname(type(v))]
    if isinstance(v, (list, tuple)):
        return [type(v).__name__, [_value(x, depth + 1, seen) for x in v]]
    if isinstance(v, (set, frozenset)):
        return ["set", sorted((_value(x, depth + 1, seen) for x in v), key=json.dumps)]
    if isinstance(v, Mapping):
        return ["dict", sorted(([json.dumps(_value(k, depth + 1, seen)), _value(x, depth + 1, seen)]
                                for k, x in v.items()), key=lambda kv: kv[0])]
    if isinstance(v, torch.nn.Module):
        return ["module", _qualname(type(v))]     # a submodule: covered by its own entry
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial, types.BuiltinFunctionType)):
        return function_digest(v, seen)
    if isinstance(v, type):
        return class_digest(v, seen)
    if dataclasses.is_dataclass(v) or hasattr(v, "__dict__"):
        fields = {k: x for k, x in vars(v).items() if not k.startswith("_")} if hasattr(v, "__dict__") else {}
        return ["object", _qualname(type(v)), _value(fields, depth + 1, seen)]
    return ["object", _qualname(type(v))]


# -- the architecture ---------------------------------------------------------------------------
def _module_entry(path: str, m: torch.nn.Module) -> list:
    cls = type(m)
    attrs = {k: _value(v) for k, v in vars(m).items()
             if not k.startswith("_") and k != "training" and not isinstance(v, torch.nn.Module)}
    hooks = [[kind, [function_digest(h) for h in getattr(m, kind, {}).values()]]
             for kind in ("_forward_pre_hooks", "_forward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")]
    # Non-persistent buffers are not in the state_dict but become engine constants: their values count.
    extra = {k: _tensor_value(b) for k, b in m._buffers.items()
             if b is not None and k in m._non_persistent_buffers_set}
    return ["module", path, class_digest(cls), attrs,
            [h for h in hooks if h[1]], extra]


def architecture_entries(model: torch.nn.Module) -> list:
    """The list :func:`architecture_fingerprint` hashes (JSON), to say what differs between two."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    global _MEMO
    outer, _MEMO = _MEMO, {} if _MEMO is None else _MEMO
    try:
        entries = [_module_entry(path, m) for path, m in model.named_modules(remove_duplicate=False)]
    finally:
        _MEMO = outer
    first: dict[int, str] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        tied = first.setdefault(id(t), k)
        entries.append(["tensor", k, list(t.shape), str(t.dtype), tied if tied != k else None])
    return entries


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """A hex digest of ``model``'s architecture (not its weights), equal across processes."""
    return _sha(architecture_entries(model))


# -- inputs -------------------------------------------------------------------------------------
def _treespec(spec) -> list:
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    if spec.is_leaf():
        return ["*"]
    return [_qualname(spec.type), _value(spec.context), [_treespec(c) for c in children]]


def _dynamic(d: Any, depth: int = 0):
    if d is None or isinstance(d, (_PRIMS, float)):
        return _value(d)
    if isinstance(d, (list, tuple)):
        return [_dynamic(x, depth + 1) for x in d]
    if isinstance(d, Mapping):
        return sorted([str(k), _dynamic(x, depth + 1)] for k, x in d.items())
    if hasattr(d, "min") and hasattr(d, "max"):           # torch.export.Dim and derived dims
        return ["dim", getattr(d, "__name__", type(d).__name__), _value(d.min), _value(d.max)]
    return _value(d)


def input_signature(args: Any, kwargs: Mapping[str, Any] | None = None, *, dynamic_shapes: Any = None,
                    spec: Any = None) -> list:
    """The input spec as JSON: pytree structure, each leaf's shape and dtype (other leaves by value),
    the dynamic-shape profile, and ``spec.to_json()`` when a spec object is given."""
    if isinstance(args, torch.Tensor):
        args = (args,)
    leaves, tree = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    shown = [["tensor", list(x.shape), str(x.dtype)] if isinstance(x, torch.Tensor) else _value(x) for x in leaves]
    out = [_treespec(tree), shown, _dynamic(dynamic_shapes)]
    if spec is not None:
        out.append(spec.to_json() if hasattr(spec, "to_json") else _value(spec))
    return out


# -- the toolchain ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    """Digest of this package's own source files: a fix to a converter or recipe invalidates every
    cached engine built before it."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def toolchain_signature() -> dict:
    """Versions that change what an engine is: formats, this package's code, torch, TensorRT, Python."""
    trt = f"{_trt.flavour()} {_trt.version()}" if _trt.available() else "none"
    return {"cache_format": CACHE_FORMAT_VERSION, "bundle_format": BUNDLE_VERSION, "sources": _sources_digest(),
            "torch": torch.__version__, "tensorrt": trt, "python": "{}.{}".format(*sys.version_info[:2])}


# -- the key ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheKey:
    """The engine cache's key: ``digest`` (hex) over ``parts`` (each component's digest)."""

    parts: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        return _sha([list(p) for p in self.parts])

    def __str__(self) -> str:
        return self.digest

    def to_json(self) -> dict:
        return dict(self.parts)

    @classmethod
    def from_json(cls, d: Mapping[str, str]) -> CacheKey:
        return cls(tuple(sorted((str(k), str(v)) for k, v in d.items())))

    def differences(self, other: CacheKey) -> list[str]:
        """The components in which two keys differ ('architecture', 'inputs', ...)."""
        a, b = dict(self.parts), dict(other.parts)
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def cache_key(model: torch.nn.Module, example_inputs: Any, *, backend: str, precision: str = "fp32",
              kwargs: Mapping[str, Any] | None = None, dynamic_shapes: Any = None, input_spec: Any = None,
              options: Mapping[str, Any] | None = None, architecture: str | None = None) -> CacheKey:
    """The key under which an engine of ``model`` for these inputs is cached. ``backend`` is a
    resolved backend name ('reference' or 'tensorrt'), not 'auto'. ``options``: the other compile
    options that change the engine (partitioning, shape profiles...). ``architecture`` reuses a
    fingerprint the caller already has."""
    if backend == "auto":
        raise ValueError("cache_key needs the resolved backend ('reference' or 'tensorrt'), not 'auto'")
    parts = {
        "architecture": architecture or architecture_fingerprint(model),
        "inputs": _sha(input_signature(example_inputs, kwargs, dynamic_shapes=dynamic_shapes, spec=input_spec)),
        "backend": backend,
        "precision": str(precision),
        "options": _sha(_value(dict(options or {}))),
        "toolchain": _sha(toolchain_signature()),
    }
    return CacheKey.from_json(parts)



def compile_key(model: torch.nn.Module, args: Any, options: CompileOptions, *,
                kwargs: Mapping[str, Any] | None = None) -> CacheKey:
    """The key of ``refitcore.compile(model, args, kwargs=kwargs, **options)``: the backend (resolved in
    ``options``), the precision, the dynamic shapes and the other options that change the engine
    (:meth:`refitcore.engine.options.CompileOptions.key_fields`). Options that do not change the
    engine (``model_factory``, ``verbose``) are not hashed."""
    return cache_key(model, args, kwargs=kwargs, backend=options.backend, precision=options.precision,
                     dynamic_shapes=options.dynamic_shapes, options=options.key_fields())
