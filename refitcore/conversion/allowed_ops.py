"""The closed set of ATen overloads that an engine file may name, and the shape check run before any
of them is evaluated.

An engine file is data from anywhere, whatever its checksums: the weight map's operand trees
(:mod:`refitcore.conversion.weight_map`) and a partitioned engine's PyTorch-segment records
(:mod:`refitcore.partition.torch_program`) name ATen ops that loading, refitting and running
replay. They are resolved here and only here, against :data:`ALLOWED_OPS`, the committed list
``allowed_ops.txt`` next to this module. :func:`generate` derives that list from torch's operator
registry; ``tests/test_untrusted_files.py`` regenerates it and compares, and checks that every op
the converters fold and the partitioner keeps in PyTorch on the test models is in it. An overload
is in the list when:

- the dispatcher registers it (TorchScript-only operators such as ``aten::save`` are not);
- its schema is functional: no argument it writes (``Tensor(a!)``), no ``out=`` argument, no
  ``Storage`` or ``Generator`` argument, no argument naming a file or path;
- it is not tagged ``nondeterministic_seeded`` (random ops; dropout, attention dropout and the
  recurrent layers' dropout between layers are in, run only with their probability zero or
  training off: :data:`RANDOM_UNLESS`) and is not data-dependent in size unless its result is
  bounded by its inputs (:data:`INPUT_BOUNDED_OPS`: ``nonzero``, ``unique``...;
  ``bincount`` and ``repeat_interleave.Tensor`` are out);
- its name is in none of the families of :data:`_DENIED` (files, storages, process state,
  sparse and quantized layouts, vendor-library kernels, writes through an argument).

Allocation by argument (``zeros``, ``full``, ``expand``, ``arange``, ``new_*``...) is allowed, because
nothing is ever evaluated before :func:`check_call` has run it on the ``meta`` device (no memory,
no side effects) and bounded every tensor it would make.
"""
from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch

from refitcore.errors import BundleContentError

__all__ = ["ALLOWED_OPS", "INPUT_BOUNDED_OPS", "RANDOM_UNLESS", "generate", "resolve", "is_allowed", "check_call",
           "to_meta", "numel", "decode_dtype", "LIST_FILE"]

LIST_FILE = Path(__file__).with_name("allowed_ops.txt")

# Data-dependent output sizes that never exceed their inputs' (meta cannot size them: they run
# for real, bounded by what they read). Other data-dependent ops are not allowed.
INPUT_BOUNDED_OPS = frozenset({
    "aten.nonzero.default", "aten.argwhere.default", "aten.masked_select.default", "aten._unique.default",
    "aten._unique2.default", "aten.unique_consecutive.default", "aten.unique_dim.default",
    "aten.unique_dim_consecutive.default", "aten._local_scalar_dense.default", "aten.item.default",
    "aten.equal.default", "aten.allclose.default", "aten.index.Tensor"})
# Random only when an argument says so (dropout in training, attention dropout): allowed, and
# refused by check_call when that argument (name, position) is not zero/false.
RANDOM_UNLESS = {"aten.dropout.default": ("train", 2), "aten.lstm.input": ("train", 6), "aten.gru.input": ("train", 6),
                 "aten.rnn_tanh.input": ("train", 6), "aten.rnn_relu.input": ("train", 6),
                 "aten.scaled_dot_product_attention.default": ("dropout_p", 4)}

# Op families no file may name, matched on the op name (``aten.<name>.<overload>``).
_DENIED_PATTERNS = (
    r"file", r"save", r"load", r"print", r"seed", r"grad_enabled", r"_set_", r"^set$", r"is_set_to",
    r"storage", r"pin", r"record_stream", r"_copy_from", r"_unsafe_(?!view$)", r"^_foreach_",
    r"^_fused_(adam|sgd|adagrad)",
    r"sparse", r"coo", r"csr", r"csc", r"bsr", r"bsc", r"coalesce", r"indices$", r"values$", r"_nested", r"nested_",
    r"quantiz", r"^q_", r"^_?dequantize", r"_per_tensor_affine", r"_per_channel_affine", r"^fbgemm",
    r"mkldnn", r"cudnn", r"miopen", r"^_?mps", r"vulkan", r"xnnpack", r"cufft", r"^cuda$", r"^_cslt", r"^_cutlass",
    r"^bincount$", r"^one_hot$", r"^_ctc_loss$", r"^linalg_lstsq$", r"^_?to_dense$", r"^_fake_",
)
_DENIED = re.compile("|".join(_DENIED_PATTERNS))
_DENIED_OVERLOADS = frozenset({"aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor"})


def _overload(schema) -> Any:
    packet = getattr(torch.ops.aten, schema.name[len("aten::"):])
    return getattr(packet, schema.overload_name or "default")


