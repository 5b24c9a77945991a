"""The reference backend: a CPU interpreter of our TensorRT network plus a weight store with the
Refitter's contract. It proves the network and the weight mapping right without a GPU; it does
not exercise TensorRT's kernels.

Reduced precision (fp16/bf16 networks) is emulated at layer boundaries: every layer computes in
float32 from its inputs and weights as stored (HALF/BF16 values, widened exactly), and its outputs
are rounded once to the types the network gives them (docs/precision.md)."""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from refitcore import dtypes
from refitcore.backends.base import HostWeights, WeightsPrototype, staged
from refitcore.backends.reference_ops import ELEMENTWISE_OPS, OPS, run_layer_rounded
from refitcore.capture.shapes import ShapeProfiles
from refitcore.conversion.network_reader import LOOP_BOUNDARIES, WEIGHT_ROLES, read_network
from refitcore.options import MAX_TENSOR_ELEMENTS

__all__ = ["NAME", "ReferenceEngine", "ReferenceRefitter", "build", "usable", "load_engine", "NOTE",
           "execution_order", "execution_units", "Loop"]

NAME = "reference"
NOTE = ("reference backend: a CPU interpreter of the TensorRT network; it checks the network and the "
        "weight mapping, not TensorRT's kernels")


def usable() -> tuple[bool, str]:
    return True, "always available (CPU)"


@dataclass(frozen=True)
class Loop:
    """A TensorRT loop in a plan: its boundary layers and the body between them (the layers that
    depend on its iterators and recurrences), in the order one iteration runs them."""

    name: str
    layers: tuple[int, ...]


def _sorted(nodes: list[int], needs: dict[int, set[int]], label) -> list[int]:
    """``nodes`` in dependency order (``needs[n]``: the nodes ``n`` reads), smallest first where
    free; ``ValueError`` naming (by ``label``) the nodes of a cycle."""
    users: dict[int, list[int]] = {n: [] for n in nodes}
    for n in nodes:
        for d in needs[n]:
            users[d].append(n)
    waiting = {n: len(needs[n]) for n in nodes}
    ready = [n for n in nodes if not waiting[n]]
    heapq.heapify(ready)
    order = []
    while ready:
        n = heapq.heappop(ready)
        order.append(n)
        for u in users[n]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):   # a cycle: walk back along the inputs of a node that never ran
        left = {n for n in nodes if waiting[n]}
        path = [min(left)]
        while True:
            nxt = min(d for d in needs[path[-1]] if d in left)
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                break
            path.append(nxt)
        names = " <- ".join(label(n) for n in cycle)
        raise ValueError(f"the layers form a cycle (each reads the output of the next): {names}; "
                         f"a TensorRT network must be acyclic (but for a loop's recurrences)")
    return order


def _loops(layers: list[dict], consumers: dict[str, list[int]]) -> dict[int, str]:
    """Layer index -> name of the loop it belongs to: the loop's boundary layers, and the layers
    reached from its iterators' and recurrences' outputs up to its loop outputs."""
    member: dict[int, str] = {}
    for i, layer in enumerate(layers):
        if layer["type"] in LOOP_BOUNDARIES:
            loop = layer["attrs"].get("loop")
            if not isinstance(loop, str):
                raise ValueError(f"layer {i} ({layer['name'][:60]!r}): a {layer['type']} layer names no loop")
            member[i] = loop
    for i in [i for i in member if layers[i]["type"] in ("ITERATOR", "RECURRENCE")]:
        loop, todo = member[i], [i]
        while todo:
            for t in layers[todo.pop()]["outputs"]:
                for u in consumers.get(t["name"], ()):
                    if member.get(u, loop) != loop:
                        raise NotImplementedError(
                            f"layer {layers[u]['name'][:60]!r} is in loops {member[u]!r} and {loop!r}: nested "
                            f"loops are not interpreted")
                    if u not in member:
                        member[u] = loop
                        todo.append(u)
    return member


