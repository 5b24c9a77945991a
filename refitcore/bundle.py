"""Saved engines: one versioned file, a JSON header plus raw buffers, never pickle.

Layout: ``MAGIC`` (8 bytes) | format version (u32 LE) | header length (u64 LE) | header (UTF-8 JSON)
| buffers. The header lists each buffer (name, dtype, shape, offset, nbytes) and a CRC32 of the
header and of the buffers, so truncation and corruption are detected before anything is used.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any

import numpy as np

from .errors import BundleError

__all__ = ["save", "load", "BUNDLE_VERSION", "MAGIC"]

MAGIC = b"TRTREFIT"
BUNDLE_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")


def _pack(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    entries, chunks, offset = [], [], 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        raw = a.tobytes()
        entries.append({"name": name, "dtype": str(a.dtype), "shape": list(a.shape), "offset": offset,
                        "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    body = b"".join(chunks)
    header = dict(header, buffers=entries, buffers_nbytes=offset, buffers_crc32=zlib.crc32(body))
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    head_crc = struct.pack("<I", zlib.crc32(head))
    return _PREFIX.pack(MAGIC, BUNDLE_VERSION, len(head)) + head + head_crc + body


def _unpack(data: bytes, path: str) -> tuple[dict, dict[str, np.ndarray]]:
    if len(data) < _PREFIX.size:
        raise BundleError(f"{path}: file truncated ({len(data)} bytes): not a refitcore engine")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{path}: not a refitcore engine file (bad magic {magic!r})")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{path}: engine file format version {version} is not supported (this refitcore reads "
                          f"version {BUNDLE_VERSION}); recompile and save again")
    start = _PREFIX.size
    if len(data) < start + head_len + 4:
        raise BundleError(f"{path}: file truncated inside the header ({len(data)} bytes)")
    head = data[start:start + head_len]
    (crc,) = struct.unpack_from("<I", data, start + head_len)
    if zlib.crc32(head) != crc:
        raise BundleError(f"{path}: header checksum mismatch: the file is corrupted")
    try:
        header = json.loads(head.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError both
        raise BundleError(f"{path}: the header is not valid UTF-8 JSON ({err}); the file is corrupted or "
                          f"was not written by refitcore") from err
    if not isinstance(header, dict):
        raise BundleError(f"{path}: the header is not a JSON object; not a refitcore engine")
    body = memoryview(data)[start + head_len + 4:]
    try:
        if len(body) != header["buffers_nbytes"]:
            raise BundleError(f"{path}: file truncated: {len(body)} of {header['buffers_nbytes']} weight bytes "
                              f"present")
        if zlib.crc32(body) != header["buffers_crc32"]:
            raise BundleError(f"{path}: weight data checksum mismatch: the file is corrupted")
        arrays = {}
        for e in header.pop("buffers"):
            if e["offset"] < 0 or e["nbytes"] < 0 or e["offset"] + e["nbytes"] > len(body):
                raise ValueError(f"buffer {e['name']!r} lies outside the file's weight data")
            raw = body[e["offset"]:e["offset"] + e["nbytes"]]
            arrays[e["name"]] = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).reshape(e["shape"]).copy()
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise BundleError(f"{path}: engine file content is invalid: {type(err).__name__}: {err}") from err
    return header, arrays


def save(engine, path: str | os.PathLike) -> None:
    """Write ``engine`` (plan, weight map, current weights, IO spec, fingerprint) to one file."""
    impl_header, impl_arrays = engine._impl.serialize()
    arrays = {f"w/{k}": v for k, v in impl_arrays.items()}
    header = {
        "format": "refitcore.engine",
        "backend": engine.backend,
        "impl": impl_header,
        "weight_map": engine.weight_map.to_json(),
        "io": engine.io.to_json(),
        "fingerprint": engine.fingerprint,
        "graph_entries": engine.graph_entries,
        "model_factory": engine.model_factory,
        "state_keys": engine.state_keys,
        "backend_reason": engine.backend_reason,
    }
    blobs = impl_header.pop("blobs", {}) if isinstance(impl_header, dict) else {}
    for k, v in blobs.items():
        arrays[f"b/{k}"] = np.frombuffer(v, dtype=np.uint8)
    data = _pack(header, arrays)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # never leave a half-written engine under the real name


def load(path: str | os.PathLike):
    """Read an engine written by :func:`save`; raises :class:`BundleError` on a bad file."""
    from .backends import get_backend
    from .engine import IOSpec, RefittableEngine
    from .weight_map import WeightMap

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    header, arrays = _unpack(data, path)
    if header.get("format") != "refitcore.engine":
        raise BundleError(f"{path}: not a refitcore engine (format={header.get('format')!r})")
    try:
        weight_map = WeightMap.from_json(header["weight_map"])
        impl_header: dict[str, Any] = header["impl"]
        blobs = {k[2:]: bytes(v) for k, v in arrays.items() if k.startswith("b/")}
        if blobs:
            impl_header = dict(impl_header, blobs=blobs)
        weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}
        module = get_backend(header["backend"])
        impl = module.load_engine(impl_header, weights)
        io = IOSpec.from_json(header["io"])
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise BundleError(f"{path}: engine file content is invalid: {type(err).__name__}: {err}") from err
    return RefittableEngine(impl, weight_map, io, header["fingerprint"], graph_entries=header.get("graph_entries"),
                            backend_reason=header.get("backend_reason", ""), model_factory=header.get("model_factory"),
                            state_keys=header.get("state_keys", []))
