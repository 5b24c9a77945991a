"""The saved-engine file format: one versioned file, a JSON header plus raw buffers, never pickle.

Layout: ``MAGIC`` (8 bytes) | format version (u32 LE) | header length (u64 LE) | header (UTF-8 JSON)
| header CRC32 (u32 LE) | buffers. The header lists each buffer (name, dtype, shape, offset, nbytes)
and a CRC32 of the buffers, so truncation and corruption are detected before anything is used.

This module is the container only: a header dict and named arrays <-> bytes or a file. It knows
nothing of engines (:mod:`refitcore.engine` turns an engine into these parts and back). Every
malformed input raises :class:`BundleError`; the container's own fields are validated (types,
ranges, sizes against the file, dtype x shape against byte counts) and JSON nesting is bounded.
The helpers :func:`expect`, :func:`expect_shape` and :func:`check_depth` serve the content checks
of the modules that read the header further.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from refitcore.dtypes import NUMPY_NAMES
from refitcore.engine.fileio import atomic_write
from refitcore.errors import BundleError
from refitcore.options import MAX_TENSOR_ELEMENTS

__all__ = ["MAGIC", "BUNDLE_VERSION", "MAX_DEPTH", "MAX_RANK", "MAX_TENSOR_ELEMENTS", "pack", "unpack", "write", "read",
           "expect", "expect_shape", "check_depth"]

MAGIC = b"TRTREFIT"
BUNDLE_VERSION = 1
MAX_DEPTH = 64        # JSON nesting the header may have (a weight map's operand trees are a few levels)
MAX_RANK = 16         # dimensions of any shape in a header (TensorRT allows 8)
_PREFIX = struct.Struct("<8sIQ")
_CRC = struct.Struct("<I")


def _layout(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> tuple[bytes, list[memoryview]]:
    """(the file's bytes up to the weights, the weights' memory in file order): the checksum is
    taken over each array's own memory, so laying a file out copies no weight."""
    entries, views, offset, crc = [], [], 0, 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)   # a view for the contiguous arrays engines hold
        view = a.reshape(-1).data.cast("B")
        entries.append({"name": name, "dtype": str(a.dtype), "shape": list(a.shape), "offset": offset,
                        "nbytes": view.nbytes})
        crc = zlib.crc32(view, crc)
        views.append(view)
        offset += view.nbytes
    full = dict(header, buffers=entries, buffers_nbytes=offset, buffers_crc32=crc)
    head = json.dumps(full, sort_keys=True).encode("utf-8")
    return _PREFIX.pack(MAGIC, BUNDLE_VERSION, len(head)) + head + _CRC.pack(zlib.crc32(head)), views


