"""Dynamic input shapes: the ranges an engine accepts (optimization profiles), as data.

An engine built with ``dynamic_shapes=`` accepts, per input, any shape whose every dimension lies
inside a range ``(min, opt, max)``; TensorRT tunes its kernels for ``opt``. This module turns the
forms a caller may write into two things: the ``dynamic_shapes`` argument of ``torch.export``
(``torch.export.Dim`` objects) and a :class:`ShapeProfiles` record (plain data, saved with the
engine) that the backends turn into optimization profiles.

Accepted forms of ``dynamic_shapes`` (example inputs give ``opt`` unless it is written):

- torch.export's own: ``{"x": {0: Dim("batch", min=1, max=8)}}`` or a tuple with one entry per
  input (``({0: batch},)``), exactly as ``torch.export.export`` takes it;
- per input, by name or position: ``{"x": {0: (1, 8)}}`` (min, max) or ``{0: {0: (1, 4, 8)}}``
  (min, opt, max);
- per input, a tuple with one entry per dimension: ``{"x": ((1, 8), 3, 64, 64)}`` (an int or
  ``None`` is a static dimension).

A range may be a :class:`DimRange` with a ``name``: dimensions that share a name are one
dimension (e.g. the sequence length of ``input_ids`` and ``attention_mask``).

Several optimization profiles: ``profiles=[{"x": [(1, 1, 4), 3, 64, 64]}, ...]`` (same per-dim
form), each inside the export ranges. Without it there is one profile, the export ranges.
"""
from __future__ import annotations

import dataclasses
import inspect
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from refitcore.errors import ShapeRangeError

__all__ = ["DimRange", "ShapeProfiles", "ShapeRangeError", "resolve_dynamic_shapes", "export_example",
           "parse_shape_range", "input_shape_arg", "format_range", "cli_inputs", "sample_shapes", "draw_shapes",
           "is_torch_dim", "nest_dynamic_shapes", "export_call"]

Range = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DimRange:
    """One dynamic dimension: ``min <= size <= max``, tuned for ``opt`` (None: the example's size).
    Dimensions with the same ``name`` are one dimension."""

    min: int
    max: int
    opt: int | None = None
    name: str | None = None

    def __post_init__(self):
        if not (isinstance(self.min, int) and isinstance(self.max, int)) or not 1 <= self.min <= self.max:
            raise ShapeRangeError(f"dimension range min={self.min} max={self.max}: need integers 1 <= min <= max")
        if self.opt is not None and not self.min <= self.opt <= self.max:
            raise ShapeRangeError(f"dimension range opt={self.opt} lies outside [{self.min}, {self.max}]")


def is_torch_dim(value: Any) -> bool:
    """A ``torch.export.Dim`` (or a derived dim such as ``2 * batch``)."""
    return type(value).__module__.startswith("torch.export") and hasattr(value, "__name__")


def _as_range(value: Any, where: str) -> DimRange | None:
    if value is None or isinstance(value, int):
        return None
    if isinstance(value, DimRange):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (2, 3) and all(isinstance(v, int) for v in value):
        lo, hi = value[0], value[-1]
        return DimRange(lo, hi, value[1] if len(value) == 3 else None)
    if type(value).__module__.startswith("torch.export"):   # Dim.AUTO, Dim.DYNAMIC: no bounds
        raise ShapeRangeError(f"{where}: {value} has no bounds, and a TensorRT optimization profile needs them; "
                              f"use torch.export.Dim(name, min=..., max=...) or (min, max)")
    raise ShapeRangeError(f"{where}: expected (min, max), (min, opt, max), a DimRange, an int or None, "
                          f"got {value!r}")


