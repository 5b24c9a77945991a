"""Changes to an existing weight set, the way fine-tuning makes them: :func:`perturbations` (a
Hypothesis strategy) and :func:`perturb` (one change, without Hypothesis)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from hypothesis import strategies as st

from .recipes import SEED_MAX, WeightSet
from .validation import check_argument, check_one_of, check_some_of

__all__ = ["PERTURBATIONS", "perturb", "perturbations"]

PERTURBATIONS = ("small_delta", "low_rank", "single_tensor")


def _groups(state: dict) -> list[list[str]]:
    """Keys that hold one tensor (same storage, shape and strides) are perturbed together."""
    groups: dict = {}
    for k, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else ("empty", k)
        groups.setdefault(ident, []).append(k)
    return list(groups.values())


def _is_var(key: str) -> bool:
    return key.endswith("running_var")


def _perturb(state: dict, kind: str, key: str | None, magnitude: float, rank: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    groups = _groups(state)
    leader_of = {k: grp[0] for grp in groups for k in grp}

    def scale_of(t):
        s = float(t.double().abs().mean()) if t.numel() else 0.0
        return s if s > 0 else 1.0

    def changed(k, t):
        t64 = t.double()
        if kind == "small_delta":
            if _is_var(k):
                return (t64 * torch.exp(magnitude * torch.randn(t.shape, generator=g, dtype=torch.float64))).to(t.dtype)
            return (t64 + magnitude * scale_of(t) * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)
        if kind == "low_rank":
            rows = t.shape[0]
            cols = t.numel() // rows
            a = torch.randn(rows, rank, generator=g, dtype=torch.float64)
            b = torch.randn(rank, cols, generator=g, dtype=torch.float64)
            delta = (a @ b) / math.sqrt(rank) * magnitude * scale_of(t)
            return (t64 + delta.reshape(t.shape)).to(t.dtype)
        # single_tensor: a fresh tensor of the same size and scale
        if _is_var(k):
            return (torch.rand(t.shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(t.dtype)
        return (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale_of(t)).to(t.dtype)

    with torch.no_grad():
        for grp in groups:
            lead = grp[0]
            t = state[lead]
            if not t.dtype.is_floating_point or t.numel() == 0:
                continue
            if kind != "small_delta" and leader_of.get(key) != lead:
                continue
            new = changed(lead, t)
            for k in grp:
                out[k] = new
    return out


def perturb(state_dict: dict, *, seed: int = 0, kind: str = "small_delta", magnitude: float = 1e-2,
            key: str | None = None, rank: int = 1) -> dict:
    """``state_dict`` moved once the way :func:`perturbations` moves it (a fine-tuned checkpoint):
    ``small_delta`` moves every float tensor by ``magnitude`` of its mean magnitude (variances
    multiplicatively); ``low_rank`` and ``single_tensor`` change ``key`` only. Tied tensors move
    together; integer buffers never change.

    Example::

        tuned = perturb(model.state_dict(), seed=1, magnitude=1e-2)
    """
    check_one_of("kind", kind, PERTURBATIONS)
    check_argument(kind == "small_delta" or key in state_dict,
                   f"kind={kind!r} changes one tensor: give key=, one of the state_dict's keys (got {key!r})")
    return _perturb(state_dict, kind, key, magnitude, rank, seed)


def perturbations(state_dict: dict, *, kinds: Sequence[str] = PERTURBATIONS,
                  magnitudes: Sequence[float] = (1e-2, 1e-3, 1e-1)) -> st.SearchStrategy[WeightSet]:
    """New weight sets near ``state_dict``, the way fine-tuning moves weights: ``small_delta`` (every
    float tensor moved by ``magnitude`` of its mean magnitude; variances multiplicatively, so they
    stay positive), ``low_rank`` (a LoRA-style rank-1 or rank-2 update of one weight matrix or
    kernel), ``single_tensor`` (one tensor replaced, the rest unchanged). Tied tensors move together;
    integer buffers never change.

    Example::

        @given(data=st.data())
        def test_finetune(trt_refit, data):
            base = data.draw(state_dicts(net))
            trt_refit.check(net, data.draw(perturbations(base)), x)
    """
    check_some_of("kinds", kinds, PERTURBATIONS)
    import torch

    tensors = isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())
    check_argument(tensors, "perturbations(state_dict): expected a dict of tensors (e.g. model.state_dict()), got "
                   + (f"a dict holding {sorted({type(v).__name__ for v in state_dict.values()})}"
                      if isinstance(state_dict, dict) else type(state_dict).__name__))
    floats = [grp[0] for grp in _groups(state_dict)
              if state_dict[grp[0]].dtype.is_floating_point and state_dict[grp[0]].numel()]
    matrices = [k for k in floats if state_dict[k].dim() >= 2 and not _is_var(k)]
    base = state_dict.describe() if hasattr(state_dict, "describe") else f"a state_dict of {len(state_dict)} tensors"
    usable = tuple(k for k in kinds if k != "low_rank" or matrices)
    check_argument(bool(floats), "perturbations: the state_dict has no floating-point tensors to perturb; give "
                                 "one with at least one non-empty float tensor")
    check_argument(bool(usable), f"kinds={list(kinds)!r}: the state_dict has no weight matrix or kernel for "
                                 f"'low_rank'; add 'small_delta' or 'single_tensor'")

    @st.composite
    def _draw(draw) -> WeightSet:
        kind = draw(st.sampled_from(usable))
        magnitude = draw(st.sampled_from(tuple(magnitudes)))
        seed = draw(st.integers(0, SEED_MAX))
        key, rank = None, 1
        if kind == "low_rank":
            key = draw(st.sampled_from(matrices))
            rank = draw(st.integers(1, 2))
        elif kind == "single_tensor":
            key = draw(st.sampled_from(floats))
        detail = ", ".join(p for p in (f"kind={kind!r}", f"key={key!r}" if key else "",
                                       f"rank={rank}" if kind == "low_rank" else "",
                                       f"magnitude={magnitude:g}" if kind != "single_tensor" else "",
                                       f"seed={seed}") if p)
        return WeightSet(_perturb(state_dict, kind, key, magnitude, rank, seed),
                         f"perturbations({detail}) of {base}", kind=kind, key=key, seed=seed)

    return _draw()
