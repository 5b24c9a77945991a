"""The engine cache: compiled engines stored under a stable key, refitted on a hit instead of built.

A hit skips export, conversion and the backend build: the stored engine is loaded and refitted
with the caller's current weights through its cached weight map (Torch-TensorRT's engine cache
does the same: ``cache_built_engines``/``reuse_cached_engines``, ``BaseEngineCache``). So the
cache is exactly as correct as the cached refit path, which is what this project checks.

An entry is a *weightless* engine (:meth:`refitcore.engine.refittable.RefittableEngine.to_parts` with
``weights=False``; for TensorRT a plan serialized with ``SerializationFlag.EXCLUDE_WEIGHTS``): a hit
sets every weight from the model anyway, so storing the values would only cost disk, reading and
checksumming time (a resnet50 entry is ~0.2 MB instead of ~100 MB). Torch-TensorRT's cache
stores weight-stripped engines for the same reason. A hit whose refit fails leaves nothing
usable behind: the engine is dropped, the entry evicted, and the model compiled.

Storage is behind three methods (:class:`BaseEngineCache`: ``save(key, blob)``, ``load(key)``,
``evict(key)``); :class:`EngineCache` is a directory. An entry is an envelope (magic, version,
a JSON header holding the full key, CRC32) around a saved engine (the bundle format of
:mod:`refitcore.engine.bundle`, which has its own checksums). A damaged entry, or one whose stored key
is not the key asked for, is a miss: it is evicted and rebuilt, never an error or a wrong
engine.

Concurrency, lock-free by design: a writer (:func:`refitcore.engine.fileio.atomic_write`) writes a
uniquely named temporary file in the cache directory, fsyncs it and renames it over the entry
(``os.replace``, atomic on POSIX and on Windows within one volume), so a reader sees no entry or a
complete one, never part of one. Two
writers of one key both write complete engines for that key; the last rename wins. Eviction
only unlinks, and on POSIX a reader that already opened the file still reads all of it; one that
opens it afterwards gets a miss. Evictors racing each other may unlink the same file (ignored)
or evict slightly more than needed; a concurrent writer's entry may briefly exceed the bound
until the next save. No lock file means nothing to go stale when a process is killed, and no
reliance on ``flock`` semantics that network file systems do not all honour. Temporary files of
killed writers are removed after an hour.
"""
from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

from refitcore.cache.key import CACHE_FORMAT_VERSION, CacheKey
from refitcore.engine import bundle
from refitcore.engine.fileio import atomic_write
from refitcore.engine.refittable import RefittableEngine
from refitcore.errors import BundleError, RefitCoreError

__all__ = ["BaseEngineCache", "EngineCache", "as_cache", "pack_entry", "unpack_entry", "lookup", "store",
           "default_cache_dir", "DEFAULT_MAX_BYTES"]

log = logging.getLogger("refitcore")

DEFAULT_MAX_BYTES = 4 << 30                     # 4 GiB
_MAGIC = b"RFCACHE\0"
_PREFIX = struct.Struct("<8sII")                 # magic, envelope version, header length
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_SUFFIX = ".engine"
_STALE_TMP_S = 3600.0


class BaseEngineCache(abc.ABC):
    """What a custom engine cache implements: bytes in, bytes out, by key (a hex digest).

    ``load`` returns None for a missing key; it may return damaged bytes (the caller checks
    them). ``save`` may drop entries to stay within a size bound."""

    @abc.abstractmethod
    def save(self, key: str, blob: bytes) -> None: ...

    @abc.abstractmethod
    def load(self, key: str) -> bytes | bytearray | None: ...

    @abc.abstractmethod
    def evict(self, key: str) -> None: ...


