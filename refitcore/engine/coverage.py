"""How much of a compiled model runs in TensorRT: ops, weights, and what fell back to PyTorch and why.

Each engine kind computes its own (``EngineKind.coverage``, :mod:`refitcore.engine.kinds`);
``engine.summary()`` asks the engine's kind."""
from __future__ import annotations

import dataclasses
import math

__all__ = ["Coverage", "spec_numel", "all_in_tensorrt"]


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


def spec_numel(spec) -> int:
    """Elements of a weight map key spec ``[shape, dtype]`` (0 for None)."""
    return math.prod(spec[0]) if spec else 0


def all_in_tensorrt(engine) -> Coverage:
    """The coverage of an engine whose whole graph runs in TensorRT (its graph entries count the ops)."""
    wm = engine.weight_map
    n_ops = sum(1 for e in engine.graph_entries or [] if e and e[0] == "op")
    total = sum(spec_numel(wm.key_specs.get(k)) for k in set(wm.keys_used))
    return Coverage(engine.backend, n_ops, n_ops, total, total)
