"""How far float16/bfloat16 outputs sit from float32 eager under random weights: the measurement the
per-precision default tolerances (``refitcore.options.PRECISION_TOLERANCES``) are derived from.

For each model of the test zoo (``tests/models.py``) and each weight set (``weight_set`` over seeds and
the default scale families), three ways of computing in the reduced dtype are compared with float32
eager and with each other, in the verification's own terms (``compare_outputs``: an element passes
when ``|a - e| <= atol * max(1, max|e|) + rtol * |e|``):

- ``eager``: the model and input cast to the dtype, run by PyTorch (CPU kernels);
- ``emulated``: one rounding per layer, as the reference backend emulates an engine: weights and the
  input rounded to the dtype, every leaf module's output rounded to it, arithmetic in float32;
- ``emulated vs eager``: the two reduced-precision results against each other (what a verification
  against eager in the same dtype sees).

Planted bugs, applied to the reduced-precision (emulated) side only and compared with correct float32
eager: ``bug: swap`` (two same-shaped weight tensors exchanged), ``bug: transpose`` (a square weight
transposed), ``bug: eps`` (one BatchNorm's variances drawn near eps, and its eps 100x too large on the
buggy side). For them the table shows the *smallest* error over the weight sets: the weakest signal a
default tolerance must still catch.

Reported per row, worst over the weight sets: the scaled error ``max|a - e| / max(1, max|e|)`` (the
smallest ``atol`` that passes with ``rtol=0``), the smallest ``atol`` that passes with the dtype's
default ``rtol``, and the norm-relative error. Writes a Markdown table
to ``benchmarks/results/precision_errors.md``.

    python benchmarks/precision_errors.py                     # every model, 6 seeds
    python benchmarks/precision_errors.py --models resnet18 --seeds 2
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from _common import ROOT, machine_info, record, set_threads

sys.path.insert(0, str(ROOT / "tests"))

from models import MODELS, make  # tests/models.py: the zoo

from pytest_trtrefit.strategies import weight_set
from pytest_trtrefit.strategies.weights import DEFAULT_SCALES
from refitcore.options import PRECISION_TOLERANCES
from refitcore.refitting.verify import compare_outputs

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def emulated(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding per layer: rounded weights, every leaf module's output rounded, float32 arithmetic."""
    m = model   # the caller's copy: its weights are rounded in place
    with torch.no_grad():
        for p in list(m.parameters()) + list(m.buffers()):
            if p.is_floating_point():
                p.copy_(_round(p, dtype))
    hooks = [mod.register_forward_hook(lambda _m, _i, out: _round(out, dtype) if isinstance(out, torch.Tensor)
                                       else out)
             for mod in m.modules() if not list(mod.children())]
    try:
        with torch.no_grad():
            return m(_round(x, dtype))
    finally:
        for h in hooks:
            h.remove()


PAIRS = ("eager vs fp32", "emulated vs fp32", "emulated vs eager")
BUGS = ("bug: swap", "bug: transpose", "bug: eps")


def _worst(rows: list, key: str, pair: str) -> float:
    """Noise rows: the largest error over the weight sets; bug rows: the smallest (the weakest signal)."""
    return (min if pair in BUGS else max)(r[key] for r in rows)


def _row(name: str, label: str, pair: str, rows: list) -> str:
    if not rows:
        return f"| {name} | {label} | {pair} | n/a | n/a | n/a | - |"
    return (f"| {name} | {label} | {pair} | {_worst(rows, 'scaled', pair):.2e} | "
            f"{_worst(rows, 'min_atol', pair):.2e} | {_worst(rows, 'norm_rel', pair):.2e} | "
            f"{sum(r['nonfinite'] for r in rows)} |")


