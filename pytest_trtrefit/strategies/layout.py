"""The layout of a model's state_dict, as the weight strategies see it: per key its shape, dtype,
role (a conv/linear weight, a bias, a BatchNorm statistic, an integer buffer...), fan-in and eps,
and which keys are tied to another (one tensor under two names)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .validation import check_argument

__all__ = ["Entry", "Layout", "layout_of", "fan_in"]


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: Any
    role: str           # weight, bias, param, bn_weight, bn_bias, bn_mean, bn_var, bn_count, norm_weight,
                        # norm_bias, int, bool
    fan_in: int
    eps: float = 0.0
    original: Any = None  # the model's own tensor (integer/bool buffers keep their values)


@dataclasses.dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    tied: dict          # follower key -> leader key

    @property
    def leaders(self) -> list[Entry]:
        return [e for e in self.entries if e.key not in self.tied]


def fan_in(shape: tuple[int, ...], module=None) -> int:
    """The fan-in of a tensor: its row size, or for a 1-d tensor its module's weight's."""
    if len(shape) >= 2:
        return max(1, math.prod(shape[1:]))
    w = getattr(module, "weight", None) if module is not None else None
    if w is not None and getattr(w, "dim", lambda: 0)() >= 2:
        return max(1, math.prod(w.shape[1:]))
    return max(1, shape[-1] if shape else 1)


def layout_of(model) -> Layout:
    """The :class:`Layout` of ``model``: an ``nn.Module`` or a callable returning one."""
    import torch
    from torch import nn

    if not isinstance(model, nn.Module) and callable(model):
        model = model()
    check_argument(isinstance(model, nn.Module), f"model: expected an nn.Module or a callable returning one, "
                                                 f"got {type(model).__name__}")
    owners: dict[str, tuple[nn.Module, str]] = {}
    for path, m in model.named_modules():
        for local, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            owners[f"{path}.{local}" if path else local] = (m, local)
    entries, tied, seen = [], {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[key] = seen[id(t)]
        else:
            seen[id(t)] = key
        m, local = owners.get(key, (None, key.rsplit(".", 1)[-1]))
        shape = tuple(t.shape)
        eps = float(getattr(m, "eps", 0.0) or 0.0)
        if not t.dtype.is_floating_point:
            role = "bn_count" if local == "num_batches_tracked" else ("bool" if t.dtype == torch.bool else "int")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            role = {"weight": "bn_weight", "bias": "bn_bias", "running_mean": "bn_mean",
                    "running_var": "bn_var"}.get(local, "param")
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("Norm"):
            role = {"weight": "norm_weight", "bias": "norm_bias"}.get(local, "param")
        elif local == "bias" and len(shape) == 1:
            role = "bias"
        elif len(shape) >= 2:
            role = "weight"
        else:
            role = "param"
        entries.append(Entry(key, shape, t.dtype, role, fan_in(shape, m), eps,
                             t.detach().clone() if role in ("int", "bool", "bn_count") else None))
    return Layout(tuple(entries), tied)
