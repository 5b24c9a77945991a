"""Checkpoints as found in the wild: read a file without running code, unwrap the containers
training scripts save, and fit the keys to the compiled model, saying what was done.

A checkpoint rarely is a bare state_dict. Training scripts save ``{'model': sd, 'epoch': 3,
'optimizer': ...}``, timm saves ``state_dict`` and ``state_dict_ema``, DataParallel/DDP prefix
every key with ``module.`` and ``torch.compile`` with ``_orig_mod.``. Each of these is recognised
here and turned into the state_dict the compiled model needs, with a note (``LoadedCheckpoint.notes``)
saying exactly what was unwrapped, stripped or ignored; anything that still does not fit is left
for :func:`refitcore.refitting.prepare.check_state_dict` to report, with :func:`explain_missing` saying why.

Reading never runs code: ``.safetensors`` files are read with the ``safetensors`` library, anything
else with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from refitcore.conversion.weight_map import WeightMap
from refitcore.errors import WeightMappingError

__all__ = ["LoadedCheckpoint", "load_weights", "load_checkpoint", "read_file", "unwrap", "fit_keys",
           "explain_missing", "missing_keys", "map_safetensors", "CONTAINER_KEYS", "IGNORABLE_SUFFIXES",
           "INERT_GLOBALS"]

# Keys under which training code stores the model's state_dict, in the order one is preferred when
# several fit (the trained weights before their moving averages, as timm's loader does by default).
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_state", "net", "network",
                  "weights", "params", "ema", "model_ema", "state_dict_ema", "ema_state_dict", "module_ema")
# Key prefixes added by wrappers, and where they come from.
WRAPPER_PREFIXES = {"module.": "DataParallel/DistributedDataParallel", "_orig_mod.": "torch.compile",
                    "model.": "a wrapping module (e.g. a Lightning module)"}
# Buffers no eval-mode model reads: a checkpoint may lack them, or have them where the model does not.
IGNORABLE_SUFFIXES = ("num_batches_tracked",)
# Classes a weights-only load may rebuild beyond torch's defaults: inert attribute bags, no code.
INERT_GLOBALS = (argparse.Namespace,)
_MAX_DEPTH = 3
INDEX_SUFFIX = ".safetensors.index.json"   # transformers' index of a sharded safetensors checkpoint


@dataclasses.dataclass
class LoadedCheckpoint:
    """New weights as a state_dict, plus what it took to get there.

    ``state_dict``: ``{key: tensor}`` (detached); ``source``: the ``nn.Module`` or ``ExportedProgram``
    the weights came from (None for a state_dict or file); ``notes``: every unwrapping, prefix
    strip or ignored key, in words; ``path``: the file read, if any."""

    state_dict: dict[str, torch.Tensor]
    source: Any = None
    notes: list[str] = dataclasses.field(default_factory=list)
    path: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        lines = [f"{where}{len(self.state_dict)} tensor(s)"] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading files

def _is_safetensors(path: str, head: bytes, size: int) -> bool:
    """By extension, or by content: an 8-byte little-endian header length, then a JSON object."""
    if path.endswith(".safetensors"):
        return True
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8


def _safetensors_damage(path: str, size: int) -> str:
    """What a safetensors header says the file should hold, against what it holds."""
    what = f"is a safetensors file that is damaged or truncated ({size} bytes"
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
        if header is None:
            return what + f"; its {n}-byte header runs past the end of the file)"
        end = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if end > size:
            return what + f", where its header says the tensors need {end}: the file is truncated)"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return what + ")"


def _damaged(path: str, size: int, head: bytes, err: BaseException, *, safetensors: bool = False) -> WeightMappingError:
    """Say what is wrong with a file that does not load, and what to do."""
    said = f"{type(err).__name__}: {err}".strip()
    if len(said) > 200:
        said = said[:200] + " ..."
    if size == 0:
        what = "is empty (0 bytes)"
    elif safetensors:
        what = _safetensors_damage(path, size)
    elif head[:4] == b"PK\x03\x04":
        # torch.save writes a zip archive whose directory comes last: a file cut short (an
        # interrupted download or copy, a full disk) has none, or entries that run past its end.
        if not zipfile.is_zipfile(path):
            what = (f"is a torch.save archive cut short: {size} bytes, without the zip directory torch.save "
                    f"writes at the end (the file is truncated)")
        else:
            what = f"is a torch.save archive that is damaged or truncated ({size} bytes)"
            try:
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
                if bad is not None:
                    what += f"; archive member {bad!r} fails its CRC check"
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as zerr:
                what += f"; reading its members fails: {zerr}"
    elif head[:1] == b"\x80":
        what = f"is a legacy (pre-zip) torch.save file that is damaged or truncated ({size} bytes)"
    else:
        what = (f"is neither a torch.save archive nor a safetensors file ({size} bytes, starting with "
                f"{head[:8]!r})")
    return WeightMappingError(
        [f"{path}: the file {what}. Download or copy it again (compare its size and checksum with the "
         f"original), or save it again with torch.save(model.state_dict(), path). The reader said: {said}"],
        header="cannot load the checkpoint")


def read_file(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file, read without running any code it holds.

    ``.safetensors`` (or safetensors content) is memory-mapped (:func:`map_safetensors`): the
    tensors are views of the file, read from disk as they are used, never copied; a folder or a
    ``*.safetensors.index.json`` of a sharded checkpoint maps every shard. Anything else goes
    through ``torch.load(weights_only=True)``, memory-mapped too for torch.save's zip format. A
    damaged or truncated file raises :class:`WeightMappingError` saying so (size, what the reader
    said) and what to do."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    size = os.path.getsize(path)  # FileNotFoundError propagates as it is
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(path, head, size):
        try:
            return map_safetensors(path)
        except Exception as err:
            raise _damaged(path, size, head, err, safetensors=True) from err
    try:
        # Training scripts often save their argparse.Namespace beside the weights (timm does): a plain
        # attribute bag whose unpickling runs no code, so it is allowed; nothing else is
        # (https://pytorch.org/docs/stable/notes/serialization.html#weights-only).
        with torch.serialization.safe_globals(list(INERT_GLOBALS)):
            # A zip archive (torch.save's format since 1.6) is mapped too: its tensors are views of
            # the file, as safetensors' are; the legacy format is read whole.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head[:4] == b"PK\x03\x04")
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights_only" not in text and "Weights only" not in text:
            raise _damaged(path, size, head, err) from err
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f"a {found.group(1)} object" if found else "Python objects other than tensors and plain containers"
        raise WeightMappingError(
            [f"{path}: holds {what}, and checkpoints are read weights-only (refitcore never unpickles arbitrary "
             f"objects: that could run code). Save just the weights: torch.save(model.state_dict(), path), or "
             f"safetensors"],
            header="cannot load the checkpoint") from err
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as err:
        raise _damaged(path, size, head, err) from err


def map_safetensors(path: str) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of a safetensors file, each tensor a copy-on-write view of the file's
    memory mapping (``safetensors.safe_open``): nothing is read until used, the stored dtype is
    kept, and writing a tensor never reaches the file. The pages count in the process's resident
    memory once read, as the weights themselves would: one copy of the weights, not two."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - a safe_open handle, not a dict


def _read_sharded(path: str) -> dict[str, torch.Tensor]:
    """Every shard of a sharded safetensors checkpoint (a folder holding one ``*.safetensors.index.json``
    or that index itself), mapped (:func:`map_safetensors`); the index must name every key once."""
    def refuse(what: str) -> WeightMappingError:
        return WeightMappingError([f"{path}: {what}"], header="cannot load the checkpoint")

    if os.path.isdir(path):
        indexes = sorted(n for n in os.listdir(path) if n.endswith(INDEX_SUFFIX))
        singles = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if len(indexes) > 1:
            raise refuse(f"is a directory with {len(indexes)} shard indexes ({indexes[:3]}); give the index of the "
                         f"checkpoint to use")
        if not indexes:
            if len(singles) == 1:
                return read_file(os.path.join(path, singles[0]))
            raise refuse("is a directory; give the checkpoint file inside it, or the *.safetensors.index.json of a "
                         "sharded safetensors checkpoint")
        index_path = os.path.join(path, indexes[0])
    else:
        index_path = path
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        shard_of = index["weight_map"]
        if not isinstance(shard_of, dict) or not all(isinstance(v, str) for v in shard_of.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise refuse(f"the shard index {index_path!r} is unreadable ({type(err).__name__}: {err}); it must be JSON "
                     f"with a 'weight_map' object of key -> shard file, as transformers writes it") from err
    state: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(shard_of.values()):
        if os.path.basename(shard) != shard:
            raise refuse(f"the shard index names {shard!r}, not a file beside it")
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise refuse(f"the shard {shard!r} named by {os.path.basename(index_path)} is missing")
        tensors = read_file(shard_path)
        unlisted = [k for k in tensors if shard_of.get(k) != shard]
        if unlisted:
            raise refuse(f"the shard {shard!r} holds {len(unlisted)} key(s) its index places elsewhere or not at all "
                         f"({unlisted[:3]}): the index and the shards do not belong together")
        state.update(tensors)
    absent = [k for k in shard_of if k not in state]
    if absent:
        raise refuse(f"the shard index names {len(absent)} key(s) no shard holds ({absent[:3]}): a shard is "
                     f"truncated or from another checkpoint")
    return state


# ----------------------------------------------------------------------------- unwrapping

def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _candidates(obj: Mapping, prefix: str = "", depth: int = 0) -> list[tuple[str, str | None, str, Mapping]]:
    """(where, top-level key, last key, state_dict) for every nested mapping of tensors."""
    out: list[tuple[str, str | None, str, Mapping]] = []
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Mapping):
            continue
        where = f"{prefix}[{k!r}]"
        if _is_state_dict(v):
            out.append((where, k, k, v))
        elif depth + 1 < _MAX_DEPTH:
            out += [(w, k, last, sd) for w, _, last, sd in _candidates(v, where, depth + 1)]
    return out


def _rank(last: str) -> int:
    return CONTAINER_KEYS.index(last) if last in CONTAINER_KEYS else len(CONTAINER_KEYS)


def _describe(v: Any) -> str:
    if isinstance(v, (int, float, bool, str)) and len(repr(v)) <= 20:
        return repr(v)
    if isinstance(v, Mapping):
        return f"a dict of {len(v)}"
    return type(v).__name__


def unwrap(obj: Any, *, missing: Callable[[Mapping], Sequence[str]] | None = None,
           key: str | None = None, what: str = "checkpoint") -> tuple[Mapping[str, torch.Tensor], list[str]]:
    """(state_dict, notes) from a checkpoint object: a state_dict, or a dict holding one.

    ``missing(state)`` lists the compiled model's keys a candidate lacks; with several candidate
    state_dicts (``model`` and ``ema``), the first of :data:`CONTAINER_KEYS` that fits is taken, and
    the note says which and what else was there. ``key`` picks a top-level entry explicitly.
    Entries beside the state_dict (epoch, optimizer state) are ignored, with a note."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightMappingError([f"{what}: has no entry {key!r} (it has {have})"],
                                     header="cannot load the checkpoint")
        state, notes = unwrap(obj[key], missing=missing, what=f"{what}[{key!r}]")
        return state, [f"used the state_dict under {key!r} as asked"] + notes
    if not isinstance(obj, Mapping):
        raise WeightMappingError([f"{what}: expected a state_dict (a dict of tensors), got {type(obj).__name__}"],
                                 header="cannot load the checkpoint")
    if _is_state_dict(obj) or not obj:
        return obj, []
    cands = _candidates(obj)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not cands:
        arrays = [k for k, v in obj.items() if hasattr(v, "__array__") and not isinstance(v, torch.Tensor)]
        if arrays and tensors:  # a state_dict with a numpy array among its weights
            raise WeightMappingError([f"{k!r}: expected a torch.Tensor, got {type(obj[k]).__name__} (convert it "
                                      f"with torch.as_tensor)" for k in arrays])
    if tensors:
        # Tensors beside the entries (a state_dict saved with an epoch counter): a candidate too.
        cands.append(("the top level", None, "", tensors))
    if not cands:
        found = ", ".join(f"{k!r} ({_describe(v)})" for k, v in list(obj.items())[:8]) or "nothing"
        raise WeightMappingError([f"{what}: expected a state_dict (a dict of tensors) or a dict holding one under "
                                  f"{', '.join(map(repr, CONTAINER_KEYS[:4]))}, ...; found {found}"],
                                 header="cannot load the checkpoint")
    # Known container keys in their order of preference, then the largest.
    cands.sort(key=lambda c: (_rank(c[2]), -len(c[3])))
    listed = ", ".join(c[0] for c in cands)
    notes = []
    if missing is not None and len(cands) > 1:
        gaps = {c[0]: len(missing(c[3])) for c in cands}
        fitting = [c for c in cands if gaps[c[0]] == 0]
        chosen = fitting[0] if fitting else min(cands, key=lambda c: gaps[c[0]])
        if fitting:
            also = [c[0] for c in fitting if c is not chosen]
            rest = [c[0] for c in cands if c not in fitting]
            notes.append(f"the {what} holds {len(cands)} state_dicts ({listed}); used {chosen[0]}, which fits the "
                         f"compiled model" + (f"; {', '.join(also)} fit(s) too: pass it explicitly to use it"
                                              if also else "")
                         + (f"; {', '.join(rest)} do(es) not fit" if rest else ""))
        else:
            notes.append(f"the {what} holds {len(cands)} state_dicts ({listed}); none fits the compiled model; "
                         f"used {chosen[0]}, the closest ({gaps[chosen[0]]} key(s) missing)")
    else:
        chosen = cands[0]
        if chosen[1] is not None:
            notes.append(f"used the state_dict under {chosen[0]} of the {what}"
                         + (f" (also there: {', '.join(c[0] for c in cands[1:])})" if len(cands) > 1 else ""))
    used = {chosen[1]} if chosen[1] is not None else set(chosen[3])
    rest = [k for k in obj if k not in used]
    if rest:
        beside = "beside the weights" if chosen[1] is None else f"of the {what}"
        notes.append(f"ignored {len(rest)} other entr{'y' if len(rest) == 1 else 'ies'} {beside}: "
                     + ", ".join(f"{k!r} ({_describe(obj[k])})" for k in rest[:8])
                     + (f" and {len(rest) - 8} more" if len(rest) > 8 else ""))
    return chosen[3], notes