def planted(model: torch.nn.Module, bug: str, seed: int) -> torch.nn.Module | None:
    """A copy of ``model`` with ``bug`` planted (None where the model has no place for it)."""
    import copy

    m = copy.deepcopy(model)
    state = m.state_dict()
    weights = [k for k, v in state.items() if k.endswith("weight") and v.dim() >= 2]
    with torch.no_grad():
        if bug == "bug: swap":
            pair = next(((a, b) for i, a in enumerate(weights) for b in weights[i + 1:]
                         if state[a].shape == state[b].shape and not torch.equal(state[a], state[b])), None)
            if pair is None:
                return None
            a, b = pair
            va, vb = state[a].clone(), state[b].clone()
            state[a].copy_(vb)
            state[b].copy_(va)
        elif bug == "bug: transpose":
            key = next((k for k in weights if state[k].shape[0] == state[k].shape[1]), None)
            if key is None:
                return None
            state[key].copy_(state[key].transpose(0, 1).clone())
        else:
            bn = next((mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)), None)
            if bn is None:
                return None
            bn.eps = bn.eps * 100
    return m


def _near_eps(model: torch.nn.Module, seed: int) -> None:
    """The first BatchNorm's running variances drawn in [0, 2 eps] (where an eps bug shows)."""
    bn = next((mod for mod in model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)), None)
    if bn is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 2 * bn.eps)


def measure(name: str, seeds: int) -> list[dict]:
    import copy

    rows = []
    for seed in range(seeds):
        scale = DEFAULT_SCALES[seed % len(DEFAULT_SCALES)]
        model, x = make(name, seed)
        model.load_state_dict(weight_set(model, seed=seed, scale=scale))
        model.eval()
        with torch.no_grad():
            ref = model(x)
        for label, dtype in DTYPES.items():
            rtol, _atol = PRECISION_TOLERANCES[label]
            with torch.no_grad():
                eager = copy.deepcopy(model).to(dtype)(x.to(dtype)).float()
            emul = emulated(copy.deepcopy(model), x, dtype)
            pairs = {"eager vs fp32": (eager, ref), "emulated vs fp32": (emul, ref), "emulated vs eager": (emul, eager)}
            for bug in BUGS:
                base = copy.deepcopy(model)
                if bug == "bug: eps":
                    _near_eps(base, seed)
                buggy = planted(base, bug, seed)
                if buggy is not None:
                    with torch.no_grad():
                        pairs[bug] = (emulated(buggy, x, dtype), base(x))
            for pair, (a, e) in pairs.items():
                c0 = compare_outputs([a], [e], rtol=0.0, atol=0.0)[0]
                c = compare_outputs([a], [e], rtol=rtol, atol=0.0)[0]
                rows.append({"model": name, "dtype": label, "pair": pair, "seed": seed, "scale": scale,
                             "scaled": c0.min_atol, "min_atol": c.min_atol, "norm_rel": c.norm_rel,
                             "nonfinite": c.nonfinite})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args(argv)
    set_threads(2)
    info = machine_info()
    t0 = time.perf_counter()
    all_rows = []
    for name in args.models.split(","):
        all_rows += measure(name, args.seeds)
    lines = ["Worst over the weight sets (bug rows: the smallest, the weakest signal). scaled err: "
             "max|a - e| / max(1, max|e|) (the atol that passes at rtol=0); atol at default rtol: the smallest "
             "atol that passes with the dtype's default rtol "
             f"({', '.join(f'{k} {v[0]:g}' for k, v in PRECISION_TOLERANCES.items())}).\n",
             "| model | dtype | pair | scaled err | atol at default rtol | norm-rel err | non-finite |",
             "|---|---|---|---|---|---|---|"]
    for name in args.models.split(",") + ["**all**"]:
        for label in DTYPES:
            for pair in PAIRS + BUGS:
                rows = [r for r in all_rows if (r["dtype"], r["pair"]) == (label, pair)
                        and name in (r["model"], "**all**")]
                lines.append(_row(name, label, pair, rows))
    record("precision_errors", f"fp16/bf16 output errors under random weights: {args.seeds} weight set(s) per "
           f"model (scales {', '.join(DEFAULT_SCALES)}), {time.perf_counter() - t0:.0f} s",
           "\n".join(lines), info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
