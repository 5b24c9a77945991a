"""Refit error baselines: store the worst errors of a run, fail a later run where they grew.

``--trt-refit-baseline=save`` writes one JSON file per model (``<dir>/<model>.json``, atomically)
holding the worst output error of every check of that model (engine vs eager: max abs and max
rel) and, per engine weight, the largest discrepancy between the cached and the fallback mapping
(max abs diff). ``--trt-refit-baseline=compare`` reads them back and fails the run when a value
grew more than ``--trt-refit-baseline-factor`` times (values below :data:`FLOOR` are rounding
noise and never a regression). Like pytest-benchmark's ``--benchmark-autosave`` /
``--benchmark-compare``: save on a known-good checkpoint, compare on the next one. Use the same
``--trt-refit-seed`` for both runs so that both draw the same weights and inputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from typing import Any

from .records import RunRecords

__all__ = ["BASELINE_SCHEMA", "FLOOR", "collect", "save", "compare", "Change", "Comparison", "BaselineError",
           "file_for"]

BASELINE_SCHEMA = "trtrefit.baseline/1"
# Values below these are rounding noise, never a regression: a baseline of 0 (bit-identical
# mappings, an exact engine) must not turn every later 1e-9 into an "infinite" regression.
# Output errors: float32 networks round at ~1e-7 per op, summed over a layer stack. Cached vs
# fallback mappings: both are deterministic functions of one state_dict, so any difference above
# float32's epsilon (1.2e-7 at magnitude 1) is a recipe computing something else.
FLOOR = {"output": 1e-6, "weight": 1e-7}


class BaselineError(Exception):
    """A baseline file that cannot be read (damaged, another schema): says which and what to do."""


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _worse(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return max(a, b)


def collect(data: RunRecords) -> dict[str, dict]:
    """Per model, from a run's merged records: ``{"output": {max_abs, max_rel}, "weights": {name: max
    abs diff}, "order": [engine weight names in engine order], "checks": n}``. Checks that failed
    inside a test that expected it (``pytest.raises``) are left out."""
    expected = {f.test for f in data.expected_failures}
    expected |= {r.test for r in data.checks if r.expected_failure}
    models: dict[str, dict] = {}
    for r in data.checks:
        if r.test in expected:
            continue
        m = models.setdefault(r.model, {"output": {"max_abs": None, "max_rel": None}, "weights": {}, "order": [],
                                        "checks": 0})
        m["checks"] += 1
        for k in ("max_abs", "max_rel"):
            m["output"][k] = _worse(m["output"][k], _num(getattr(r, k)))
    for entry in data.layers:
        if entry.test in expected or entry.model not in models:
            continue
        m = models[entry.model]
        for name, diff, _status in entry.weights:
            if name not in m["weights"]:
                m["order"].append(name)
            m["weights"][name] = _worse(m["weights"].get(name), _num(diff))
    return models


def file_for(directory: str, model: str) -> str:
    """The baseline file of ``model``: its name made file-safe (plus a short hash when that changed it)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    if safe != model or not safe:
        safe = f"{safe}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"
    return os.path.join(directory, f"{safe}.json")


def _encode(x: float | None):
    return x if x is None or math.isfinite(x) else str(x)