def execution_units(plan: dict) -> list[int | Loop]:
    """The plan's layers (indices) and loops in an order where each runs after what makes its
    inputs (TensorRT lets a layer read a tensor made by a layer added after it, e.g. a shuffle's
    shape input), in index order wherever that is free; a recurrence's second input (the next
    iteration's value) is the one back edge allowed. ``ValueError`` naming the layer and tensor
    when an input is made by no layer and is no network input, or naming the layers of a cycle."""
    layers = plan["layers"]
    producer = {t["name"]: i for i, layer in enumerate(layers) for t in layer["outputs"]}
    inputs = {t["name"] for t in plan["inputs"]}
    consumers: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for name in layer["inputs"]:
            if name is not None:
                consumers.setdefault(name, []).append(i)
    member = _loops(layers, consumers)
    first: dict[str, int] = {}   # a loop is one unit, numbered by its first layer
    for i in sorted(member):
        first.setdefault(member[i], i)
    unit = {i: first[member[i]] if i in member else i for i in range(len(layers))}
    needs: dict[int, set[int]] = {i: set() for i in range(len(layers))}   # layer -> layers it reads
    later: dict[int, set[int]] = {i: set() for i in range(len(layers))}   # read for the next iteration
    for i, layer in enumerate(layers):
        for k, name in enumerate(layer["inputs"]):
            if name is None or (name in inputs and name not in producer):
                continue
            if name not in producer:
                raise ValueError(f"layer {i} ({layer['name'][:60]!r}): input {str(name)[:60]!r} is produced by "
                                 f"no layer and is no network input")
            (later if layer["type"] == "RECURRENCE" and k == 1 else needs)[i].add(producer[name])
    label = lambda i: repr(layers[i]["name"][:60])  # noqa: E731
    groups: dict[int, list[int]] = {}
    for i in range(len(layers)):
        groups.setdefault(unit[i], []).append(i)
    unit_needs = {u: {unit[d] for i in group for d in needs[i] | later[i]} - {u} for u, group in groups.items()}
    out: list[int | Loop] = []
    for u in _sorted(list(groups), unit_needs, lambda u: label(u) if u not in member else f"loop {member[u]!r}"):
        if u not in member:
            out.append(u)
            continue
        group = set(groups[u])
        body = _sorted(groups[u], {i: needs[i] & group for i in group}, label)
        trips = [i for i in body if layers[i]["type"] == "TRIP_LIMIT"]
        if len(trips) != 1:
            raise ValueError(f"loop {member[u]!r} has {len(trips)} trip limits (a loop has one; two loops of one "
                             f"name are one loop here)")
        out.append(Loop(member[u], tuple(body)))
    return out


def execution_order(plan: dict) -> list[int]:
    """The layer indices of :func:`execution_units`, a loop's layers in their per-iteration order."""
    return [i for u in execution_units(plan) for i in ((u,) if isinstance(u, int) else u.layers)]


