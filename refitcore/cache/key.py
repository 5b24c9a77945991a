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
import dis
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
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from refitcore import _trt
from refitcore.engine.bundle import BUNDLE_VERSION
from refitcore.engine.options import CompileOptions

__all__ = ["CacheKey", "cache_key", "compile_key", "Architecture", "architecture", "architecture_fingerprint",
           "architecture_entries", "input_signature", "toolchain_signature", "code_digest", "function_digest",
           "CACHE_FORMAT_VERSION"]

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
    installed = path is not None and (_under(path, _site_directories()) or _owned_by_distribution(top, file))
    if top == "torch" and (path is None or installed):
        return "torch"                           # its version is in the toolchain signature
    # By location too: a user package named like a standard module (`trace`, `code`) is user code.
    if (top in getattr(sys, "stdlib_module_names", ()) or top == "builtins") and (
            path is None or _under(path, _stdlib_directories())):
        return "python"                          # pinned by the interpreter's version (toolchain)
    if not installed:
        return None                              # user code (a checkout, an editable install): hashed
    version = getattr(sys.modules.get(top), "__version__", None)
    if not isinstance(version, str):
        dists = _packages_distributions().get(top, [])
        version = ",".join(sorted(f"{d} {importlib.metadata.version(d)}" for d in dists)) or "unknown"
    return f"{top}=={version}"


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _owned_by_distribution(top: str, file: Any) -> bool:
    """True when an installed distribution's file list (its RECORD) holds ``file``: a library
    importable from PYTHONPATH, a ``pip install --target`` folder or a monorepo's third-party tree is
    a library wherever it lies. An editable install lists a finder or a ``.pth`` file, not the
    checkout's sources, so those stay user code."""
    if not isinstance(file, str):
        return False
    for dist in _packages_distributions().get(top, []):
        root, files = _distribution_files(dist)
        for path, base in ((os.path.abspath(file), root[0]), (os.path.realpath(file), root[1])):
            if _under(path, (base,)) and os.path.relpath(path, base) in files:
                return True
    return False


@functools.cache
def _distribution_files(name: str) -> tuple[tuple[str, str], frozenset[str]]:
    """(the folder a distribution is installed in, as given and resolved; its files relative to it)."""
    try:
        dist = importlib.metadata.distribution(name)
        base = str(dist.locate_file(""))
        files = frozenset(os.path.normpath(str(f)) for f in dist.files or ())
    except (importlib.metadata.PackageNotFoundError, OSError, TypeError):
        return ("\0", "\0"), frozenset()
    return (os.path.abspath(base), os.path.realpath(base)), files


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