def pack(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """The file's bytes for ``header`` (JSON-able, without the keys this module adds) and ``arrays``
    (:func:`write` writes the same bytes without holding them)."""
    front, views = _layout(header, arrays)
    return b"".join([front, *views])


def expect(value: Any, kind: type | tuple[type, ...], what: str, where: str) -> Any:
    """``value`` if it is of ``kind`` (bool is not an int here), else :class:`BundleError`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise BundleError(f"{where}: engine file content is invalid: {what} should be {names}, got "
                          f"{type(value).__name__} {_short(value)}")
    return value


def expect_shape(value: Any, what: str, where: str, *, max_elements: int | None = None) -> tuple[int, ...]:
    """A shape: a list of at most :data:`MAX_RANK` non-negative ints, optionally with a bounded
    element count."""
    expect(value, list, what, where)
    if len(value) > MAX_RANK or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BundleError(f"{where}: engine file content is invalid: {what} should be at most {MAX_RANK} "
                          f"non-negative ints, got {_short(value)}")
    if max_elements is not None and math.prod(value) > max_elements:
        raise BundleError(f"{where}: engine file content is invalid: {what} {value} has {math.prod(value)} "
                          f"elements, more than the {max_elements} allowed")
    return tuple(value)


# The closing quote is optional: an unterminated string then ends the match instead of making every
# later quote a new start that scans to the end again (quadratic on a crafted header).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?')
_BRACKET_STEP = np.zeros(256, dtype=np.int32)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def check_depth(text: bytes | bytearray, where: str, limit: int = MAX_DEPTH) -> None:
    """:class:`BundleError` when the JSON ``text`` nests arrays/objects deeper than ``limit``, checked
    on the bytes before parsing (brackets inside strings do not count): a scan at C speed, and the
    parser never recurses into a crafted file's depth."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', bytes(text)), dtype=np.uint8)
    if bare.size and int(np.cumsum(_BRACKET_STEP[bare]).max()) > limit:
        raise BundleError(f"{where}: engine file content is invalid: the header nests deeper than {limit} levels")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _buffer(e: Any, i: int, body: memoryview, seen: set, where: str, start: int,
            skip: Collection[str] = ()) -> tuple[str, np.ndarray | None]:
    expect(e, dict, f"buffers[{i}]", where)
    name = expect(e.get("name"), str, f"buffers[{i}].name", where)
    what = f"buffer {name!r}"
    if name in seen:
        raise BundleError(f"{where}: engine file content is invalid: {what} is listed twice")
    seen.add(name)
    dtype = expect(e.get("dtype"), str, f"{what}: dtype", where)
    if dtype not in NUMPY_NAMES:
        raise BundleError(f"{where}: engine file content is invalid: {what}: dtype {_short(dtype)} is not one of "
                          f"{list(NUMPY_NAMES)}")
    shape = expect_shape(e.get("shape"), f"{what}: shape", where)
    offset = expect(e.get("offset"), int, f"{what}: offset", where)
    nbytes = expect(e.get("nbytes"), int, f"{what}: nbytes", where)
    if offset < 0 or nbytes < 0 or offset + nbytes > len(body):
        raise BundleError(f"{where}: engine file content is invalid: {what} lies outside the file's weight data "
                          f"(offset {offset}, {nbytes} bytes of {len(body)})")
    if offset != start:
        # `pack` lays the buffers end to end in the order listed; any other offset would let a header
        # alias one buffer onto another's bytes (the body checksum covers the bytes, not their roles).
        raise BundleError(f"{where}: engine file content is invalid: {what} starts at byte {offset}, where the "
                          f"buffer before it ends at {start}: buffers overlap or leave a gap (they lie end to end in "
                          f"the order listed)")
    itemsize = np.dtype(dtype).itemsize
    if math.prod(shape) * itemsize != nbytes:
        raise BundleError(f"{where}: engine file content is invalid: {what}: {nbytes} bytes do not hold "
                          f"{dtype}{list(shape)} ({math.prod(shape) * itemsize} bytes)")
    if name in skip:
        return name, None
    raw = body[offset:offset + nbytes]
    return name, np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


def _crc32(body: memoryview, release: Any = None) -> int:
    """The body's CRC32, in chunks; ``release(start, stop)`` after each (a mapped file drops the
    pages it read, so checking a large file does not keep it resident)."""
    crc, step = 0, 64 << 20
    for start in range(0, len(body), step):
        crc = zlib.crc32(body[start:start + step], crc)
        if release is not None:
            release(start, min(start + step, len(body)))
    return crc