def default_cache_dir() -> str:
    """``$TRTREFIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/refitcore/engines`` (``~/.cache`` by default)."""
    env = os.environ.get("TRTREFIT_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "refitcore", "engines")


class EngineCache(BaseEngineCache):
    """A directory of engines, at most ``max_bytes`` in all (least recently used evicted first).

    Example::

        cache = refitcore.EngineCache("~/.cache/my-engines", max_bytes=2 << 30)
        engine = refitcore.compile(model, x, cache=cache)    # a second run loads and refits
        engine.cache_hit
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes!r}: give a positive number of bytes, such as 4 << 30")
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory or default_cache_dir())))
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"EngineCache({self.directory!r}, max_bytes={self.max_bytes})"

    def path(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"cache key {key!r}: expected up to 128 letters, digits, '_', '-' or '.' "
                             f"(a hex digest)")
        return os.path.join(self.directory, key + _SUFFIX)

    def save(self, key: str, blob: bytes) -> None:
        final = self.path(key)
        if len(blob) > self.max_bytes:
            log.warning("refitcore: engine cache: an entry of %d bytes exceeds the cache's bound of %d bytes; "
                        "not stored (raise max_bytes)", len(blob), self.max_bytes)
            return
        os.makedirs(self.directory, exist_ok=True)
        atomic_write(final, blob)         # unique temp file, fsync, os.replace, directory fsync
        self._shrink(keep=key)

    def load(self, key: str) -> bytearray | None:
        path = self.path(key)
        try:
            with open(path, "rb") as fh:
                # A bytearray read in place: unpacking can then drop the envelope without a copy.
                data = bytearray(os.fstat(fh.fileno()).st_size)
                del data[fh.readinto(data):]
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: the bytes we read are still whole
            os.utime(path)                 # recency for least-recently-used eviction
        return data

    def evict(self, key: str) -> None:
        _unlink(self.path(key))

    def entries(self) -> list[tuple[str, int, int]]:
        """(key, size in bytes, last use in ns), least recently used first."""
        out = []
        for name, st in self._scan():
            if name.endswith(_SUFFIX):
                out.append((name[:-len(_SUFFIX)], st.st_size, st.st_mtime_ns))
        return sorted(out, key=lambda e: (e[2], e[0]))

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def clear(self) -> int:
        """Remove every entry (and temporary file); returns how many entries were removed."""
        n = 0
        for name, _ in self._scan():
            if name.endswith(_SUFFIX) or _is_temporary(name):
                n += name.endswith(_SUFFIX)
                _unlink(os.path.join(self.directory, name))
        return n

    def _scan(self) -> Iterator[tuple[str, os.stat_result]]:
        try:
            it = os.scandir(self.directory)
        except FileNotFoundError:
            return
        with it:
            for e in it:
                try:
                    yield e.name, e.stat()
                except FileNotFoundError:
                    continue

    def _shrink(self, *, keep: str) -> None:
        now = time.time()
        for name, st in list(self._scan()):
            if _is_temporary(name) and now - st.st_mtime > _STALE_TMP_S:
                _unlink(os.path.join(self.directory, name))
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for key, size, _ in entries:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            _unlink(self.path(key))
            total -= size
            log.info("refitcore: engine cache: evicted %s (%d bytes, least recently used)", key[:16], size)


def _is_temporary(name: str) -> bool:
    """A temporary file of :func:`refitcore.engine.fileio.atomic_write` writing an entry."""
    return name.startswith(".") and name.endswith(".tmp") and _SUFFIX + "." in name


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError:          # Windows: open elsewhere; it goes on the next eviction
        pass


def as_cache(cache: Any) -> BaseEngineCache | None:
    """None, a cache object (anything with save/load/evict), or a directory path."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, (str, os.PathLike)):
        return EngineCache(cache)
    if all(callable(getattr(cache, m, None)) for m in ("save", "load", "evict")):
        return cache
    raise TypeError(f"cache={cache!r}: give a directory path, a refitcore.EngineCache, or an object with "
                    f"save(key, blob), load(key) and evict(key)")


# -- entries ------------------------------------------------------------------------------------
def pack_entry(key: CacheKey, engine) -> bytes:
    """The bytes of one cache entry: envelope (with the full key) + the engine's bundle."""
    payload = bundle.pack(*engine.to_parts(weights=False))
    head = json.dumps({"key": key.to_json(), "digest": key.digest, "payload_nbytes": len(payload),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True).encode()
    return _PREFIX.pack(_MAGIC, CACHE_FORMAT_VERSION, len(head)) + head + struct.pack("<I", zlib.crc32(head)) + payload


def unpack_entry(blob: bytes | bytearray, key: CacheKey):
    """The engine in a cache entry; raises :class:`BundleError` when the entry is damaged, of
    another format version, or stored under another key. A bytearray is consumed (its envelope
    is cut off in place)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < _PREFIX.size:
        raise BundleError("cache entry truncated (shorter than its envelope)")
    magic, version, n = _PREFIX.unpack_from(blob)
    if magic != _MAGIC:
        raise BundleError(f"cache entry has a bad magic {magic!r}")
    if version != CACHE_FORMAT_VERSION:
        raise BundleError(f"cache entry format {version}, this refitcore writes {CACHE_FORMAT_VERSION}")
    start = _PREFIX.size
    if len(blob) < start + n + 4:
        raise BundleError("cache entry truncated inside its header")
    head = bytes(blob[start:start + n])
    (crc,) = struct.unpack_from("<I", blob, start + n)
    if zlib.crc32(head) != crc:
        raise BundleError("cache entry header checksum mismatch")
    bundle.check_depth(head, "cache entry header")
    try:
        header = json.loads(head.decode())
        stored = CacheKey.from_json(header["key"])
        nbytes = int(header["payload_nbytes"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise BundleError(f"cache entry header is invalid: {type(err).__name__}: {err}") from err
    if stored != key:
        raise BundleError(f"cache entry was stored under another key (differs in {', '.join(stored.differences(key))})")
    if len(blob) - (start + n + 4) != nbytes:
        raise BundleError(f"cache entry truncated: {len(blob) - (start + n + 4)} of {nbytes} engine bytes present")
    payload: bytes | bytearray
    if isinstance(blob, bytearray):
        del blob[:start + n + 4]          # the envelope goes; CPython drops a bytearray's prefix without copying
        payload = blob
    else:
        payload = bytes(memoryview(blob)[start + n + 4:])
    where = f"engine cache entry {key.digest[:16]}"
    header, arrays = bundle.unpack(payload, where)
    return RefittableEngine.from_parts(header, arrays, where)


def lookup(cache: BaseEngineCache, key: CacheKey):
    """The cached engine for ``key``, or None (a miss; a damaged entry is evicted and is a miss)."""
    try:
        blob = cache.load(key.digest)
    except OSError as err:
        log.warning("refitcore: engine cache: cannot read entry %s (%s); compiling instead", key.digest[:16], err)
        return None
    if blob is None:
        return None
    try:
        return unpack_entry(blob, key)
    except Exception as err:  # noqa: BLE001 - an entry is untrusted data: any failure to load it is a miss
        log.warning("refitcore: engine cache: entry %s is unusable (%s: %s); treated as a miss and replaced",
                    key.digest[:16], type(err).__name__, err)
        with contextlib.suppress(OSError):
            cache.evict(key.digest)
        return None


def store(cache: BaseEngineCache, key: CacheKey, engine) -> bool:
    """Save ``engine`` under ``key``; a cache that cannot be written is reported, never fatal."""
    try:
        cache.save(key.digest, pack_entry(key, engine))
    except (OSError, RefitCoreError, ValueError, TypeError, NotImplementedError) as err:
        # A full disk, or an engine that cannot be saved (yet): compiled, just not cached.
        log.warning("refitcore: engine cache: cannot store entry %s (%s: %s)", key.digest[:16],
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    return True