# ----------------------------------------------------------------------------- fitting keys

def missing_keys(weight_map: WeightMap, keys) -> list[str]:
    """The keys the engine reads that ``keys`` lack (a tied key is there when any of its names is)."""
    keys = set(keys)
    group_of = {k: g for g in weight_map.tied for k in g}
    return [k for k in weight_map.keys_used if k not in keys and not any(a in keys for a in group_of.get(k, ()))]


def _common_prefixes(keys: Sequence[str]) -> list[str]:
    """Dotted prefixes every key carries: ['module.', 'module._orig_mod.'] for 'module._orig_mod.x.w'."""
    if not keys:
        return []
    parts = [k.split(".") for k in keys]
    out = []
    for i in range(min(len(p) for p in parts) - 1):
        first = parts[0][i]
        if any(p[i] != first for p in parts):
            break
        out.append(".".join(parts[0][: i + 1]) + ".")
    return out


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = collections.OrderedDict((k[len(prefix):], v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # per-module version metadata is keyed by module path: strip it too
        bare = prefix.rstrip(".")
        out._metadata = collections.OrderedDict(  # type: ignore[attr-defined]  # torch's state_dict attribute
            ("" if k == bare else k[len(prefix):], v) for k, v in metadata.items()
            if k == bare or k.startswith(prefix))
    return out


def _wrappers(prefix: str) -> str:
    known = [WRAPPER_PREFIXES[p + "."] for p in prefix.rstrip(".").split(".") if p + "." in WRAPPER_PREFIXES]
    return f" (added by {', then '.join(known)})" if known else ""


def fit_keys(state: Mapping[str, torch.Tensor], weight_map: WeightMap,
             state_keys: Sequence[str] = ()) -> tuple[Mapping[str, torch.Tensor], list[str]]:
    """(state_dict, notes) with wrapper prefixes stripped when that makes the keys fit.

    A prefix (``module.``, ``_orig_mod.``, ...) is stripped only when every key carries it and the
    stripped keys give every state_dict entry the engine reads. Keys the engine never reads
    (``weight_map.unused_keys``, ``num_batches_tracked``) may be missing, or present where the
    compiled model (``state_keys``) has none: they are ignored, with a note."""
    notes: list[str] = []
    if missing_keys(weight_map, state):
        for prefix in _common_prefixes(list(state)):
            stripped = [k[len(prefix):] for k in state]
            if not missing_keys(weight_map, stripped):
                state = _strip(state, prefix)
                notes.append(f"stripped the prefix {prefix!r} from every key{_wrappers(prefix)}; the keys then fit "
                             f"the compiled model")
                break
    if state_keys:
        known = set(state_keys)
        extra = [k for k in state if k not in known and k.endswith(IGNORABLE_SUFFIXES)]
        if extra:
            drop = set(extra)
            kept = collections.OrderedDict((k, v) for k, v in state.items() if k not in drop)
            metadata = getattr(state, "_metadata", None)
            if metadata is not None:
                kept._metadata = metadata  # type: ignore[attr-defined]  # torch's state_dict attribute
            state = kept
            notes.append(f"ignored {len(extra)} key(s) the compiled model does not have and no eval-mode model "
                         f"reads: {extra[:3]}" + (" ..." if len(extra) > 3 else ""))
    unread = [k for k in weight_map.unused_keys if k not in state]
    if unread:
        notes.append(f"the weights lack {len(unread)} key(s) the engine never reads ({unread[:3]}"
                     f"{' ...' if len(unread) > 3 else ''}); ignored")
    return state, notes


def explain_missing(weight_map: WeightMap, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Why a state_dict lacks keys the engine reads, when the cause is recognisable: a wrapper
    prefix that does not fit even when stripped, or keys the model has under a prefix."""
    keys = list(state)
    needed = weight_map.keys_used
    hints = []
    for prefix in _common_prefixes(keys):
        gaps = missing_keys(weight_map, [k[len(prefix):] for k in keys])
        hints.append(f"every key starts with {prefix!r}{_wrappers(prefix)}; even without it, {len(gaps)} of "
                     f"{len(needed)} key(s) the engine reads are missing (e.g. {gaps[:3]}): these weights are for "
                     f"another model")
        break
    if not hints and needed:
        # The compiled model may itself be wrapped: its keys carry a prefix the checkpoint lacks.
        for prefix in _common_prefixes(needed):
            if not missing_keys(weight_map, [prefix + k for k in keys]):
                hints.append(f"the compiled model's keys all start with {prefix!r} and these weights have them "
                             f"without it: compile the unwrapped model, or add the prefix to every key")
                break
    return hints


# ----------------------------------------------------------------------------- the entry point

def _detached(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached tensors, keeping a state_dict's per-module version metadata (``_metadata``)."""
    out = collections.OrderedDict((k, v.detach()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]  # torch's state_dict attribute
    return out


def _refuse_meta(state: Mapping[str, torch.Tensor]) -> None:
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise WeightMappingError(
            [f"{len(meta)} tensor(s) are on the 'meta' device ({meta[:5]}{' ...' if len(meta) > 5 else ''}): meta "
             f"tensors carry no data; load real weights (e.g. model.to_empty(device='cpu') then "
             f"load_state_dict, or build the model without device='meta')"])


def load_checkpoint(path: str | os.PathLike, *, weight_map: WeightMap | None = None, state_keys: Sequence[str] = (),
                    key: str | None = None) -> LoadedCheckpoint:
    """A checkpoint file as a :class:`LoadedCheckpoint`, never running code it holds.

    With ``weight_map`` (and the compiled model's ``state_keys``), containers are unwrapped and
    prefixes stripped so that the keys fit the compiled model; ``key`` picks a top-level entry.

    Example::

        loaded = load_checkpoint("last.ckpt", weight_map=engine.weight_map, state_keys=engine.state_keys)
        print(loaded)   # which entry was used, what was stripped or ignored
    """
    return load_weights(os.fspath(path), weight_map=weight_map, state_keys=state_keys, key=key)


def load_weights(new_weights: Any, *, weight_map: WeightMap | None = None, state_keys: Sequence[str] = (),
                 key: str | None = None) -> LoadedCheckpoint:
    """New weights in any accepted form (``nn.Module``, ``ExportedProgram``, state_dict, a dict
    holding one, a checkpoint path) as a :class:`LoadedCheckpoint` fitted to the compiled model."""
    source: torch.nn.Module | torch.export.ExportedProgram | None = None
    path = None
    notes: list[str] = []
    if isinstance(new_weights, (str, os.PathLike)):
        path = os.fspath(new_weights)
        obj = read_file(path)
        what = "checkpoint"
    elif isinstance(new_weights, torch.nn.Module):
        source, obj, what = new_weights, new_weights.state_dict(), "model"
    elif isinstance(new_weights, torch.export.ExportedProgram):
        source, obj, what = new_weights, dict(new_weights.state_dict), "exported program"
    elif isinstance(new_weights, Mapping):
        obj, what = new_weights, "dict"
    else:
        raise TypeError(f"new weights must be an nn.Module, ExportedProgram, state_dict or checkpoint path; "
                        f"got {type(new_weights).__name__}")
    fit = None
    if weight_map is not None:
        def fit(sd: Mapping) -> list[str]:  # what a candidate still lacks once its prefixes are stripped
            return missing_keys(weight_map, fit_keys(sd, weight_map)[0])
    state, more = unwrap(obj, missing=fit, key=key, what=what) if source is None else (obj, [])
    notes += more
    _refuse_meta(state)
    if weight_map is not None:
        state, more = fit_keys(state, weight_map, state_keys)
        notes += more
    return LoadedCheckpoint(_detached(state), source, notes, path)