def unpack(data: bytes | bytearray | mmap.mmap, where: str, *, skip: Callable[[dict], Collection[str]] | None = None,
           release: Any = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(header without the container keys, {name: array}) of a file's bytes; ``where`` names the
    file in messages. Raises :class:`BundleError` on anything malformed. ``skip(header)``: names of
    buffers that are checked (checksum, layout) but not returned; ``release(start, stop)`` is told
    each range of the buffers once its checksum is taken (see :func:`read`)."""
    if len(data) < _PREFIX.size:
        raise BundleError(f"{where}: file truncated ({len(data)} bytes): not a refitcore engine")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{where}: not a refitcore engine file (bad magic {magic!r})")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{where}: engine file format version {version} is not supported (this refitcore reads "
                          f"version {BUNDLE_VERSION}); recompile and save again")
    start = _PREFIX.size
    if len(data) < start + head_len + _CRC.size:
        raise BundleError(f"{where}: file truncated inside the header ({len(data)} bytes)")
    head = data[start:start + head_len]
    (crc,) = _CRC.unpack_from(data, start + head_len)
    if zlib.crc32(head) != crc:
        raise BundleError(f"{where}: header checksum mismatch: the file is corrupted")
    check_depth(head, where)
    try:
        header = json.loads(head.decode("utf-8"))
    except RecursionError as err:
        raise BundleError(f"{where}: engine file content is invalid: the header nests too deeply") from err
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError both
        raise BundleError(f"{where}: the header is not valid UTF-8 JSON ({err}); the file is corrupted or "
                          f"was not written by refitcore") from err
    if not isinstance(header, dict):
        raise BundleError(f"{where}: the header is not a JSON object; not a refitcore engine")
    body = memoryview(data)[start + head_len + _CRC.size:]
    if "buffers_nbytes" not in header or "buffers_crc32" not in header or "buffers" not in header:
        missing = [k for k in ("buffers", "buffers_nbytes", "buffers_crc32") if k not in header]
        raise BundleError(f"{where}: engine file content is invalid: the header lacks {missing}")
    total = expect(header.pop("buffers_nbytes"), int, "buffers_nbytes", where)
    if len(body) != total:
        raise BundleError(f"{where}: file truncated: {len(body)} of {total} weight bytes present")
    if _crc32(body, release) != expect(header.pop("buffers_crc32"), int, "buffers_crc32", where):
        raise BundleError(f"{where}: weight data checksum mismatch: the file is corrupted")
    entries = expect(header.pop("buffers"), list, "buffers", where)
    skipped = set(skip(header)) if skip is not None else set()
    seen: set = set()
    arrays, start = {}, 0
    for i, e in enumerate(entries):
        name, arr = _buffer(e, i, body, seen, where, start, skipped)
        start += e["nbytes"]
        if arr is not None:
            arrays[name] = arr
    if start != len(body):
        raise BundleError(f"{where}: engine file content is invalid: the buffers cover {start} of the "
                          f"{len(body)} weight bytes")
    return header, arrays


def write(path: str | os.PathLike, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write a file atomically (:func:`refitcore.engine.fileio.atomic_write`): concurrent writers and
    readers of one path never see a partial file, and a failed write leaves no temporary file. The
    weights go to the file from their own memory, one array at a time (no copy of them is made)."""
    front, views = _layout(header, arrays)

    def stream(f) -> None:
        f.write(front)
        for view in views:
            f.write(view)

    atomic_write(path, stream)


def read(path: str | os.PathLike, *,
         skip: Callable[[dict], Collection[str]] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a file written by :func:`write`; :class:`BundleError` on a bad file.

    The file is memory-mapped, never read whole: each array is copied out of the mapping once,
    and the checksum pass drops the pages it read. ``skip(header)``: the names of buffers that are
    checked but not returned (an engine loaded without its weights reads none of them)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return unpack(b"", path)
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    head = _PREFIX.size
    if len(data) >= head:
        head += _PREFIX.unpack_from(data)[2] + _CRC.size
    page = mmap.PAGESIZE

    def release(start: int, stop: int) -> None:   # body offsets -> whole pages of the file
        lo, hi = -(-(head + start) // page) * page, (head + stop) // page * page
        if hasattr(mmap, "MADV_DONTNEED") and hi > lo:
            data.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    try:
        return unpack(data, path, skip=skip, release=release)
    finally:
        with contextlib.suppress(BufferError):   # a view is still alive (a raised error holds one): left to the GC
            data.close()
