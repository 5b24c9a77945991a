"""How much of a compiled model runs in TensorRT: ops, weights, and what fell back to PyTorch and why."""
from __future__ import annotations

import dataclasses
import math

__all__ = ["Coverage", "coverage"]


@dataclasses.dataclass
class Coverage:
    """Ops and weights in TensorRT vs PyTorch. ``fallback``: [(node, op, module path, reason)]."""

    backend: str
    ops_total: int
    ops_tensorrt: int
    weights_total: int            # elements of the state_dict entries the engine reads
    weights_tensorrt: int         # elements read by TensorRT segments
    segments: list[tuple[str, int]] = dataclasses.field(default_factory=list)   # (kind, ops)
    fallback: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    eager_modules: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (module path, why)

    @property
    def op_share(self) -> float:
        return self.ops_tensorrt / self.ops_total if self.ops_total else 1.0

    @property
    def weight_share(self) -> float:
        return self.weights_tensorrt / self.weights_total if self.weights_total else 1.0

    @property
    def fully_converted(self) -> bool:
        return not self.fallback and not self.eager_modules

    def __bool__(self) -> bool:
        return self.fully_converted

    def __str__(self) -> str:
        lines = [f"TensorRT ({self.backend}) runs {self.ops_tensorrt} of {self.ops_total} ops "
                 f"({self.op_share:.0%}) and {self.weight_share:.0%} of the weights "
                 f"({self.weights_tensorrt} of {self.weights_total} elements)"]
        if self.segments:
            lines.append("segments: " + " -> ".join(f"seg{i} {k} ({n} ops)" for i, (k, n) in enumerate(self.segments)))
        if self.fallback:
            lines.append(f"{len(self.fallback)} op(s) run in PyTorch:")
            lines += [f"  {op} at {path or '<top level>'} (node {node}): {reason}"
                      for node, op, path, reason in self.fallback]
        for path, why in self.eager_modules:
            lines.append(f"module {path or '<top level>'} runs eagerly: {why}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"op_share": self.op_share, "weight_share": self.weight_share}


def _numel(spec) -> int:
    return math.prod(spec[0]) if spec else 0


def coverage(engine) -> Coverage:
    """The :class:`Coverage` of a compiled engine (whole-network engines run everything in TensorRT)."""
    wm = engine.weight_map
    hybrid = engine.submodule_impl
    if hybrid is not None:
        return _hybrid_coverage(engine, hybrid)
    plan = engine.partition
    keys_all = set(wm.keys_used)
    if plan is None:
        n_ops = sum(1 for e in engine.graph_entries or [] if e and e[0] == "op")
        total = sum(_numel(wm.key_specs.get(k)) for k in keys_all)
        return Coverage(engine.backend, n_ops, n_ops, total, total)
    kinds = [s.kind for s in engine.segments]
    trt_keys: set[str] = set()
    for name, src in wm.sources.items():
        seg = int(name[3:name.index(":")]) if name.startswith("seg") and ":" in name else 0
        if seg < len(kinds) and kinds[seg] == "tensorrt":
            trt_keys.update(src.keys)
    n_ops = len(plan.counted)
    n_trt = sum(1 for s in plan.segments if s.kind == "tensorrt" for n in s.nodes if n in plan.counted)
    segs = [(s.kind, sum(1 for n in s.nodes if n in plan.counted)) for s in plan.segments]
    fallback = [(node, op, path, reason) for node, (op, path, reason) in plan.fallback.items()]
    return Coverage(engine.backend, n_ops, n_trt, sum(_numel(wm.key_specs.get(k)) for k in keys_all),
                    sum(_numel(wm.key_specs.get(k)) for k in trt_keys), segs, fallback)


def _hybrid_coverage(engine, hybrid) -> Coverage:
    """Compiled submodules in an eager model: their ops and weights against every weight of the model."""
    parts = {path: coverage(sub) for path, sub in hybrid.engines.items()}
    fallback = [(node, op, f"{path}.{p}" if p else path, reason)
                for path, c in parts.items() for node, op, p, reason in c.fallback]
    key_specs = engine.weight_map.key_specs
    total = sum(_numel(v) for v in key_specs.values())
    trt = sum(c.weights_tensorrt for c in parts.values())
    eager = list(engine.eager_modules)
    calls = hybrid.counter.get("eager_calls", 0)
    if calls:
        eager.append(("(compiled submodules)", f"{calls} call(s) met inputs of another shape and ran eagerly"))
    return Coverage(engine.backend, sum(c.ops_total for c in parts.values()),
                    sum(c.ops_tensorrt for c in parts.values()), total, trt,
                    [(f"{p}: {k}", n) for p, c in parts.items() for k, n in (c.segments or [("tensorrt", c.ops_total)])],
                    fallback, eager)