def _per_dim(spec: Any, rank: int, where: str) -> dict[int, DimRange]:
    """{dim: DimRange} from {dim: range} or a tuple of per-dim entries."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(spec, Mapping):
        items = spec.items()
    elif isinstance(spec, (tuple, list)):
        if len(spec) != rank:
            raise ShapeRangeError(f"{where}: {len(spec)} per-dimension entries for a rank-{rank} input")
        items = enumerate(spec)
    else:
        raise ShapeRangeError(f"{where}: expected {{dim: (min, opt, max)}} or one entry per dimension, got {spec!r}")
    out = {}
    for d, v in items:
        if not isinstance(d, int) or not -rank <= d < rank:
            raise ShapeRangeError(f"{where}: dimension {d!r} does not exist in a rank-{rank} input")
        r = _as_range(v, f"{where} dim {d}")
        if r is not None:
            out[d % rank] = r
    return out


def _leaves(spec: Any) -> Iterator[Any]:
    if isinstance(spec, Mapping):
        for v in spec.values():
            yield from _leaves(v)
    elif isinstance(spec, (tuple, list)):
        for v in spec:
            yield from _leaves(v)
    else:
        yield spec


def _arg_names(model: torch.nn.Module, n: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [f"arg{i}" for i in range(n)]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [f"arg{i}" for i in range(len(names), n)])[:n]


@dataclasses.dataclass(frozen=True)
class ShapeProfiles:
    """Per-input shape ranges (the export ranges) and the optimization profiles built from them.

    ``ranges[i][d]`` is ``(min, opt, max)`` of input ``i``'s dimension ``d`` (static: all equal);
    ``profiles`` is a list of such tables; ``dim_names[i][d]`` names a dynamic dimension (shared
    names are one dimension). JSON round-trips through :meth:`to_json` / :meth:`from_json`."""

    input_names: tuple[str, ...]
    ranges: tuple[tuple[Range, ...], ...]
    profiles: tuple[tuple[tuple[Range, ...], ...], ...]
    dim_names: tuple[tuple[str | None, ...], ...]

    @property
    def dynamic(self) -> bool:
        return any(lo != hi for r in self.ranges for lo, _, hi in r)

    def min_shapes(self, profile: int = 0) -> list[tuple[int, ...]]:
        return [tuple(r[0] for r in inp) for inp in self.profiles[profile]]

    def opt_shapes(self, profile: int = 0) -> list[tuple[int, ...]]:
        return [tuple(r[1] for r in inp) for inp in self.profiles[profile]]

    def max_shapes(self, profile: int = 0) -> list[tuple[int, ...]]:
        return [tuple(r[2] for r in inp) for inp in self.profiles[profile]]

    def network_dims(self) -> list[tuple[int, ...]]:
        """Input dims for the network: -1 where a dimension varies."""
        return [tuple(-1 if lo != hi else lo for lo, _, hi in inp) for inp in self.ranges]

    def profile_for(self, shapes: Sequence[Sequence[int]]) -> int:
        """The first profile that contains ``shapes``; raise :class:`ShapeRangeError` naming the input,
        the dimension and the range when none does."""
        problems = []
        for p, table in enumerate(self.profiles):
            bad = self._outside(table, shapes)
            if not bad:
                return p
            problems.append(bad)
        first = problems[0]
        more = "" if len(self.profiles) == 1 else f" (and outside the other {len(self.profiles) - 1} profile(s))"
        raise ShapeRangeError(first + more + "; recompile with a wider dynamic_shapes range for this input")

    def _outside(self, table, shapes) -> str | None:
        for name, ranges, shape in zip(self.input_names, table, shapes):
            if len(shape) != len(ranges):
                return f"input {name!r}: rank {len(shape)} where the engine takes rank {len(ranges)}"
            for d, ((lo, _, hi), n) in enumerate(zip(ranges, shape)):
                if not lo <= n <= hi:
                    what = f"range [{lo}, {hi}]" if lo != hi else f"static size {lo}"
                    return (f"input {name!r}: dimension {d} has size {n}, outside the engine's optimization "
                            f"profile ({what}); shape {list(shape)}")
        return None

    def tied_by(self, inputs: Sequence[tuple[str, Sequence[Any]]]) -> ShapeProfiles:
        """These profiles with the exported graph's input names and the ties the exporter found:
        dynamic dimensions that are one symbol in the graph (``x`` and ``mask`` of one batch) get one
        name, so that a re-export ties them again. ``inputs``: (name, shape with SymInts) of each
        tensor input, in flat order (:func:`refitcore.capture.lowering.tensor_inputs`)."""
        if len(inputs) != len(self.ranges):
            raise ShapeRangeError(f"the exported graph has {len(inputs)} tensor inputs where the dynamic shapes "
                                  f"describe {len(self.ranges)}")
        first: dict[str, tuple[str, Range]] = {}    # graph symbol -> (dimension name, range)
        renamed: dict[str, str] = {}
        for (name, shape), ranges, names in zip(inputs, self.ranges, self.dim_names):
            for d, (size, r, dim_name) in enumerate(zip(shape, ranges, names)):
                expr = getattr(getattr(size, "node", None), "expr", None)
                if dim_name is None or expr is None or not expr.is_Symbol:
                    continue
                seen = first.setdefault(str(expr), (dim_name, r))
                if seen[1] != r:
                    raise ShapeRangeError(f"input {name!r}: dimension {d} is the same size as dimension "
                                          f"{seen[0]!r} in the graph, but has the range {list(r)} where that one has "
                                          f"{list(seen[1])}; give both one range (or one name)")
                renamed[dim_name] = seen[0]
        dim_names = tuple(tuple(renamed.get(n, n) if n is not None else None for n in names)
                          for names in self.dim_names)
        return dataclasses.replace(self, input_names=tuple(name for name, _ in inputs), dim_names=dim_names)

    def torch_dynamic_shapes(self) -> tuple:
        """The ``dynamic_shapes`` argument of ``torch.export`` for these ranges (to export again)."""
        from torch.export import Dim

        dims: dict[str, Any] = {}
        out: list[dict[int, Any] | None] = []
        for i, (ranges, names) in enumerate(zip(self.ranges, self.dim_names)):
            entry = {}
            for d, ((lo, _, hi), name) in enumerate(zip(ranges, names)):
                if lo != hi:
                    if name is None:   # only a crafted file: every dynamic dimension is named
                        raise ShapeRangeError(f"input {self.input_names[i]!r}: dynamic dimension {d} has no name")
                    if name not in dims:
                        dims[name] = Dim(_identifier(name), min=lo, max=hi)
                    entry[d] = dims[name]
            out.append(entry or None)
        return tuple(out)

    def to_json(self) -> dict:
        return {"input_names": list(self.input_names), "ranges": _lists(self.ranges),
                "profiles": _lists(self.profiles), "dim_names": [list(n) for n in self.dim_names]}

    @classmethod
    def from_json(cls, d: Mapping) -> ShapeProfiles:
        """Read :meth:`to_json`'s form back, checking it (a file is data): raises ShapeRangeError
        for ranges that are not 1 <= min <= opt <= max, or tables that do not match."""
        def ranges(table):
            out = tuple(tuple(tuple(_int(v) for v in r) for r in inp) for inp in table)
            for inp in out:
                for r in inp:
                    if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
                        raise ShapeRangeError(f"range {list(r)} is not (min, opt, max) with 1 <= min <= opt <= max")
            return out
        sp = cls(tuple(str(n) for n in d["input_names"]), ranges(d["ranges"]),
                 tuple(ranges(t) for t in d["profiles"]), tuple(tuple(n) for n in d["dim_names"]))
        n = len(sp.input_names)
        ranks = [len(r) for r in sp.ranges]
        if (len(sp.ranges) != n or len(sp.dim_names) != n or not sp.profiles
                or any([len(r) for r in t] != ranks for t in sp.profiles)
                or [len(x) for x in sp.dim_names] != ranks):
            raise ShapeRangeError("the ranges, profiles and dimension names do not describe the same inputs")
        return sp


def _int(v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ShapeRangeError(f"a range holds {v!r}, not an int")
    return v


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name) if not name.isidentifier() else name


def _lists(value):
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


def resolve_dynamic_shapes(model: torch.nn.Module, examples: Sequence[Any], dynamic_shapes: Any, *,
                           kwargs: Mapping[str, Any] | None = None,
                           profiles: Sequence[Any] | None = None) -> tuple[Any, ShapeProfiles | None]:
    """(``dynamic_shapes`` for ``torch.export``, :class:`ShapeProfiles`) from a caller's spec
    (see the module docstring); (None, None) when ``dynamic_shapes`` is None.

    ``examples`` are the positional inputs and ``kwargs`` the keyword ones, any pytree of tensors,
    Python scalars and None. The spec names a top-level input by name or index and mirrors its
    structure (``{"d": {"bias": {0: (1, 8)}, "more": [None]}}``); the profiles hold one entry per
    tensor leaf in flat order, named by its path (``d['bias']``). A dynamic dimension given as a
    range without a name is exported as ``Dim.DYNAMIC`` within its bounds, so dimensions the graph
    ties together need no common name (:meth:`ShapeProfiles.tied_by` records the ties)."""
    if dynamic_shapes is None:
        if profiles:
            raise ShapeRangeError("profiles= needs dynamic_shapes= (the export ranges they lie in)")
        return None, None
    kwargs = dict(kwargs or {})
    top_names = _arg_names(model, len(examples)) + list(kwargs)
    top_values = list(examples) + list(kwargs.values())
    torch_form = any(is_torch_dim(v) for v in _leaves(dynamic_shapes))
    if isinstance(dynamic_shapes, Mapping):
        entries = list(dynamic_shapes.items())
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(top_values):
            raise ShapeRangeError(f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(top_values)} input(s)")
        entries = list(enumerate(dynamic_shapes))
    else:
        raise ShapeRangeError(f"dynamic_shapes: expected a dict (input name or index -> ranges) or a tuple with one "
                              f"entry per input, got {type(dynamic_shapes).__name__}")
    top_specs: list[tuple[Any, Any]] = [(None, None)] * len(top_values)   # (the caller's key, its spec)
    for key, spec in entries:
        i = key if isinstance(key, int) else (top_names.index(key) if key in top_names else None)
        if i is None or not 0 <= i < len(top_values):
            raise ShapeRangeError(f"dynamic_shapes: no input {key!r}; the inputs are {top_names}")
        top_specs[i] = (key, spec)
    names: list[str] = []
    examples_flat: list[torch.Tensor] = []
    per_input: list[dict[int, DimRange]] = []
    given: list[Any] = []   # each tensor's spec as the caller wrote it (torch.export's form: passed on)
    for name, value, (key, spec) in zip(top_names, top_values, top_specs):
        for path, t, leaf_spec, where in _tensor_leaves(value, spec, name, f"dynamic_shapes[{key!r}]"):
            names.append(path)
            examples_flat.append(t)
            given.append(leaf_spec)
            if leaf_spec is None:
                per_input.append({})
            elif torch_form:
                per_input.append(_from_torch_dims(leaf_spec, t.dim(), where))
            else:
                per_input.append(_per_dim(leaf_spec, t.dim(), where))
    ranges: list[tuple[Range, ...]] = []
    dim_names: list[tuple[str | None, ...]] = []
    tied: dict[str, Range] = {}
    export_flat: list[Any] = []
    for i, (t, dims) in enumerate(zip(examples_flat, per_input)):
        inp: list[Range] = []
        nm: list[str | None] = []
        hints: dict[int, Any] = {}
        for d, size in enumerate(t.shape):
            r = dims.get(d)
            if r is None:
                inp.append((int(size), int(size), int(size)))
                nm.append(None)
                continue
            name = r.name or f"{names[i]}_dim{d}"
            opt = r.opt if r.opt is not None else int(size)
            if not r.min <= opt <= r.max:
                raise ShapeRangeError(f"input {names[i]!r}: the example's dimension {d} has size {int(size)}, outside "
                                      f"its range [{r.min}, {r.max}]; give an example inside the range (it is opt)")
            if name in tied and tied[name] != (r.min, opt, r.max):
                raise ShapeRangeError(f"dimension {name!r} has ranges {tied[name]} and {(r.min, opt, r.max)}")
            tied[name] = (r.min, opt, r.max)
            inp.append((r.min, opt, r.max))
            nm.append(name)
            if r.name is None:
                hints[d] = _dynamic_hint(r.min, r.max)
        ranges.append(tuple(inp))
        dim_names.append(tuple(nm))
        export_flat.append(hints)
    ranges_t = tuple(ranges)
    table = [ranges_t] if not profiles else [_profile(p, ranges_t, names, examples_flat) for p in profiles]
    sp = ShapeProfiles(tuple(names), ranges_t, tuple(table), tuple(dim_names))
    if torch_form:
        export_flat = given
    else:
        named = sp.torch_dynamic_shapes()   # one Dim per name the caller gave; unnamed ranges as hints
        export_flat = [{**(n or {}), **h} or None for n, h in zip(named, export_flat)]
    return nest_dynamic_shapes(export_flat, model, examples, kwargs), sp


def _dynamic_hint(lo: int, hi: int) -> Any:
    from torch.export import Dim

    return Dim.DYNAMIC(min=lo, max=hi)


def _tensor_leaves(value: Any, spec: Any, path: str, where: str) -> Iterator[tuple[str, torch.Tensor, Any, str]]:
    """(path name, tensor, its spec, where) of every tensor inside one input, in pytree flat order,
    with the caller's spec for it (None: static). ``spec`` mirrors ``value``'s containers."""
    if isinstance(value, torch.Tensor):
        yield path, value, spec, where
        return
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        if spec is not None and not (isinstance(spec, (tuple, list)) and len(spec) == len(value)):
            raise ShapeRangeError(f"{where}: input {path} is a {type(value).__name__} of {len(value)}; give a "
                                  f"{type(value).__name__} of {len(value)} entries (None for a static one) or None")
        for j, v in enumerate(value):
            yield from _tensor_leaves(v, None if spec is None else spec[j], f"{path}[{j}]", f"{where}[{j}]")
        return
    if isinstance(value, dict):
        if spec is not None and not (isinstance(spec, Mapping) and set(spec) <= set(value)):
            raise ShapeRangeError(f"{where}: input {path} is a dict with keys {list(value)}; give a dict of some of "
                                  f"those keys or None")
        for k, v in value.items():
            yield from _tensor_leaves(v, None if spec is None else spec.get(k), f"{path}[{k!r}]", f"{where}[{k!r}]")
        return
    leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    if spec is not None:
        raise ShapeRangeError(f"{where}: input {path} is {type(value).__name__}, not a tensor, tuple, list or dict; "
                              f"its entry must be None (static)")
    for j, t in enumerate(leaves):
        yield f"{path}[{j}]", t, None, where


def nest_dynamic_shapes(flat: Sequence[Any], model: torch.nn.Module, args: Sequence[Any],
                        kwargs: Mapping[str, Any] | None = None) -> Any:
    """torch.export's ``dynamic_shapes`` from one entry per tensor leaf (flat order): a tuple with one
    entry per input when the inputs are positional tensors, else a dict by argument name whose
    entries mirror each input's structure (None at its non-tensor leaves)."""
    kwargs = dict(kwargs or {})
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        if len(flat) != len(args):
            raise ShapeRangeError(f"{len(flat)} dynamic-shape entries for {len(args)} tensor input(s)")
        return tuple(flat)
    it = iter(flat)
    out: dict[str, Any] = {}
    for name, value in zip(_arg_names(model, len(args)) + list(kwargs), [*args, *kwargs.values()]):
        leaves, spec = pytree.tree_flatten(value)
        out[name] = pytree.tree_unflatten([next(it) if isinstance(x, torch.Tensor) else None for x in leaves], spec)
    if next(it, StopIteration) is not StopIteration:
        raise ShapeRangeError("more dynamic-shape entries than the inputs have tensors")
    return out