def _global_names(code: types.CodeType) -> tuple[set[str], set[str]]:
    """(the globals ``code`` and its nested code load, every name it uses: attribute names too)."""
    hit = _NAMES_MEMO.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    loads = {str(ins.argval) for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            inner_loads, inner_names = _global_names(c)
            loads |= inner_loads
            names |= inner_names
    _NAMES_MEMO[id(code)] = (code, (loads, names))
    return loads, names


_NAMES_MEMO: dict[int, tuple[types.CodeType, tuple[set[str], set[str]]]] = {}


class _Walk:
    """One fingerprint computation: digests already computed, by (kind, id) (code reachable along
    many paths, a library's functions naming each other's classes, is digested once, not once per
    path: exponential on transformers models), the model's own modules and tensors (named by path, not
    by value), where the walk is, and the reasons the fingerprint is incomplete. Per call, so a
    fingerprint never depends on what an earlier call computed; the traversal order is fixed, so it
    stays equal across processes."""

    def __init__(self, model: torch.nn.Module | None = None):
        self.memo: dict = {}
        self.reasons: list[str] = []
        self.where = "the model"
        self.modules = {id(m): p for p, m in model.named_modules(remove_duplicate=False)} if model is not None else {}
        self.tensors = ({id(t): k for k, t in model.state_dict(keep_vars=True).items()}
                        if model is not None else {})


_WALK: _Walk | None = None


@contextlib.contextmanager
def _walking(model: torch.nn.Module | None = None) -> Iterator[_Walk]:
    """The current walk, or a new one for ``model`` (the outermost call owns it)."""
    global _WALK
    if _WALK is not None:
        yield _WALK
        return
    _WALK = _Walk(model)
    try:
        yield _WALK
    finally:
        _WALK = None


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """Name the place the walk is at, for the reasons it gives."""
    walk = _WALK
    if walk is None:
        yield
        return
    outer, walk.where = walk.where, where
    try:
        yield
    finally:
        walk.where = outer


def _incomplete(what: str) -> None:
    """The value at the walk's place cannot be hashed stably: the key does not cover it."""
    if _WALK is not None:
        reason = f"{_WALK.where}: {what}"
        if reason not in _WALK.reasons:
            _WALK.reasons.append(reason)


def _memoized(kind: str, fn):
    def wrapper(obj, _seen: frozenset = frozenset()):
        if _WALK is None:
            return fn(obj, _seen)
        key = (kind, id(obj))
        hit = _WALK.memo.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        # A digest of the digest: shared code appears once per entry as a short hash, so the JSON
        # hashed stays small however often it is reached.
        out = [kind, _sha(fn(obj, _seen))]
        _WALK.memo[key] = (obj, out)     # the object is kept so that its id is not reused meanwhile
        return out

    wrapper.__doc__, wrapper.__name__, wrapper.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
    return wrapper


def function_digest(fn: Any, _seen: frozenset = frozenset()) -> Any:
    """A function as JSON: its code, defaults, closure values, and every global its code loads from
    its module (user functions, classes and constants of any type; of a user module, the attributes
    the code names; torch's own functions by name only)."""
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
    with _at(f"a closure variable of {_qualname(fn)}"):
        closure = [_value(cell.cell_contents, 1, seen) if _cell_full(cell) else None
                   for cell in (fn.__closure__ or ())]
    used = {}
    glb = getattr(fn, "__globals__", {})
    loads, names = _global_names(code)
    for name in sorted(loads):
        if name not in glb:
            continue
        v = glb[name]
        with _at(f"global {name!r} read by {_qualname(fn)}"):
            if isinstance(v, types.ModuleType):
                if not _library(v):
                    used[name] = _module_globals(v, names, seen)
            elif isinstance(v, type):
                used[name] = class_digest(v, seen)   # a library class: by name, version and patched members
            elif isinstance(v, types.FunctionType) and _library(v):
                used[name] = ["library", _qualname(v), _library(v)]
            elif isinstance(v, types.FunctionType):
                used[name] = function_digest(v, seen)
            else:
                used[name] = _value(v, 1, seen)
    return ["function", _qualname(fn), code_digest(code), _value(getattr(fn, "__defaults__", None), 1, seen),
            _value(getattr(fn, "__kwdefaults__", None), 1, seen), closure, used]


function_digest = _memoized("function", function_digest)


def _module_globals(mod: types.ModuleType, names: set[str], seen: frozenset) -> list:
    """A user Python module (a config module) that code reads: its attributes the code names."""
    if id(mod) in seen:
        return ["recursive", mod.__name__]
    seen = seen | {id(mod)}
    attrs = vars(mod)
    out = []
    for name in sorted(n for n in names if n in attrs and not n.startswith("__")):
        v = attrs[name]
        if isinstance(v, types.ModuleType):
            out.append([name, _module_globals(v, names, seen) if not _library(v) else ["library", v.__name__]])
        else:
            out.append([name, _value(v, 1, seen)])
    return ["pymodule", mod.__name__, out]


def _cell_full(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


# Class members that hold no behaviour: the ABC machinery's cache, slot descriptors.
_SKIPPED_MEMBERS = frozenset({"_abc_impl"})
_DESCRIPTORS = (types.MemberDescriptorType, types.GetSetDescriptorType, types.WrapperDescriptorType)


def class_digest(cls: type, _seen: frozenset = frozenset()) -> Any:
    """A class as JSON: for user classes every function it and its bases define (methods,
    static/class methods, properties) and every other class attribute by value; a library class by
    qualified name, library version and the methods other modules assigned to it."""
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
            elif isinstance(member, functools.cached_property):
                members.append([name, function_digest(member.func, seen)])
            elif isinstance(member, (types.FunctionType, functools.partial)):
                members.append([name, function_digest(member, seen)])
            elif not (name.startswith("__") and name.endswith("__")) and name not in _SKIPPED_MEMBERS \
                    and not isinstance(member, _DESCRIPTORS):
                with _at(f"class attribute {_qualname(klass)}.{name}"):
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
        if not t.is_meta:
            _incomplete(f"a {t.layout} tensor: its values are not hashed")
        return ["tensor", list(t.shape), str(t.dtype)]
    data = t.cpu().contiguous().reshape(-1)
    try:
        blob = data.numpy().tobytes()
    except TypeError:                         # bfloat16, float8...: numpy has no such dtype
        blob = data.view(torch.uint8).numpy().tobytes()
    return ["tensor", list(t.shape), str(t.dtype), hashlib.sha256(blob).hexdigest()[:32]]


def _value(v: Any, depth: int = 0, seen: frozenset = frozenset()):
    """Any attribute value as JSON without addresses: containers recursively, tensors by shape, dtype
    and content hash (the model's own parameters and buffers by name), modules by their architecture
    and tensors (the model's own submodules by path), functions by :func:`function_digest`, classes
    by :func:`class_digest`, other objects by class and fields. A value that cannot be hashed stably
    (an object without fields, a nesting deeper than ``_MAX_DEPTH``) makes the walk incomplete."""
    if isinstance(v, float):
        return ["float", repr(v) if math.isfinite(v) else str(v)]
    if isinstance(v, _PRIMS):
        return v if not isinstance(v, bytes) else ["bytes", v.hex()]
    if isinstance(v, enum.Enum):
        return ["enum", _qualname(type(v)), v.name]
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return ["torch", str(v)]
    if isinstance(v, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ["op", str(v)]
    if isinstance(v, torch.Tensor):
        if _WALK is not None and id(v) in _WALK.tensors:
            return ["state", _WALK.tensors[id(v)]]     # one of the model's parameters or buffers
        return _tensor_value(v)
    if isinstance(v, torch.nn.Module):
        if _WALK is not None and id(v) in _WALK.modules:
            return ["submodule", _WALK.modules[id(v)]]  # covered by its own entry
        return _module_value(v, seen)
    if depth > _MAX_DEPTH:
        _incomplete(f"a value nested deeper than {_MAX_DEPTH} levels (a {_qualname(type(v))})")
        return ["deep", _qualname(type(v))]
    if isinstance(v, (list, tuple)):
        return [type(v).__name__, [_value(x, depth + 1, seen) for x in v]]
    if isinstance(v, (set, frozenset)):
        return ["set", sorted((_value(x, depth + 1, seen) for x in v), key=json.dumps)]
    if isinstance(v, Mapping):
        return ["dict", sorted(([json.dumps(_value(k, depth + 1, seen)), _value(x, depth + 1, seen)]
                                for k, x in v.items()), key=lambda kv: kv[0])]
    if isinstance(v, (range, slice)):
        return [type(v).__name__, _value([v.start, v.stop, v.step])]
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial, types.BuiltinFunctionType)):
        return function_digest(v, seen)
    if isinstance(v, type):
        return class_digest(v, seen)
    if isinstance(v, types.ModuleType):
        if not _library(v):
            _incomplete(f"a user Python module ({v.__name__}) held as a value: which attributes count is unknown")
        return ["pymodule", v.__name__, _library(v)]
    if type(v).__module__ == "numpy" and hasattr(v, "dtype") and getattr(v.dtype, "hasobject", True) is False:
        arr = np.ascontiguousarray(v)
        return ["ndarray", list(arr.shape), str(arr.dtype), hashlib.sha256(arr.tobytes()).hexdigest()[:32]]
    fields = _fields(v)
    if fields is None:
        _incomplete(f"a {_qualname(type(v))} object: no fields to hash, its value is not covered")
        return ["object", _qualname(type(v))]
    return ["object", class_digest(type(v), seen), _value(fields, depth + 1, seen)]


def _fields(v: Any) -> dict | None:
    """An object's fields: every one of a user class's object; of a library class's object (a
    transformers config) the public ones, as its private ones may hold per-process values (a hash of
    a string). None for an object without fields."""
    if hasattr(v, "__dict__"):
        fields = dict(vars(v))
    elif dataclasses.is_dataclass(v):
        fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    else:
        return None
    if _library(type(v)):
        fields = {k: x for k, x in fields.items() if not k.startswith("_")}
    return fields


def _module_value(m: torch.nn.Module, seen: frozenset) -> list:
    """An ``nn.Module`` that is not part of the model (a module global, a class attribute, one held
    in a plain list): its architecture and its tensors' values, which become engine constants."""
    if id(m) in seen:
        return ["recursive", _qualname(type(m))]
    seen = seen | {id(m)}
    entries = [_module_entry(p, s, seen) for p, s in m.named_modules(remove_duplicate=False)]
    with _at(f"a module of class {_qualname(type(m))} outside the model"):
        tensors = [[k, _tensor_value(t)] for k, t in m.state_dict(keep_vars=True).items()]
    return ["module", entries, tensors]


# -- the architecture ---------------------------------------------------------------------------
# nn.Module's own bookkeeping in every instance's __dict__: parameters, buffers and submodules
# (entries of their own), hooks (hashed below; backward hooks do not change inference), training.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _module_entry(path: str, m: torch.nn.Module, seen: frozenset = frozenset()) -> list:
    cls = type(m)
    attrs = {}
    for k, v in vars(m).items():
        if k not in _MODULE_INTERNALS:
            with _at(f"attribute {k!r} of {path or 'the model'} ({cls.__name__})"):
                attrs[k] = _value(v, 0, seen)
    flags = (getattr(m, "_forward_pre_hooks_with_kwargs", {}), getattr(m, "_forward_hooks_with_kwargs", {}),
             getattr(m, "_forward_hooks_always_called", {}))
    hooks = [[kind, [[function_digest(h)] + [hid in f for f in flags] for hid, h in getattr(m, kind, {}).items()]]
             for kind in _HOOKS]
    # Non-persistent buffers are not in the state_dict but become engine constants: their values count.
    extra = {k: _tensor_value(b) for k, b in m._buffers.items()
             if b is not None and k in m._non_persistent_buffers_set}
    return ["module", path, class_digest(cls), attrs,
            [h for h in hooks if h[1]], extra]


def architecture_entries(model: torch.nn.Module) -> list:
    """The list :func:`architecture_fingerprint` hashes (JSON), to say what differs between two.
    A value the walk cannot hash stably adds an ``incomplete`` entry naming it."""
    return _architecture(model)[0]


def _architecture(model: torch.nn.Module) -> tuple[list, tuple[str, ...]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    with _walking(model) as walk:
        first = len(walk.reasons)
        entries = [_module_entry(path, m) for path, m in model.named_modules(remove_duplicate=False)]
        glob = torch.nn.modules.module
        with _at("a global forward hook"):
            hooks = [[kind, [function_digest(h) for h in getattr(glob, kind, {}).values()]]
                     for kind in ("_global_forward_pre_hooks", "_global_forward_hooks")]
        if any(h[1] for h in hooks):
            entries.append(["global hooks", hooks])
        reasons = tuple(walk.reasons[first:])
    tied: dict[int, str] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        name = tied.setdefault(id(t), k)
        entries.append(["tensor", k, list(t.shape), str(t.dtype), name if name != k else None])
    if reasons:
        entries.append(["incomplete", list(reasons)])
    return entries, reasons


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model's architecture fingerprint (``digest``, hex) and what it cannot see: ``complete`` is
    False when some value ``forward`` may read could not be hashed stably (``incomplete_reasons``
    names each, with where it is)."""

    digest: str
    incomplete_reasons: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.incomplete_reasons


def architecture(model: torch.nn.Module) -> Architecture:
    """:func:`architecture_fingerprint` with the reasons it is incomplete, if any."""
    entries, reasons = _architecture(model)
    return Architecture(_sha(entries), reasons)


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """A hex digest of ``model``'s architecture (not its weights), equal across processes."""
    return architecture(model).digest


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
    """The engine cache's key: ``digest`` (hex) over ``parts`` (each component's digest).

    ``complete`` is False when something the model's ``forward`` may read could not be hashed
    stably (``incomplete_reasons`` says what and where): two models that differ only there get one
    key, so :func:`refitcore.compile` serves a hit of an incomplete key only when it can verify it.
    Completeness is not part of the key's identity (equality, :meth:`to_json`)."""

    parts: tuple[tuple[str, str], ...]
    incomplete_reasons: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def digest(self) -> str:
        return _sha([list(p) for p in self.parts])

    @property
    def complete(self) -> bool:
        return not self.incomplete_reasons

    def __str__(self) -> str:
        return self.digest

    def to_json(self) -> dict:
        return dict(self.parts)

    @classmethod
    def from_json(cls, d: Mapping[str, str], incomplete_reasons: tuple[str, ...] = ()) -> CacheKey:
        return cls(tuple(sorted((str(k), str(v)) for k, v in d.items())), tuple(incomplete_reasons))

    def differences(self, other: CacheKey) -> list[str]:
        """The components in which two keys differ ('architecture', 'inputs', ...)."""
        a, b = dict(self.parts), dict(other.parts)
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def cache_key(model: torch.nn.Module, example_inputs: Any, *, backend: str, precision: str = "fp32",
              kwargs: Mapping[str, Any] | None = None, dynamic_shapes: Any = None, input_spec: Any = None,
              options: Mapping[str, Any] | None = None) -> CacheKey:
    """The key under which an engine of ``model`` for these inputs is cached. ``backend`` is a
    resolved backend name ('reference' or 'tensorrt'), not 'auto'. ``options``: the other compile
    options that change the engine (partitioning, shape profiles...)."""
    if backend == "auto":
        raise ValueError("cache_key needs the resolved backend ('reference' or 'tensorrt'), not 'auto'")
    with _walking(model) as walk:
        arch = architecture(model)
        with _at("the inputs"):
            inputs = _sha(input_signature(example_inputs, kwargs, dynamic_shapes=dynamic_shapes, spec=input_spec))
        with _at("the compile options"):
            opts = _sha(_value(dict(options or {})))
        reasons = tuple(walk.reasons)
    parts = {
        "architecture": arch.digest,
        "inputs": inputs,
        "backend": backend,
        "precision": str(precision),
        "options": opts,
        "toolchain": _sha(toolchain_signature()),
    }
    return CacheKey.from_json(parts, reasons)


def compile_key(model: torch.nn.Module, args: Any, options: CompileOptions, *,
                kwargs: Mapping[str, Any] | None = None) -> CacheKey:
    """The key of ``refitcore.compile(model, args, kwargs=kwargs, **options)``: the backend (resolved in
    ``options``), the precision, the dynamic shapes and the other options that change the engine
    (:meth:`refitcore.engine.options.CompileOptions.key_fields`). Options that do not change the
    engine (``model_factory``, ``verbose``) are not hashed."""
    return cache_key(model, args, kwargs=kwargs, backend=options.backend, precision=options.precision,
                     dynamic_shapes=options.dynamic_shapes, options=options.key_fields())
