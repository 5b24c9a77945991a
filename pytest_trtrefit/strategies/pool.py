"""The pool of random values that weight sets are cut from: one seeded draw per process, so that a
weight costs a memory copy, not a fresh Gaussian draw.

Each pool holds :data:`POOL_SIZE` float32 values drawn once from :data:`POOL_SEED` (standard normal
or uniform in [-1, 1)) and is cached for the process. :func:`take` gives a tensor of any shape as a
slice of a pool at an offset, times a sign, both drawn from the caller's generator (seeded from the
example's seed), so the same seed gives the same tensors in every process. Tensors drawn by one
:class:`Cutter` never share an offset: two tensors of one size differ (one is never the other, nor
its negation), which keeps a swapped pair of same-shaped weights visible. A tensor larger than a
pool is drawn afresh from the generator.
"""
from __future__ import annotations

import functools
import math

__all__ = ["POOL_SIZE", "POOL_SEED", "KINDS", "pool", "Cutter"]

POOL_SIZE = 1 << 22      # 4,194,304 values: 16 MiB per pool, larger than most single weights
POOL_SEED = 0x7E5EED
KINDS = ("normal", "uniform")


@functools.cache
def pool(kind: str, seed: int = POOL_SEED):
    """The process's pool of ``kind`` (:data:`KINDS`) values drawn from ``seed``, drawn on first use."""
    import torch

    g = torch.Generator().manual_seed(seed + KINDS.index(kind))
    return torch.randn(POOL_SIZE, generator=g) if kind == "normal" else torch.rand(POOL_SIZE, generator=g) * 2 - 1


class Cutter:
    """Cuts tensors from the pools, drawing each offset and sign from the generator ``g``."""

    def __init__(self, g):
        self.g = g
        self.taken: dict[tuple[str, int], set[int]] = {}

    def take(self, kind: str, shape, scale: float = 1.0):
        """A float32 tensor of ``shape``: ``scale`` times standard normal values (``kind='normal'``) or
        values uniform in [-1, 1) (``'uniform'``)."""
        import torch

        n = math.prod(shape)
        if n > POOL_SIZE:      # larger than a pool: a fresh draw, as large tensors are rare
            fresh = torch.randn(shape, generator=self.g) if kind == "normal" else \
                torch.rand(shape, generator=self.g) * 2 - 1
            return fresh * scale
        span = POOL_SIZE - n + 1
        taken = self.taken.setdefault((kind, n), set())
        while True:
            r = int(torch.randint(0, 2 * span, (1,), generator=self.g))
            offset, sign = r >> 1, (1.0 if r & 1 else -1.0)
            if offset not in taken or len(taken) >= span:
                break
        taken.add(offset)
        return pool(kind)[offset:offset + n].view(tuple(shape)) * (sign * scale)