def export_call(args: Sequence[Any], kwargs: Mapping[str, Any] | None,
                sp: ShapeProfiles | None) -> tuple[tuple, dict]:
    """:func:`export_example` for a call of any structure: its tensor leaves, in flat order, are the
    profiles' inputs."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    tensors = iter(export_example([x for x in leaves if isinstance(x, torch.Tensor)], sp))
    out_args, out_kwargs = pytree.tree_unflatten([next(tensors) if isinstance(x, torch.Tensor) else x
                                                  for x in leaves], spec)
    return tuple(out_args), dict(out_kwargs)


def _from_torch_dims(spec: Any, rank: int, where: str) -> dict[int, DimRange]:
    items = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
    out = {}
    for d, dim in items:
        if dim is None or isinstance(dim, int):
            continue
        if not is_torch_dim(dim):
            _as_range(dim, f"{where} dim {d}")   # says what is wrong with a hint such as Dim.DYNAMIC
            raise ShapeRangeError(f"{where} dim {d}: mix of torch.export.Dim and ranges; use one form")
        lo, hi = getattr(dim, "min", None), getattr(dim, "max", None)
        if not isinstance(hi, int) or hi >= 2 ** 62:
            raise ShapeRangeError(f"{where} dim {d}: Dim {dim.__name__!r} has no max; TensorRT needs a bounded range "
                                  f"(Dim({dim.__name__!r}, min=..., max=...))")
        out[d % rank] = DimRange(max(1, int(lo or 1)), int(hi), None, dim.__name__)
    return out


def _profile(spec: Any, ranges: tuple, names: list[str], examples) -> tuple:
    if isinstance(spec, Mapping):
        by_input = {(k if isinstance(k, int) else names.index(k)): v for k, v in spec.items()}
    else:
        by_input = dict(enumerate(spec))
    table = []
    for i, export in enumerate(ranges):
        dims = _per_dim(by_input[i], len(export), f"profiles input {names[i]!r}") if i in by_input else {}
        row = []
        for d, (lo, opt, hi) in enumerate(export):
            r = dims.get(d)
            if r is None:
                row.append((lo, opt, hi))
                continue
            if r.min < lo or r.max > hi:
                raise ShapeRangeError(f"profile for input {names[i]!r} dim {d}: [{r.min}, {r.max}] lies outside the "
                                      f"export range [{lo}, {hi}]")
            row.append((r.min, r.opt if r.opt is not None else min(max(opt, r.min), r.max), r.max))
        table.append(tuple(row))
    return tuple(table)


def export_example(examples: Sequence[torch.Tensor], sp: ShapeProfiles | None) -> tuple[torch.Tensor, ...]:
    """Example inputs for ``torch.export``: a dynamic dimension of size 0 or 1 is specialised by the
    exporter (it refuses the range), so such a dimension is repeated up to 2 (within its range)."""
    if sp is None:
        return tuple(examples)
    out = []
    for t, ranges in zip(examples, sp.ranges):
        for d, (lo, _, hi) in enumerate(ranges):
            if lo != hi and t.shape[d] < 2 <= hi:
                idx = torch.arange(2) % max(1, t.shape[d])
                t = t.index_select(d, idx)
        out.append(t)
    return tuple(out)


def parse_shape_range(text: str) -> tuple[Range, ...]:
    """CLI shapes: '1x3x224x224' (static) or '1-8x3x64x64' (dim 0 from 1 to 8, opt = min) or
    '1-4-8x3x64x64' (min-opt-max). Returns one (min, opt, max) per dimension."""
    parts = [p for p in re.split(r"[x,×]", text.strip().lower()) if p != ""]
    out = []
    for p in parts:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?:-(\d+))?", p)
        if not m:
            raise ShapeRangeError(f"input shape {text!r}: {p!r} is not N, MIN-MAX or MIN-OPT-MAX")
        vals = [int(v) for v in m.groups() if v is not None]
        lo, hi = vals[0], vals[-1]
        opt = vals[1] if len(vals) == 3 else lo
        if lo <= 0 or not lo <= opt <= hi:
            raise ShapeRangeError(f"input shape {text!r}: {p!r} needs 1 <= min <= opt <= max")
        out.append((lo, opt, hi))
    if not out:
        raise ShapeRangeError(f"input shape {text!r} must look like 1x3x224x224 or 1-8x3x224x224")
    return tuple(out)


def input_shape_arg(text: str) -> tuple[Range, ...]:
    """``argparse`` type of the CLI's ``--input``: :func:`parse_shape_range` with its message."""
    import argparse

    try:
        return parse_shape_range(text)
    except ShapeRangeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def format_range(ranges: Sequence[Range]) -> str:
    """'1-8x3x64x64' (opt shown when it is not min: '1-4-8')."""
    def one(r):
        lo, opt, hi = r
        return str(lo) if lo == hi else f"{lo}-{hi}" if opt == lo else f"{lo}-{opt}-{hi}"
    return "x".join(one(r) for r in ranges)


