"""Atomic, concurrency-safe writes (refitcore/fileio.py) and the bundles saved through them: two
processes saving one path while a third reads it never produce a partial file or a stray temp."""
from __future__ import annotations

import multiprocessing
import os
import stat
import time

import numpy as np
import pytest

import refitcore
from refitcore.engine.fileio import atomic_write
from refitcore.engine.refittable import RefittableEngine

MODEL = "residual"
SAVES = 300   # enough that two writers sharing one temporary name (the old ``PATH.tmp``) fail here


def _writer(path: str, header: dict, arrays: dict, saves: int, ready, start) -> None:
    """A separate process saving its engine to ``path`` again and again (once both are ready)."""
    engine = RefittableEngine.from_parts(header, arrays)
    ready.release()
    start.wait(120)
    for _ in range(saves):
        engine.save(path)


@pytest.mark.slow   # about 30 s on 2 cores: two fresh interpreters import torch
def test_concurrent_saves_and_loads_see_whole_bundles(compiled, tmp_path):
    c = compiled(MODEL)
    a = c.engine
    b = refitcore.refit(a, c.fresh(11)).engine
    marks = {name: (a.current_weights()[name].tobytes(), b.current_weights()[name].tobytes())
             for name in a.weight_names[:1]}
    path = tmp_path / "engine.trtrefit"
    a.save(path)
    ctx = multiprocessing.get_context("spawn")
    ready, start = ctx.Semaphore(0), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(str(path), *e.to_parts(), SAVES, ready, start)) for e in (a, b)]
    for w in writers:
        w.start()
    for _ in writers:
        assert ready.acquire(timeout=120), "a writer did not start"
    start.set()   # both writers save at once: the case a shared temporary name gets wrong
    loads, seen = 0, set()
    deadline = time.monotonic() + 300
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        loaded = refitcore.load(path)          # never a BundleError: a reader sees one whole file
        name, (wa, wb) = next(iter(marks.items()))
        got = loaded.current_weights()[name].tobytes()
        assert got in (wa, wb)
        seen.add("a" if got == wa else "b")
        loads += 1
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0, "a writer failed"
    assert loads > 0
    assert sorted(os.listdir(tmp_path)) == ["engine.trtrefit"], "temporary files were left behind"
    final = refitcore.load(path)
    assert any(np.array_equal(final.current_weights()[n], e.current_weights()[n])
               for e in (a, b) for n in marks)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write(path, b"old contents")

    def half_then_fail(f):
        f.write(b"new con")
        raise OSError("simulated: disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    atomic_write(tmp_path / "a", b"x")
    with open(tmp_path / "b", "wb") as f:
        f.write(b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == stat.S_IMODE(os.stat(tmp_path / "b").st_mode)
    atomic_write(str(tmp_path / "a"), lambda f: f.write(b"yz"))
    assert (tmp_path / "a").read_bytes() == b"yz"