def _functional(schema) -> bool:
    if schema.is_mutable:
        return False
    for arg in schema.arguments:
        if getattr(arg, "is_out", False) or (arg.alias_info is not None and arg.alias_info.is_write):
            return False
        text = str(arg.type)
        if "Storage" in text or "Generator" in text or re.search(r"file", arg.name):
            return False
    return not any("Storage" in str(r.type) for r in schema.returns)


def generate() -> list[str]:
    """The allowlist from the running torch's registry (see the module docstring), sorted."""
    registered = set(torch._C._dispatch_get_all_op_names())
    out = set()
    for schema in torch._C._jit_get_all_schemas():
        full = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
        if not schema.name.startswith("aten::") or full not in registered or not _functional(schema):
            continue
        name = schema.name[len("aten::"):]
        qualname = f"aten.{name}.{schema.overload_name or 'default'}"
        if _DENIED.search(name) or qualname in _DENIED_OVERLOADS:
            continue
        try:
            op = _overload(schema)
        except (AttributeError, RuntimeError):
            continue
        tags = set(op.tags)
        if torch.Tag.nondeterministic_seeded in tags and qualname not in RANDOM_UNLESS:
            continue
        if ({torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output} & tags
                and qualname not in INPUT_BOUNDED_OPS):
            continue
        out.add(qualname)
    return sorted(out)


ALLOWED_OPS: frozenset[str] = frozenset(
    line.strip() for line in LIST_FILE.read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#"))


def is_allowed(qualname: str) -> bool:
    return qualname in ALLOWED_OPS


@cache
def _resolve(qualname: str):
    _, name, overload = qualname.split(".")
    return getattr(getattr(torch.ops.aten, name), overload)


def resolve(qualname: Any, where: str):
    """The op object for an allowed ``'aten.<op>.<overload>'``; :class:`~refitcore.errors.BundleContentError`
    for anything else."""
    if not isinstance(qualname, str) or qualname not in ALLOWED_OPS:
        raise BundleContentError(f"{where}: op {str(qualname)[:80]!r} is not an allowed ATen overload "
                                 f"'aten.<op>.<overload>' (an engine file may name only the {len(ALLOWED_OPS)} "
                                 f"of refitcore.conversion.allowed_ops)")
    try:
        return _resolve(qualname)
    except (AttributeError, RuntimeError):
        raise BundleContentError(f"{where}: op {qualname!r} does not exist in this torch") from None


def decode_dtype(name: Any, where: str) -> torch.dtype:
    """A torch dtype by name (``"float32"``); quantized and bit-packed dtypes are refused."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dtype, torch.dtype) or name.startswith(("q", "bits")):
        raise BundleContentError(f"{where}: {str(name)[:40]!r} is not a torch dtype an engine file may name")
    return dtype


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty one of its shape, dtype and strides on the
    ``meta`` device (no memory), and every device by ``meta``."""
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else torch.empty_strided(
            value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def numel(value: Any) -> int:
    """The largest element count among the tensors of ``value``."""
    return max((math.prod(t.shape) for t in _tensors(value)), default=0)


def check_call(op, args: list, kwargs: dict, max_elements: int, where: str) -> Any:
    """Run ``op`` on ``meta`` copies of its arguments and return what it would make (meta tensors);
    :class:`~refitcore.errors.BundleContentError` when a tensor it makes exceeds ``max_elements``
    elements or the call is invalid. Ops of :data:`INPUT_BOUNDED_OPS` that meta cannot size return
    None: what they make is bounded by what they read."""
    name = str(op)
    if name in RANDOM_UNLESS:
        arg, pos = RANDOM_UNLESS[name]
        flag = kwargs.get(arg, args[pos] if len(args) > pos else 0)
        if flag:
            raise BundleContentError(f"{where}: op {name} with {arg}={flag!r} is random; an engine file "
                                     f"runs it only with {arg} zero/false")
    kwargs = to_meta(kwargs)
    if any(a.name == "device" and a.kwarg_only for a in op._schema.arguments):
        kwargs["device"] = torch.device("meta")      # a factory op makes its result on meta too
    try:
        out = op(*to_meta(args), **kwargs)
    except Exception as err:  # noqa: BLE001 - any refusal of the op is a bad record
        if name in INPUT_BOUNDED_OPS:
            return None     # no size without the data; what it makes is bounded by what it reads
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise BundleContentError(f"{where}: op {name} refuses its arguments: {type(err).__name__}: {first}") from None
    size = numel(out)
    if size > max_elements:
        raise BundleContentError(f"{where}: op {name} would make a tensor of {size} elements, more than the "
                          f"{max_elements} allowed here")
    return out
