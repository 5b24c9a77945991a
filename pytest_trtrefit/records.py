"""The typed records of a ``pytest --trt-refit`` run: what the report recorder keeps and every
report (terminal summary, JSON, JUnit properties, baselines, HTML) is made of.

Each record is a small frozen dataclass with ``as_dict()`` (its JSON form: the shape the JSON
report and a pytest-xdist worker's message carry) and ``from_dict()`` (back from that form, on the
controller). Records are built in one place each: checks and failures from a check's outcome
(:mod:`.recorder`), builds by the engine provider (:mod:`.engines`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = ["CheckRecord", "FailureRecord", "BuildRecord", "WeightDiff", "LayerRecord", "RunRecords"]

_METRICS = ("max_abs", "max_rel", "norm_rel", "min_rtol", "min_atol", "margin")


def _present(record, names: Iterable[str]) -> dict[str, Any]:
    """``{name: value}`` of the fields among ``names`` that are set (not None)."""
    return {n: getattr(record, n) for n in names if getattr(record, n) is not None}


@dataclasses.dataclass(frozen=True)
class CheckRecord:
    """One check: one weight set through one refit path, compared with eager."""

    model: str
    path: str
    ok: bool
    test: str | None = None          # the pytest node id that ran it
    kind: str = "check"              # check | sequence
    seconds: float = 0.0
    backend: str | None = None
    worker: str | None = None        # the pytest-xdist worker, None outside xdist
    max_abs: float | None = None     # the worst output's errors (absent when no output was compared)
    max_rel: float | None = None
    norm_rel: float | None = None
    min_rtol: float | None = None
    min_atol: float | None = None
    margin: float | None = None      # max over outputs and elements of |err| / allowed err (<= 1 passes)
    output: str | None = None        # the worst output's pytree path
    failed_outputs: tuple[str, ...] = ()
    error: str | None = None         # the first line of a refit/mapping error
    culprit: str | None = None       # the engine weight to blame
    trt_share: float | None = None
    architecture: str | None = None  # the compile-cache key's architecture (16 hex digits)
    expected_failure: bool = False   # failed inside a test that expected it (pytest.raises)

    def as_dict(self) -> dict[str, Any]:
        out = {"test": self.test, "model": self.model, "kind": self.kind, "path": self.path, "ok": self.ok,
               "seconds": self.seconds, "backend": self.backend, "worker": self.worker}
        out.update(_present(self, (*_METRICS, "output", "error", "culprit", "trt_share", "architecture")))
        if self.failed_outputs:
            out["failed_outputs"] = list(self.failed_outputs)
        if self.expected_failure:
            out["expected_failure"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CheckRecord:
        return cls(**{**data, "failed_outputs": tuple(data.get("failed_outputs", ()))})


@dataclasses.dataclass(frozen=True)
class FailureRecord:
    """A failed check (all its failing paths), with its mismatch report."""

    model: str
    paths: tuple[str, ...]
    report: str
    test: str | None = None
    kind: str = "check"
    mappings_disagree: bool = False  # the cached and the fallback mapping disagree on a weight
    outputs: tuple[str, ...] = ()    # the failing outputs' pytree paths
    culprit: str | None = None
    audit_only: bool = False         # every path matched eager; only the exact audit of the mappings failed
    audit: str | None = None         # what the failed audit compared, when not the cached and fallback mappings

    def as_dict(self) -> dict[str, Any]:
        out = {"test": self.test, "model": self.model, "kind": self.kind, "paths": list(self.paths),
               "mappings_disagree": self.mappings_disagree, "audit_only": self.audit_only,
               "outputs": list(self.outputs), "culprit": self.culprit,
               "report": self.report}
        out.update(_present(self, ("audit",)))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FailureRecord:
        return cls(**{**data, "paths": tuple(data["paths"]), "outputs": tuple(data.get("outputs", ()))})


@dataclasses.dataclass
class BuildRecord:
    """One engine the session compiled or loaded from the engine cache. Not frozen: exporting a
    cached engine for the fallback path later counts towards its build (``compile_s``,
    ``exported_on_hit``)."""

    model: str
    architecture: str | None = None
    inputs: list = dataclasses.field(default_factory=list)   # the example's tensor shapes
    backend: str | None = None
    compile_s: float = 0.0
    worker: str | None = None
    cache: str | None = None         # hit | miss (None: no engine cache)
    profiles: list | None = None     # the engine's shape ranges, when it has them
    note: str | None = None          # why it was rebuilt
    exported_on_hit: bool | None = None
    compiler: str | None = None      # refitcore | torch_tensorrt (refitcore.options.COMPILERS)
    compiler_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "architecture": self.architecture, "inputs": self.inputs, "backend": self.backend,
               "compile_s": self.compile_s, "worker": self.worker, "cache": self.cache}
        out.update(_present(self, ("profiles", "note", "exported_on_hit", "compiler", "compiler_version")))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BuildRecord:
        return cls(**data)


class WeightDiff(NamedTuple):
    """One engine weight: the max abs difference of the cached and the fallback mapping, its status."""

    name: str
    max_abs: float | None
    status: str


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """Per engine weight (engine order), the cached vs fallback discrepancy of one check."""

    model: str
    weights: tuple[WeightDiff, ...]
    test: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"test": self.test, "model": self.model, "weights": [list(w) for w in self.weights]}

    @classmethod
    def from_dict(cls, data: dict) -> LayerRecord:
        return cls(data["model"], tuple(WeightDiff(*w) for w in data["weights"]), data.get("test"))


@dataclasses.dataclass
class RunRecords:
    """Everything the reports of a run are made of: one process's records (:meth:`ReportRecorder.part`),
    or every process's merged (:meth:`merge`)."""

    checks: list[CheckRecord] = dataclasses.field(default_factory=list)
    failures: list[FailureRecord] = dataclasses.field(default_factory=list)
    builds: list[BuildRecord] = dataclasses.field(default_factory=list)
    layers: list[LayerRecord] = dataclasses.field(default_factory=list)
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)   # test node id -> passed | failed | skipped
    collection: dict[str, list] = dataclasses.field(default_factory=dict)  # declared models added / deselected
    backend: str | None = None
    backend_reason: str | None = None
    engine_cache: str | None = None
    expected_failures: list[FailureRecord] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (what a pytest-xdist worker sends its controller)."""
        return {"records": [r.as_dict() for r in self.checks], "failures": [f.as_dict() for f in self.failures],
                "builds": [b.as_dict() for b in self.builds], "layers": [x.as_dict() for x in self.layers],
                "outcomes": dict(self.outcomes), "collection": {k: list(v) for k, v in self.collection.items()},
                "backend": self.backend, "backend_reason": self.backend_reason, "engine_cache": self.engine_cache}

    @classmethod
    def from_dict(cls, data: dict) -> RunRecords:
        return cls([CheckRecord.from_dict(r) for r in data.get("records", [])],
                   [FailureRecord.from_dict(f) for f in data.get("failures", [])],
                   [BuildRecord.from_dict(b) for b in data.get("builds", [])],
                   [LayerRecord.from_dict(x) for x in data.get("layers", [])],
                   dict(data.get("outcomes", {})), dict(data.get("collection") or {}), data.get("backend"),
                   data.get("backend_reason"), data.get("engine_cache"))

    @classmethod
    def merge(cls, parts: Iterable[RunRecords]) -> RunRecords:
        """The controller's own records and each pytest-xdist worker's, as one run. A failing check
        inside a test that passed was expected by that test (``pytest.raises``): it is marked
        ``expected_failure`` and its failure moves to ``expected_failures``."""
        out = cls()
        first = True
        for part in parts:
            out.checks += part.checks
            out.failures += part.failures
            out.builds += part.builds
            out.outcomes.update(part.outcomes)
            out.layers += part.layers
            for key, values in part.collection.items():   # each xdist worker collects
                seen = out.collection.setdefault(key, [])
                seen += [v for v in values if v not in seen]
            if part.backend and not out.backend:
                out.backend, out.backend_reason = part.backend, part.backend_reason
            if first:
                out.engine_cache, first = part.engine_cache, False
        expected = {t for t, o in out.outcomes.items() if o == "passed"}
        out.checks = [dataclasses.replace(r, ok=True, expected_failure=True) if not r.ok and r.test in expected else r
                      for r in out.checks]
        out.expected_failures = [f for f in out.failures if f.test in expected]
        out.failures = [f for f in out.failures if f.test not in expected]
        return out