def save(models: dict[str, dict], directory: str, *, seed: int, backend: str | None) -> list[str]:
    """Write one baseline file per model (atomically); returns the paths written."""
    from refitcore.engine.fileio import atomic_write

    os.makedirs(directory, exist_ok=True)
    written = []
    for name, m in sorted(models.items()):
        doc = {"schema": BASELINE_SCHEMA, "model": name, "seed": seed, "backend": backend, "checks": m["checks"],
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "output": {k: _encode(v) for k, v in m["output"].items()},
               "weights": [[w, _encode(m["weights"][w])] for w in m["order"]]}
        path = file_for(directory, name)
        atomic_write(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8"))
        written.append(path)
    return written


def load(path: str) -> dict:
    """A baseline file, checked: raises :class:`BaselineError` naming the file and the fix."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as err:
        raise BaselineError(f"baseline {path}: cannot be read ({err}); save it again with "
                            f"--trt-refit-baseline=save") from err
    if not isinstance(doc, dict) or doc.get("schema") != BASELINE_SCHEMA:
        raise BaselineError(f"baseline {path}: not a {BASELINE_SCHEMA} file (schema "
                            f"{doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}); save it "
                            f"again with --trt-refit-baseline=save")
    try:
        weights = {str(w): _num(v) for w, v in doc["weights"]}
        output = {k: _num(doc["output"].get(k)) for k in ("max_abs", "max_rel")}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BaselineError(f"baseline {path}: malformed ({type(err).__name__}: {err}); save it again") from err
    return {"model": doc.get("model"), "seed": doc.get("seed"), "backend": doc.get("backend"), "output": output,
            "weights": weights}


@dataclasses.dataclass(frozen=True)
class Change:
    model: str
    what: str                 # "output max abs", "output max rel" or "weight <engine weight>"
    old: float | None
    new: float | None
    regression: bool

    @property
    def ratio(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        if self.old == 0:
            return math.inf if self.new > 0 else 1.0
        return self.new / self.old


def _regressed(old: float | None, new: float | None, factor: float, floor: float) -> bool:
    if new is None:
        return False
    if math.isnan(new) or math.isinf(new):
        return old is None or math.isfinite(old)
    if old is None or math.isnan(old):
        return False
    return new > factor * max(old, floor)


@dataclasses.dataclass
class Comparison:
    """Truthy when no model regressed (and at least one had a baseline); ``str()`` the table of changes."""

    changes: list[Change]
    factor: float
    directory: str
    missing: list[str]        # models of this run without a baseline
    not_run: list[str]        # baselines of models this run did not check
    notes: list[str]

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    @property
    def compared(self) -> int:
        return len({c.model for c in self.changes})

    @property
    def ok(self) -> bool:
        return not self.regressions and self.compared > 0

    def __bool__(self) -> bool:
        return self.ok

    def lines(self, limit: int = 15) -> list[str]:
        if self.compared == 0:
            return [f"baseline compare FAILED: no model of this run has a baseline in {self.directory} "
                    f"(save one first with --trt-refit-baseline=save)"]
        bad = self.regressions
        head = (f"baseline compare: {'OK' if not bad else 'REGRESSION'}: {self.compared} model(s) against "
                f"{self.directory}, factor {self.factor:g}")
        if bad:
            head += f"; {len(bad)} value(s) grew beyond it: " + ", ".join(
                sorted({f"{c.model} ({c.what})" for c in bad})[:8])
        shown = bad + sorted((c for c in self.changes if not c.regression and c.what.startswith("output")),
                             key=lambda c: c.model)
        shown += sorted((c for c in self.changes if c not in shown and (c.ratio or 0) != 1.0),
                        key=lambda c: -(c.ratio or 0))
        shown = shown[:limit]
        width = max([len("model"), *(len(c.model) for c in shown)])
        what_w = max([len("value"), *(len(c.what) for c in shown)])
        out = [head, f"{'model':<{width}}  {'value':<{what_w}}  {'old':>10} {'new':>10} {'ratio':>8}  verdict"]
        for c in shown:
            ratio = "-" if c.ratio is None else ("inf" if math.isinf(c.ratio) else f"{c.ratio:.3g}x")
            out.append(f"{c.model:<{width}}  {c.what:<{what_w}}  {_fmt(c.old):>10} {_fmt(c.new):>10} {ratio:>8}  "
                       + ("REGRESSION" if c.regression else "ok"))
        if len(self.changes) > len(shown):
            out.append(f"... {len(self.changes) - len(shown)} more value(s) within the factor")
        out += [f"no baseline for model {m!r} (save one with --trt-refit-baseline=save)" for m in self.missing]
        out += [f"baseline of model {m!r} not compared: this run did not check it" for m in self.not_run]
        out += self.notes
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines(limit=10 ** 6))

    def to_json(self) -> dict:
        return {"ok": self.ok, "factor": self.factor, "directory": self.directory, "compared": self.compared,
                "missing": self.missing, "not_run": self.not_run, "notes": self.notes,
                "changes": [{"model": c.model, "what": c.what, "old": c.old, "new": c.new, "ratio": c.ratio,
                             "regression": c.regression} for c in self.changes]}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def compare(models: dict[str, dict], directory: str, *, factor: float, seed: int | None = None) -> Comparison:
    """Compare this run's values (:func:`collect`) with the baseline files in ``directory``."""
    changes: list[Change] = []
    missing, notes = [], []
    for name, m in sorted(models.items()):
        path = file_for(directory, name)
        if not os.path.exists(path):
            missing.append(name)
            continue
        base = load(path)
        if seed is not None and base["seed"] is not None and base["seed"] != seed:
            notes.append(f"note: the baseline of {name!r} was saved with --trt-refit-seed={base['seed']}, this run "
                         f"used {seed}: other weights and inputs; pass the same seed to compare like with like")
        for key, label in (("max_abs", "output max abs"), ("max_rel", "output max rel")):
            old, new = base["output"][key], m["output"][key]
            changes.append(Change(name, label, old, new, _regressed(old, new, factor, FLOOR["output"])))
        for w in m["order"]:
            if w in base["weights"]:
                old, new = base["weights"][w], m["weights"][w]
                changes.append(Change(name, f"weight {w}", old, new, _regressed(old, new, factor, FLOOR["weight"])))
        gone = [w for w in base["weights"] if w not in m["weights"]]
        if gone and m["weights"]:
            notes.append(f"note: {len(gone)} engine weight(s) of the {name!r} baseline are not in this run "
                         f"(e.g. {gone[0]!r}): the architecture changed? save a new baseline")
    seen = set(models)
    not_run = []
    if os.path.isdir(directory):
        for f in sorted(os.listdir(directory)):
            if f.endswith(".json"):
                try:
                    model = load(os.path.join(directory, f))["model"]
                except BaselineError as err:
                    notes.append(str(err))
                    continue
                if model not in seen:
                    not_run.append(model)
    return Comparison(changes, factor, directory, missing, not_run, notes)
