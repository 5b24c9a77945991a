"""What MutableEngine's check for edits costs per call, on resnet50 and a ~250M-parameter model.

Before each call a MutableEngine checks that the engine still matches the model: the architecture
fingerprint (non-tensor attributes, code) and every parameter and buffer. ``check="content"`` (the
default) compares each tensor bit for bit with a copy of the values the engine holds;
``check="version"`` (the named cheaper mode) looks at version counters only. Measured: ``sync()``
with nothing changed in both modes, its parts, a checksum of the same bytes (blake2b, crc32: the
alternative to keeping a copy), and the eager forward for scale.

    python benchmarks/bench_mutable_check.py [--models resnet50,linear250m] [--reps 9] [--no-record]
"""
from __future__ import annotations

import argparse
import hashlib
import zlib

import _common as C


def _linear_stack(layers: int = 15, width: int = 4096):
    """``layers`` Linear(width, width) with ReLU between: 15 x 4096^2 = 251.7M parameters (1.0 GB)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval(), torch.randn(1, width)


def _checksum(model, fn) -> int:
    import torch

    out = 0
    for t in model.state_dict().values():
        out ^= fn(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return out


def _model(name: str):
    import torch

    if name == "linear250m":
        return _linear_stack()
    import torchvision

    from tests.models import randomize_batchnorm

    model = randomize_batchnorm(getattr(torchvision.models, name)(weights=None), seed=0).eval()
    return model, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _measure(name: str, reps: int) -> list:
    import torch

    import refitcore
    from refitcore.cache.key import architecture_fingerprint

    model, x = _model(name)
    params = sum(t.numel() for t in model.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fast = refitcore.MutableEngine(model, x, backend="reference", verify=False)

    def sync(mode: str):
        fast.check = mode
        assert fast.sync() == "none"

    def compare():
        fast.check = "content"
        assert fast._changed() == []

    def blake2b(b) -> int:
        return int.from_bytes(hashlib.blake2b(b).digest()[:8], "little")

    with torch.no_grad():
        t = C.interleaved({
            "content": lambda: sync("content"),
            "version": lambda: sync("version"),
            "architecture": lambda: architecture_fingerprint(model),
            "compare": compare,
            "blake2b": lambda: _checksum(model, blake2b),
            "crc32": lambda: _checksum(model, zlib.crc32),
            "eager": lambda: model(x),
        }, reps=reps)
    m = {k: C.median(v) for k, v in t.items()}
    print(name, {k: C.ms(v) for k, v in m.items()}, flush=True)
    return [name, f"{params / 1e6:.1f}M", f"{nbytes / 2**20:.0f} MiB", C.ms(m["content"]), C.ms(m["version"]),
            C.ms(m["architecture"]), C.ms(m["compare"]), C.ms(m["blake2b"]), C.ms(m["crc32"]), C.ms(m["eager"])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,linear250m")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    info = C.machine_info()
    rows = [_measure(name, args.reps) for name in args.models.split(",")]
    body = C.table(["model", "parameters", "state_dict", "check='content' (default, sync)",
                    "check='version' (sync)", "architecture fingerprint", "bitwise compare with the copy",
                    "blake2b of the bytes", "crc32 of the bytes", "eager forward (for scale)"], rows)
    C.record("mutable_check", "MutableEngine: cost per call of the check for edits", body, info, [
        f"median of {args.reps} interleaved repetitions after one warm-up; reference backend; nothing changed "
        f"between calls (the cost every call pays); resnet50 at 1x3x64x64, linear250m = 15 x Linear(4096, 4096) "
        f"at batch 1",
        "check='content' = architecture fingerprint + every tensor compared bit for bit with a copy "
        "(numpy.array_equal of integer views on CPU, torch.equal on a GPU); the checksums are the alternative "
        "to holding the copy (the same bytes read once, no copy held, but one hash per call on one core)",
    ], save=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
