"""Atomic, concurrency-safe file writes: readers see the old file or the new one, never a part.

:func:`atomic_write` writes to a temporary file with a unique name in the target's directory
(``tempfile.mkstemp``: two writers never share it), flushes and fsyncs it, then ``os.replace`` s it
over the target (atomic on POSIX and Windows for a path on one file system), and fsyncs the
directory so the rename survives a crash. On any failure the temporary file is removed and the
target is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["atomic_write"]

Writer = Callable[[BinaryIO], None]

# The process umask, read once (os.umask can only be read by setting it): mkstemp creates files
# with mode 0600, and a saved file should get the mode an ordinary open() would give it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview | Writer) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file object) to ``path`` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a platform that cannot open a directory skips it."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)
