"""Compare two mappings ``{engine weight name: array}`` weight by weight."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from refitcore import dtypes
from refitcore.options import AUDIT_ATOL, AUDIT_RTOL

__all__ = ["audit", "audit_paths", "Audit", "WeightDiff"]


@dataclasses.dataclass(frozen=True)
class WeightDiff:
    name: str
    status: str               # ok | missing | extra | shape | dtype | nonfinite | value
    max_abs: float = 0.0
    max_rel: float = 0.0      # max_abs / max|b| of that weight
    index: tuple[int, ...] | None = None
    a_value: float | None = None
    b_value: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __str__(self) -> str:
        if self.status in ("missing", "extra", "shape", "dtype", "nonfinite"):
            return f"{self.name}: {self.status} ({self.detail})"
        where = f" at {list(self.index)} ({self.a_value:.6g} vs {self.b_value:.6g})" if self.index is not None else ""
        return f"{self.name}: {self.status}, max abs diff {self.max_abs:.3g}, rel {self.max_rel:.3g}{where}"


_SEVERITY = {"missing": 5, "extra": 5, "shape": 4, "dtype": 3, "nonfinite": 3, "value": 2, "ok": 0}


@dataclasses.dataclass
class Audit:
    """Per-weight verdicts; truthy when every weight agrees. ``str()`` leads with the worst weight."""

    diffs: list[WeightDiff]
    a_label: str
    b_label: str
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failures(self) -> list[WeightDiff]:
        return sorted((d for d in self.diffs if not d.ok), key=lambda d: (-_SEVERITY[d.status], -d.max_rel))

    @property
    def worst(self) -> WeightDiff | None:
        fails = self.failures
        if fails:
            return fails[0]
        return max(self.diffs, key=lambda d: d.max_rel, default=None)

    def first_failure(self, order: list[str] | None = None) -> WeightDiff | None:
        """The first disagreeing weight in engine order (``order``), else the worst."""
        bad = {d.name: d for d in self.diffs if not d.ok}
        for name in order or []:
            if name in bad:
                return bad[name]
        return self.worst if bad else None

    def __str__(self) -> str:
        head = (f"audit {self.a_label} vs {self.b_label}: "
                f"{'OK' if self.ok else 'FAILED'} ({len(self.diffs)} weights, {len(self.failures)} disagree; "
                f"rtol={self.rtol:g} of each weight's max |value|, atol={self.atol:g})")
        lines = [head]
        if self.ok and self.worst is not None:
            lines.append(f"  closest to failing: {self.worst}")
        fails = self.failures
        for d in fails[:20]:
            lines.append(f"  - {d}")
        if len(fails) > 20:
            lines.append(f"  ... and {len(fails) - 20} more")
        if fails:
            value_fails = [d for d in fails if d.status == "value"]
            if len(value_fails) == len(fails):
                lines.append(f"  would pass with rtol>={max(d.max_rel for d in fails):.3g} "
                             f"or atol>={max(d.max_abs for d in fails):.3g}")
            else:
                lines.append(f"  no tolerance would pass: {len(fails) - len(value_fails)} weight(s) are missing, "
                             f"extra, non-finite or of another shape/dtype")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "a": self.a_label, "b": self.b_label, "rtol": self.rtol, "atol": self.atol,
                "failures": [dataclasses.asdict(d) for d in self.failures],
                "worst": dataclasses.asdict(self.worst) if self.worst else None}


def _compare(name: str, a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> WeightDiff:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        return WeightDiff(name, "dtype", detail=f"{a.dtype} vs {b.dtype}")
    if a.size != b.size or (a.shape != b.shape and a.ndim > 1 and b.ndim > 1):
        return WeightDiff(name, "shape", detail=f"{list(a.shape)} vs {list(b.shape)}")
    if a.shape != b.shape:  # one side flat (TensorRT hands kernels back flat): compare values
        a = a.reshape(b.shape) if b.ndim > 1 else a.reshape(-1)
        b = b.reshape(a.shape)
    if a.size == 0 or np.array_equal(a, b):
        # Bit-identical (the common case for copied weights): skip the float64 pass, which costs
        # seconds on the 100M-element classifier weights of VGG-class models.
        return WeightDiff(name, "ok")
    a, b = dtypes.as_float(a), dtypes.as_float(b)   # bfloat16 bit patterns as their values
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not (fa.all() and fb.all()) and not np.array_equal(a, b, equal_nan=True):
        return WeightDiff(name, "nonfinite", detail=f"{int((~fa).sum())} vs {int((~fb).sum())} non-finite values")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    diff[~(fa & fb)] = 0.0
    flat = int(np.argmax(diff))
    max_abs = float(diff.reshape(-1)[flat])
    scale = float(np.max(np.abs(b64[fb]))) if fb.any() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    idx = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    status = "ok" if (max_abs <= atol or max_rel <= rtol) else "value"
    return WeightDiff(name, status, max_abs, max_rel, idx, float(a.reshape(-1)[flat]), float(b.reshape(-1)[flat]))


def audit(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, rtol: float = 1e-5, atol: float = 1e-7,
          a_label: str = "a", b_label: str = "b") -> Audit:
    """Compare two mappings weight by weight: missing (in a), extra (in a only), shape/dtype mismatch,
    max abs and relative difference (relative to the weight's largest magnitude in ``b``).

    Example::

        report = refitcore.audit(cached, fallback, a_label="cached", b_label="fallback")
        assert report.ok, str(report)
    """
    diffs = []
    for name in b:
        if name not in a:
            diffs.append(WeightDiff(name, "missing", detail=f"in {b_label} but not in {a_label}"))
        else:
            diffs.append(_compare(name, a[name], b[name], rtol, atol))
    for name in a:
        if name not in b:
            diffs.append(WeightDiff(name, "extra", detail=f"in {a_label} but not in {b_label}"))
    return Audit(diffs, a_label, b_label, rtol, atol)


def audit_paths(cached: Mapping[str, np.ndarray], fallback: Mapping[str, np.ndarray], *,
                rtol: float = AUDIT_RTOL, atol: float = AUDIT_ATOL) -> Audit:
    """``audit(cached, fallback)`` with the tolerance the two refit paths are held to: exact by
    default. Both paths compute every engine weight with one arithmetic (copies and replayed ATen
    ops on the same float32 operands; BatchNorm folds by the same functions in
    :mod:`refitcore.conversion.recipes`, in float64, cast once to float32), so any difference at
    all is a bug in the operand plumbing (wrong key, eps, axis, recipe, op), not rounding.

    Example::

        report = refitcore.audit_paths(cached_mapping(wm, sd), fallback_mapping(engine, sd))
        assert report, str(report)
    """
    return audit(cached, fallback, rtol=rtol, atol=atol, a_label="cached", b_label="fallback")