def cli_inputs(per_input: Sequence[Sequence[Range]]) -> tuple[list[tuple[int, ...]], dict | None]:
    """(example shapes, ``dynamic_shapes`` or None) from the CLI's ``--input`` ranges: the example has
    each dimension's ``opt``."""
    shapes = [tuple(r[1] for r in ranges) for ranges in per_input]
    dynamic = {i: {d: r for d, r in enumerate(ranges) if r[0] != r[2]} for i, ranges in enumerate(per_input)}
    dynamic = {i: dims for i, dims in dynamic.items() if dims}
    return shapes, (dynamic or None)


def sample_shapes(sp: ShapeProfiles, n_random: int = 2, *, seed: int = 0) -> list[list[tuple[int, ...]]]:
    """Shapes to check an engine at: every profile's min, opt and max, then ``n_random`` drawn inside
    the first profile's ranges (shared dimensions get one size). Duplicates are dropped."""
    out: list[list[tuple[int, ...]]] = []
    for p in range(len(sp.profiles)):
        for shapes in (sp.min_shapes(p), sp.opt_shapes(p), sp.max_shapes(p)):
            if shapes not in out:
                out.append(shapes)
    rng = random.Random(seed)
    for _ in range(n_random):
        shapes = draw_shapes(sp, lambda lo, hi: rng.randint(lo, hi))
        if shapes not in out:
            out.append(shapes)
    return out


def draw_shapes(sp: ShapeProfiles, pick, profile: int = 0) -> list[tuple[int, ...]]:
    """One shape per input inside ``profile``, sizes from ``pick(lo, hi)``; shared names share a size."""
    chosen: dict[str | None, int] = {}
    shapes = []
    for ranges, names in zip(sp.profiles[profile], sp.dim_names):
        shape = []
        for (lo, _, hi), name in zip(ranges, names):
            if lo == hi:
                shape.append(lo)
            elif name in chosen:
                shape.append(chosen[name])
            else:
                chosen[name] = pick(lo, hi)
                shape.append(chosen[name])
        shapes.append(tuple(shape))
    return shapes