class ReferenceEngine(HostWeights):
    """An immutable plan (layers read off the network) and the current refittable weights."""

    backend_name = NAME
    note = NOTE

    def __init__(self, plan: dict, weights: dict[str, np.ndarray] | None = None):
        self.plan = plan
        if "weight_locations" not in plan:  # freshly read network: move the values into the store
            initial = {}
            locations = {}
            for i, layer in enumerate(plan["layers"]):
                for role in WEIGHT_ROLES.get(layer["type"], ()):
                    arr = layer["weights"].get(role)
                    if arr is not None:
                        name = f"{layer['name']} {role}"
                        locations[name] = [i, role]
                        initial[name] = arr
                layer["weights"] = {}  # the plan keeps structure only; values live in the weight store
            plan["weight_locations"] = locations
            weights = initial if weights is None else weights
        # Engine order (layer by layer, roles in TensorRT's order), whatever order the plan's JSON
        # kept: a saved engine lists its weights exactly as the one it was saved from.
        located = {k: (int(v[0]), v[1]) for k, v in plan["weight_locations"].items()}
        role_rank = lambda i, role: WEIGHT_ROLES.get(plan["layers"][i]["type"], ()).index(role)  # noqa: E731
        self._locations: dict[str, tuple[int, str]] = dict(
            sorted(located.items(), key=lambda kv: (kv[1][0], role_rank(*kv[1]))))
        if weights is None:
            raise ValueError("a deserialized reference plan needs its weights")
        missing = sorted(set(self._locations) - set(weights))
        if missing:
            raise ValueError(f"weights missing for {missing[:5]}")
        self._weights: dict[str, np.ndarray] = {k: np.asarray(weights[k]) for k in self._locations}
        self._profiles = ShapeProfiles.from_json(plan["profiles"]) if plan.get("profiles") else None
        self._units = execution_units(plan)
        self._layer_weights: dict[int, dict[str, str]] = {}
        for name, (i, role) in self._locations.items():
            self._layer_weights.setdefault(i, {})[role] = name

    # ---- introspection -------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.plan["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.plan["outputs"]]

    def weight_names(self) -> list[str]:
        return list(self._locations)

    def rollback_weights(self) -> dict[str, np.ndarray]:
        """The current arrays themselves, not copies: :meth:`commit` swaps new arrays into a new
        dict and never writes a stored array in place, so they stay valid whatever a refit does
        (this saves a full copy of the weights per refit: see benchmarks/README.md)."""
        return dict(self._weights)

    def has_weight(self, name: str) -> bool:
        return name in self._locations

    def missing_with(self, staged) -> list[str]:
        """TensorRT's rule for missing weights: every weight of a layer one of whose weights is in
        ``staged`` must be staged too (a standalone weight never staged is not reported)."""
        touched = {self._locations[n][0] for n in staged}
        return [name for i in sorted(touched) for name in self._layer_weights[i].values() if name not in staged]

    def layer_of(self, name: str) -> str:
        return self.plan["layers"][self._locations[name][0]]["name"]

    # ---- execution -------------------------------------------------------------
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        specs = self.plan["inputs"]
        if len(inputs) != len(specs):
            raise ValueError(f"engine takes {len(specs)} input(s) {self.input_names}, got {len(inputs)}")
        profiles = self._profiles
        for spec, x in zip(specs, inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {spec['name']!r}: expected a torch.Tensor, got {type(x).__name__}")
        if profiles is not None:   # any shape inside an optimization profile, as TensorRT accepts
            by_name = {spec["name"]: tuple(x.shape) for spec, x in zip(specs, inputs)}
            profiles.profile_for([by_name[n] for n in profiles.input_names])
        env: dict[str, torch.Tensor] = {}
        for spec, x in zip(specs, inputs):
            if profiles is None and list(x.shape) != spec["shape"]:
                raise ValueError(f"input {spec['name']!r}: expected shape {spec['shape']}, got {list(x.shape)}")
            want = dtypes.torch_dtype(spec["dtype"], torch.float32)
            if x.dtype != want:
                raise TypeError(f"input {spec['name']!r}: expected dtype {want}, got {x.dtype}")
            env[spec["name"]] = x.detach().to("cpu")
        with torch.no_grad():
            for unit in self._units:
                if isinstance(unit, Loop):
                    self._run_loop(unit, env)
                else:
                    self._run_layer(unit, env)
        return [env[t["name"]] for t in self.plan["outputs"]]

    def _store(self, layer: dict, outs: Sequence[torch.Tensor], env: dict[str, torch.Tensor]) -> None:
        for spec, value in zip(layer["outputs"], outs):
            # TensorRT writes -1 for a size known only at run time: check the known ones.
            if value.dim() != len(spec["shape"]) or any(
                    s >= 0 and s != v for s, v in zip(spec["shape"], value.shape)):
                raise RuntimeError(
                    f"reference backend: layer {layer['name']!r} produced shape {list(value.shape)} "
                    f"where TensorRT inferred {spec['shape']}")
            env[spec["name"]] = value

    def _run_layer(self, i: int, env: dict[str, torch.Tensor]) -> None:
        layer = self.plan["layers"][i]
        ins = [None if n is None else env[n] for n in layer["inputs"]]
        w = {role: dtypes.as_torch(self._weights[name]) for role, name in self._layer_weights.get(i, {}).items()}
        self._store(layer, run_layer_rounded(layer, ins, w), env)

    def _run_loop(self, loop: Loop, env: dict[str, torch.Tensor]) -> None:
        """A TensorRT loop (ILoop): the trip limit (COUNT: a 0-d count read before the loop) sets
        the number of iterations; each iteration an ITERATOR gives the next slice of its input
        along its axis (from the end when ``reverse``), a RECURRENCE its input 0 in the first
        iteration and afterwards the value its input 1 had at the end of the previous one, and the
        body layers run; a LOOP_OUTPUT gives the last value of its input (LAST_VALUE) or all of
        them stacked along a new ``axis`` (CONCATENATE; REVERSE: last first), whose length (input
        1) must be the number of iterations."""
        layers = self.plan["layers"]
        name = loop.name
        (trip,) = (layers[i] for i in loop.layers if layers[i]["type"] == "TRIP_LIMIT")
        if trip["attrs"].get("kind", "COUNT") != "COUNT":
            raise NotImplementedError(f"loop {name!r}: trip limit {trip['attrs']['kind']} (only COUNT is interpreted)")
        count = env[trip["inputs"][0]]
        if count.dim() != 0 or count.is_floating_point():
            raise ValueError(f"loop {name!r}: the trip count must be a 0-d integer tensor, got {list(count.shape)} "
                             f"{count.dtype}")
        trips = int(count)
        recurrences = [i for i in loop.layers if layers[i]["type"] == "RECURRENCE"]
        current = {i: env[layers[i]["inputs"][0]] for i in recurrences}
        collected: dict[int, list[torch.Tensor]] = {i: [] for i in loop.layers if layers[i]["type"] == "LOOP_OUTPUT"}
        for step in range(trips):
            for i in loop.layers:
                layer = layers[i]
                kind = layer["type"]
                if kind == "ITERATOR":
                    x, axis = env[layer["inputs"][0]], int(layer["attrs"]["axis"])
                    if x.shape[axis] < trips:
                        raise ValueError(f"loop {name!r}: iterator {layer['name']!r} over {x.shape[axis]} slices "
                                         f"in a loop of {trips} iterations")
                    index = x.shape[axis] - 1 - step if layer["attrs"].get("reverse") else step
                    self._store(layer, [x.select(axis, index)], env)
                elif kind == "RECURRENCE":
                    self._store(layer, [current[i]], env)
                elif kind == "LOOP_OUTPUT":
                    collected[i].append(env[layer["inputs"][0]])
                elif kind != "TRIP_LIMIT":
                    self._run_layer(i, env)
            current = {i: env[layers[i]["inputs"][1]] for i in recurrences}
        for i, values in collected.items():
            layer = layers[i]
            kind, axis = layer["attrs"].get("kind", "LAST_VALUE"), int(layer["attrs"].get("axis", 0))
            if not values:
                raise ValueError(f"loop {name!r}: output {layer['name']!r} of a loop that ran no iteration")
            if kind == "LAST_VALUE":
                self._store(layer, [values[-1]], env)
                continue
            if kind not in ("CONCATENATE", "REVERSE"):
                raise NotImplementedError(f"loop {name!r}: loop output kind {kind}")
            length = env[layer["inputs"][1]] if len(layer["inputs"]) > 1 and layer["inputs"][1] else None
            if length is None or int(length) != trips:
                raise ValueError(f"loop {name!r}: {kind} output {layer['name']!r} of length "
                                 f"{None if length is None else int(length)} from {trips} iterations")
            self._store(layer, [torch.stack(values[::-1] if kind == "REVERSE" else values, dim=axis)], env)

    # ---- refit -----------------------------------------------------------------
    def create_refitter(self, *, adopt: bool = False) -> ReferenceRefitter:
        return ReferenceRefitter(self, adopt=adopt)

    def commit(self, new: dict[str, np.ndarray]) -> None:
        """Swap refitted arrays in (called by :class:`ReferenceRefitter` after a successful refit)."""
        merged = dict(self._weights)
        merged.update(new)
        self._weights = merged   # one assignment: all-or-nothing

    # ---- serialization -------------------------------------------------------
    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able header, {weight name: array}); the plan holds no weight values, so
        ``weights=False`` only leaves the arrays out."""
        return {"backend": NAME, "plan": self.plan}, dict(self._weights) if weights else {}

    @classmethod
    def deserialize(cls, header: dict, arrays: dict[str, np.ndarray]) -> ReferenceEngine:
        return cls(header["plan"], arrays)


class ReferenceRefitter:
    """The Refitter contract of TensorRT, on the reference engine's weight store.

    - ``set_named_weights`` returns False (and records why) for an unknown name or a wrong
      count/dtype; values are copied, as TensorRT reads them only at ``refit`` time but we do
      not want the caller's later mutations to leak in. With ``adopt=True`` the caller has handed
      its writeable arrays over (fresh results nobody else holds): they are kept, not copied.
    - ``get_missing_weights`` reports the weights that must also be given because a weight of
      the same layer was set (TensorRT's rule); a standalone weight never set is NOT reported
      and keeps its stale value, exactly like TensorRT.
    - ``refit`` applies everything or nothing.
    """

    def __init__(self, engine: ReferenceEngine, *, adopt: bool = False):
        self.engine = engine
        self.adopt = adopt
        self._pending: dict[str, np.ndarray] = {}
        self.errors: list[str] = []

    def get_all_weights(self) -> list[str]:
        return self.engine.weight_names()

    def get_weights_prototype(self, name: str) -> WeightsPrototype:
        if not self.engine.has_weight(name):
            raise KeyError(name)
        return self.engine.prototype(name)

    def get_named_weights(self, name: str) -> np.ndarray:
        return self._pending[name] if name in self._pending else self.engine.current_weights()[name]

    def set_named_weights(self, name: str, value: np.ndarray) -> bool:
        if not self.engine.has_weight(name):
            self.errors.append(f"{name!r}: no such refittable weight")
            return False
        proto = self.engine.prototype(name)
        arr = np.asarray(value)
        if dtypes.trt_name(arr.dtype) != proto.dtype:
            self.errors.append(f"{name!r}: dtype {arr.dtype} where the engine has {proto.dtype}")
            return False
        if arr.size != proto.count:
            self.errors.append(f"{name!r}: {arr.size} values where the engine has {proto.count}")
            return False
        self._pending[name] = staged(arr, self.adopt).reshape(proto.shape)
        return True

    def get_missing_weights(self) -> list[str]:
        return self.engine.missing_with(self._pending)

    def refit(self) -> bool:
        missing = self.get_missing_weights()
        if missing:
            self.errors.append(f"missing weights: {missing}")
            return False
        self.engine.commit(self._pending)
        self._pending = {}
        return True


def build(result, **options: Any) -> ReferenceEngine:
    """'Build' the converted network: read it into an immutable plan. The engine copies the network's
    weights (as TensorRT's builder does: later writes to the model never reach it) unless
    ``copy_weights=False``: it then holds the network's arrays as they are (views of the model's
    tensors for copy recipes), for a caller that strips them right after
    (``compile(strip_engine_weights=True)``), so compile never holds a second copy."""
    dtypes.precision_dtype(options.get("precision", "fp32"))   # ValueError for an unknown precision
    plan = read_network(result.network, result.weights, copy=bool(options.get("copy_weights", True)))
    if getattr(result, "profiles", None) is not None:
        plan["profiles"] = result.profiles.to_json()
    return ReferenceEngine(plan)


def load_engine(header: dict, weights: dict[str, np.ndarray]) -> ReferenceEngine:
    """The engine of a saved plan; ``ValueError`` saying what is wrong with a malformed one."""
    if header.get("backend") != NAME:
        raise ValueError(f"not a reference-backend plan (backend={str(header.get('backend'))[:40]!r})")
    check_plan(header.get("plan"))
    return ReferenceEngine.deserialize(header, weights)


def _fail(what: str) -> None:
    raise ValueError(f"reference plan: {what}")


def _tensor(info: Any, what: str, dynamic: bool = False) -> str:
    """A tensor record; with ``dynamic`` (a plan's inputs with profiles, any layer output) -1 marks
    a size known only at run time."""
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        _fail(f"{what} should be a tensor {{name, shape, dtype}}")
    shape = info.get("shape")
    least = -1 if dynamic else 0
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= least for d in shape)):
        _fail(f"{what} {info['name']!r}: shape should be at most 8 non-negative ints, got {str(shape)[:60]}")
    if int(np.prod([abs(d) for d in shape], dtype=object)) > MAX_TENSOR_ELEMENTS:
        _fail(f"{what} {info['name']!r}: shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements")
    if not isinstance(info.get("dtype"), str) or dtypes.torch_dtype(info["dtype"]) is None:
        _fail(f"{what} {info['name']!r}: unknown dtype {str(info.get('dtype'))[:40]!r}")
    return info["name"]


def check_plan(plan: Any) -> None:
    """Structure of a saved plan: tensors, layers of known types (and elementwise layers of known
    operations) whose inputs are network inputs or outputs of layers, with no cycle (the
    interpreter runs them in dependency order: :func:`execution_order`), weight locations pointing at
    layers with that role. (Other attribute values are read by the interpreter, which says which
    layer it cannot run.)"""
    if not isinstance(plan, dict):
        _fail("the plan should be a JSON object")
    parts = {k: plan.get(k) for k in ("inputs", "outputs", "layers")}
    if not all(isinstance(v, list) for v in parts.values()) or not isinstance(plan.get("weight_locations"), dict):
        _fail("the plan needs the lists 'inputs', 'outputs', 'layers' and the object 'weight_locations'")
    dynamic = plan.get("profiles") is not None
    if dynamic:   # well-formed ranges for the inputs the plan has (ShapeRangeError is a ValueError)
        names = ShapeProfiles.from_json(plan["profiles"]).input_names
        if sorted(names) != sorted((t.get("name") for t in parts["inputs"] if isinstance(t, dict)), key=str):
            _fail("the profiles name other inputs than the plan")
    defined = {_tensor(t, "input", dynamic) for t in parts["inputs"]}
    for i, layer in enumerate(parts["layers"]):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            _fail(f"layer {i} should be an object with a name")
        where = f"layer {i} ({layer['name'][:60]!r})"
        if layer.get("type") not in OPS:
            _fail(f"{where}: unknown layer type {str(layer.get('type'))[:40]!r}")
        if not isinstance(layer.get("attrs"), dict) or not isinstance(layer.get("weights"), dict):
            _fail(f"{where}: 'attrs' and 'weights' should be objects")
        if layer["type"] == "ELEMENTWISE" and not (isinstance(layer["attrs"].get("op"), str)
                                                   and layer["attrs"]["op"] in ELEMENTWISE_OPS):
            _fail(f"{where}: unknown elementwise operation {str(layer['attrs'].get('op'))[:40]!r}")
        ins, outs = layer.get("inputs"), layer.get("outputs")
        if not isinstance(ins, list) or not isinstance(outs, list) or not (outs or layer["type"] == "TRIP_LIMIT"):
            _fail(f"{where}: 'inputs' should be a list and 'outputs' a non-empty list (but for a trip limit)")
        for name in ins:
            if name is not None and not isinstance(name, str):
                _fail(f"{where}: input {str(name)[:60]!r} should be a tensor name")
        # -1: a size known at run time (dynamic shapes, or data-dependent such as NON_ZERO's count)
        defined.update(_tensor(t, f"{where}: output", True) for t in outs)
    try:   # every input made by a layer (in any order: TensorRT's own), no cycle, well-formed loops
        execution_units(plan)
    except (ValueError, NotImplementedError) as err:
        _fail(str(err))
    for t in parts["outputs"]:
        if _tensor(t, "output", True) not in defined:
            _fail(f"output {t['name'][:60]!r} is produced by no layer")
    layers = parts["layers"]
    for name, loc in plan["weight_locations"].items():
        if (not isinstance(loc, list) or len(loc) != 2 or not isinstance(loc[0], int) or isinstance(loc[0], bool)
                or not 0 <= loc[0] < len(layers)
                or loc[1] not in WEIGHT_ROLES.get(layers[loc[0]]["type"], ())):
            _fail(f"weight {name[:60]!r}: location {str(loc)[:60]} is not a weight role of a layer of the plan")
