"""A partitioned engine: an ordered list of TensorRT segments and PyTorch segments behind the one
backend interface (run, weight names, refitter, serialize), so that the refit driver, the cached
map, the audit and the culprit search see one engine with one weight namespace.

Names: engine weights are prefixed with their segment, ``seg0:layer1.0.conv1/conv2d KERNEL`` for a
TensorRT segment's weight and ``seg1:embeddings.word_embeddings.weight`` for a parameter or buffer
a PyTorch segment reads (from the state_dict, by key). A parameter that two segments read appears
once per segment; the weight map feeds each from the same state_dict key.

Refit is one transaction over every segment: :class:`SegmentedRefitter` takes every weight, and
``refit()`` applies each TensorRT segment's refitter and then the PyTorch parameters; when any
step fails it returns False and the driver (:mod:`refitcore.refitting.driver`) re-applies the previous
weights to *every* segment, so the engine answers exactly as before.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from refitcore import dtypes
from refitcore.backends import get_backend
from refitcore.backends.base import EngineImpl, WeightsPrototype, read_only_views, staged
from refitcore.partition.partitioner import Segment
from refitcore.partition.torch_program import TorchProgram

__all__ = ["SegmentedImpl", "SegmentedRefitter", "CompositeImpl", "KIND", "split_name", "torch_dtype_name"]

KIND = "segments"
_NP_TO_PROTO = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
                "int8": "INT8", "float64": "DOUBLE", "complex64": "COMPLEX64", "complex128": "COMPLEX128",
                "uint8": "UINT8", "uint16": "BF16"}   # uint16: bfloat16 bit patterns (refitcore.dtypes)


def split_name(name: str) -> tuple[int, str]:
    """'seg3:layer1/conv2d KERNEL' -> (3, 'layer1/conv2d KERNEL')."""
    head, sep, rest = name.partition(":")
    if not sep or not head.startswith("seg") or not head[3:].isdigit():
        raise KeyError(f"{name!r} is not a segment weight name 'seg<k>:<name>'")
    return int(head[3:]), rest


def torch_dtype_name(arr: np.ndarray) -> str:
    return _NP_TO_PROTO.get(str(arr.dtype), str(arr.dtype).upper())


class SegmentedImpl:
    """Segments in graph order. ``trt``: {segment index: backend engine}; ``params``: {segment index:
    {state_dict key: array}} for PyTorch segments; ``program``: node records of every PyTorch
    segment (and the weight-only nodes they read); ``outputs``: the graph's outputs as operands."""

    def __init__(self, segments: Sequence[Segment], trt: Mapping[int, Any], params: Mapping[int, dict],
                 program: list[dict], constants: Mapping[str, np.ndarray], user_inputs: Sequence[str],
                 outputs: Any, backend_name: str, note: str = ""):
        self.segments = list(segments)
        self.trt = dict(trt)
        self.params = {int(k): dict(v) for k, v in params.items()}
        self.program_records = program
        self.program = TorchProgram(program)
        self.constants = {k: np.asarray(v) for k, v in constants.items()}
        self.user_inputs = list(user_inputs)
        self.outputs = outputs
        self.backend_name = backend_name
        n_torch = sum(1 for s in self.segments if s.kind == "torch")
        self.note = (note + "; " if note else "") + (
            f"{len(self.trt)} TensorRT segment(s) and {n_torch} PyTorch segment(s) (ops without a "
            f"TensorRT converter run in PyTorch)")

    # ---- weights ---------------------------------------------------------------
    def weight_names(self) -> list[str]:
        names = []
        for i, seg in enumerate(self.segments):
            if seg.kind == "tensorrt":
                names += [f"seg{i}:{n}" for n in self.trt[i].weight_names()]
            else:
                names += [f"seg{i}:{k}" for k in self.params.get(i, {})]
        return names

    def current_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for i, seg in enumerate(self.segments):
            if seg.kind == "tensorrt":
                out.update({f"seg{i}:{n}": v for n, v in self.trt[i].current_weights().items()})
            else:
                out.update({f"seg{i}:{k}": v for k, v in read_only_views(self.params.get(i, {})).items()})
        return out

    def prototype(self, name: str) -> WeightsPrototype:
        return self.create_refitter().get_weights_prototype(name)

    def rollback_weights(self) -> dict[str, np.ndarray]:
        """Each TensorRT segment's own rollback arrays; PyTorch parameters as they are (a refit swaps
        new arrays in, never writes a stored one)."""
        out = {}
        for i, seg in enumerate(self.segments):
            if seg.kind == "tensorrt":
                out.update({f"seg{i}:{n}": v for n, v in self.trt[i].rollback_weights().items()})
            else:
                out.update({f"seg{i}:{k}": v for k, v in self.params.get(i, {}).items()})
        return out

    def segment_of(self, name: str) -> int:
        return split_name(name)[0]

    @staticmethod
    def split_name(name: str) -> tuple[int, str]:
        return split_name(name)

    @staticmethod
    def part_name(part: int, name: str) -> str:
        return f"seg{part}:{name}"

    # ---- execution -----------------------------------------------------------------
    def run(self, inputs: Sequence[torch.Tensor]) -> list[Any]:
        if len(inputs) != len(self.user_inputs):
            raise ValueError(f"engine takes {len(self.user_inputs)} input(s) {self.user_inputs}, got {len(inputs)}")
        env: dict[str, Any] = dict(zip(self.user_inputs, inputs))
        # PyTorch segments run where the inputs are (TensorRT hands CUDA outputs back for CUDA inputs).
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))

        def tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return {k: dtypes.as_torch(v).to(device) for k, v in arrays.items()}

        constants = tensors(self.constants)
        self.program.device = device
        with torch.no_grad():
            for i, seg in enumerate(self.segments):
                if seg.kind == "tensorrt":
                    ins = [self.program.value({"node": n}, env, {}, constants) for n in seg.inputs]
                    outs = self.trt[i].run([x.contiguous() for x in ins])
                    env.update(zip(seg.outputs, (o.to(device) for o in outs)))
                else:
                    self.program.run(seg.nodes, env, tensors(self.params.get(i, {})), constants)
            # Graph outputs: values of segments, weight-only nodes, or literals.
            all_params = {k: v for p in self.params.values() for k, v in tensors(p).items()}
            outs = self.program.value(self.outputs, env, all_params, constants)
        # An output that is (a view of) a parameter or a constant would hand the engine's own memory out.
        own = {t.untyped_storage().data_ptr() for t in (*all_params.values(), *constants.values())}
        return [o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in own else o
                for o in outs]

    # ---- refit -------------------------------------------------------------------
    def create_refitter(self, *, adopt: bool = False) -> SegmentedRefitter:
        return SegmentedRefitter(self, adopt=adopt)

    def commit_params(self, pending: Mapping[str, np.ndarray]) -> None:
        new = {i: dict(p) for i, p in self.params.items()}
        for name, arr in pending.items():
            i, key = self.split_name(name)
            new[i][key] = arr
        self.params = new   # one assignment: all-or-nothing

    # ---- serialization -----------------------------------------------------------------
    def serialize(self, *, weights: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {}
        blobs: dict[str, bytes] = {}
        segs = []
        for i, seg in enumerate(self.segments):
            entry: dict[str, Any] = {"segment": seg.to_json()}
            if seg.kind == "tensorrt":
                header, sub = self.trt[i].serialize(weights=weights)
                header = dict(header)
                for k, v in (header.pop("blobs", None) or {}).items():
                    blobs[f"seg{i}/{k}"] = v
                entry["impl"] = header
                arrays.update({f"seg{i}:{k}": v for k, v in sub.items()})
            else:
                entry["params"] = list(self.params.get(i, {}))
                if weights:   # a PyTorch segment's parameters are refittable weights too
                    arrays.update({f"seg{i}:{k}": v for k, v in self.params.get(i, {}).items()})
            segs.append(entry)
        arrays.update({f"const:{k}": v for k, v in self.constants.items()})
        header = {"backend": self.backend_name, "kind": KIND, "segments": segs, "program": self.program_records,
                  "user_inputs": self.user_inputs, "outputs": self.outputs}
        if blobs:
            header["blobs"] = blobs
        return header, arrays

    @classmethod
    def deserialize(cls, header: dict, arrays: Mapping[str, np.ndarray]) -> SegmentedImpl:
        if header.get("kind") != KIND:
            raise ValueError(f"not a segmented engine (kind={header.get('kind')!r})")
        backend = get_backend(header["backend"])
        blobs = header.get("blobs") or {}
        segments, trt, params = [], {}, {}
        for i, entry in enumerate(header["segments"]):
            seg = Segment.from_json(entry["segment"])
            segments.append(seg)
            prefix = f"seg{i}:"
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if seg.kind == "tensorrt":
                sub_header = dict(entry["impl"])
                sub_blobs = {k[len(f"seg{i}/"):]: v for k, v in blobs.items() if k.startswith(f"seg{i}/")}
                if sub_blobs:
                    sub_header["blobs"] = sub_blobs
                trt[i] = backend.load_engine(sub_header, mine)
            else:
                missing = [k for k in entry["params"] if k not in mine]
                if missing:
                    raise ValueError(f"segment {i}: parameters missing from the file: {missing[:5]}")
                params[i] = {k: mine[k] for k in entry["params"]}
        constants = {k[6:]: v for k, v in arrays.items() if k.startswith("const:")}
        return cls(segments, trt, params, header["program"], constants, header["user_inputs"], header["outputs"],
                   header["backend"], note=getattr(next(iter(trt.values()), None), "note", ""))


class CompositeImpl(Protocol):
    """What :class:`SegmentedRefitter` reads of a composite engine (:class:`SegmentedImpl`, the
    hybrid kind's impl): its parts' backend engines and PyTorch parameters, and its weight names."""

    @property
    def trt(self) -> Mapping[Any, EngineImpl]: ...

    @property
    def params(self) -> Mapping[Any, Mapping[str, np.ndarray]]: ...

    def weight_names(self) -> list[str]: ...

    def split_name(self, name: str) -> tuple[Any, str]: ...

    def part_name(self, part: Any, name: str) -> str: ...

    def commit_params(self, pending: Mapping[str, np.ndarray]) -> None: ...


class SegmentedRefitter:
    """TensorRT's Refitter contract over every segment at once (see the module docstring).

    Works on any composite engine with ``trt`` ({part: backend engine}), ``params`` ({part: {key:
    array}}), ``split_name`` (engine weight name -> (part, name within it)) and ``commit_params``."""

    def __init__(self, impl: CompositeImpl, *, adopt: bool = False):
        self.impl = impl
        self.adopt = adopt
        self.subs = {i: e.create_refitter(adopt=adopt) for i, e in impl.trt.items()}
        self._pending: dict[str, np.ndarray] = {}
        self._errors: list[str] = []

    @property
    def errors(self) -> list[str]:
        out = list(self._errors)
        for i, r in self.subs.items():
            out += [f"part {i}: {e}" for e in (getattr(r, "errors", None) or [])]
        return out

    def get_all_weights(self) -> list[str]:
        return self.impl.weight_names()

    def _torch_param(self, name: str) -> tuple[int, str] | None:
        i, key = self.impl.split_name(name)
        if i in self.impl.params and key in self.impl.params[i]:
            return i, key
        return None

    def get_weights_prototype(self, name: str):
        i, rest = self.impl.split_name(name)
        if i in self.subs:
            return self.subs[i].get_weights_prototype(rest)
        if self._torch_param(name) is None:
            raise KeyError(name)
        arr = self.impl.params[i][rest]
        return WeightsPrototype(name, torch_dtype_name(arr), int(arr.size), tuple(arr.shape))

    def set_named_weights(self, name: str, value) -> bool:
        try:
            i, rest = self.impl.split_name(name)
        except KeyError as err:
            self._errors.append(str(err))
            return False
        if i in self.subs:
            return bool(self.subs[i].set_named_weights(rest, value))
        if self._torch_param(name) is None:
            self._errors.append(f"{name!r}: no such refittable weight")
            return False
        current = self.impl.params[i][rest]
        arr = np.asarray(value)
        if arr.dtype != current.dtype or arr.size != current.size:
            self._errors.append(f"{name!r}: {arr.dtype}[{arr.size}] where the engine has "
                                f"{current.dtype}[{current.size}]")
            return False
        self._pending[name] = staged(arr, self.adopt).reshape(current.shape)
        return True

    def get_missing_weights(self) -> list[str]:
        return [self.impl.part_name(i, n) for i, r in self.subs.items() for n in r.get_missing_weights()]

    def refit(self) -> bool:
        for i, r in self.subs.items():
            if not r.refit():
                self._errors.append(f"part {i}: refit() returned False")
                return False   # the driver rolls every segment back
        self.impl.commit_params(self._pending)
        self._pending = {}
        return True
