"""Torch-TensorRT's own refit under the verifier, model by model: the tiny models of ``tests/ttrt_models.py``
(one per Torch-TensorRT converter family that records refittable weights, and the models of its own refit
tests) and the models of ``scripts/zoo_repos.py`` (as repositories ship them), on the reference backend.

Per model: does Torch-TensorRT convert it (``compiler="torch_tensorrt"``: its lowering, partition and
converters; the share of ops its TensorRT segments run), does its refit (``refit_module_weights``' path,
``path="fallback"``) of new random weights match eager PyTorch (max abs error over every output leaf),
and which engine weights fail the exact audit against a fresh Torch-TensorRT conversion (the witness),
and why. Each model runs in a child process with a timeout; the table is rewritten after every model.

    python scripts/ttrt_sweep.py                       # every model
    python scripts/ttrt_sweep.py tiny                  # the tests/ttrt_models.py models
    python scripts/ttrt_sweep.py issue                 # the minimal models of the known issues
    python scripts/ttrt_sweep.py zoo:bert tiny:cumsum  # some
    python scripts/ttrt_sweep.py --merge zoo:bert      # re-run some, keep the other rows
    python scripts/ttrt_sweep.py --timeout 300 zoo     # the zoo_repos.py models, 300 s each

Writes ``benchmarks/results/ttrt_sweep.md`` and ``ttrt_sweep.json``. Random weights only (tiny configs,
``weights=None``): nothing is downloaded. Needs ``torch_tensorrt`` (the ``torch_tensorrt`` extra).
Models whose ``forward`` takes keyword inputs are compiled through a wrapper that takes their tensors
positionally (Torch-TensorRT's compile takes positional example inputs here) and binds the rest.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for entry in (str(ROOT), str(ROOT / "scripts")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import torch  # noqa: E402
import zoo_repos  # noqa: E402
from torch import nn  # noqa: E402

from tests import ttrt_models  # noqa: E402

DEFAULT_TIMEOUT = 600.0
VERSIONED = ("torch", "torch-tensorrt-rtx", "torch-tensorrt", "transformers", "timm", "diffusers")


class LastStep(nn.Module):
    """A linear layer, then the last step (``x[:, -1]``, ``aten.select.int`` of index -1)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)[:, -1]


# The minimal models of docs/torch-tensorrt.md's known issues that no other row is (name -> label, model, inputs).
ISSUES = {"negative_select": ("known issue 2: Linear, then [:, -1]", LastStep, lambda: (torch.randn(2, 3, 4),))}


def names() -> dict[str, str]:
    """Every row's name -> its label: ``tiny:<name>`` (tests/ttrt_models.py), ``zoo:<name>`` (zoo_repos.py),
    ``issue:<name>`` (:data:`ISSUES`)."""
    out = {f"tiny:{n}": f"{ttrt_models.FAMILIES.get(n, '')}" for n in ttrt_models.MODELS}
    out.update({f"zoo:{n}": label for n, (label, _) in zoo_repos.MODELS.items()})
    out.update({f"issue:{n}": label for n, (label, _, _) in ISSUES.items()})
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


class Positional(nn.Module):
    """``model`` called with its keyword tensors as trailing positional inputs and its other keyword
    inputs bound (``use_cache=False``...)."""

    def __init__(self, model: nn.Module, n_args: int, tensor_keys: list[str], bound: dict[str, Any]):
        super().__init__()
        self.model = model
        self.n_args, self.tensor_keys, self.bound = n_args, tensor_keys, bound

    def forward(self, *inputs: torch.Tensor) -> Any:
        kwargs = dict(zip(self.tensor_keys, inputs[self.n_args:]))
        return self.model(*inputs[:self.n_args], **kwargs, **self.bound)


def _positional(model: nn.Module, args: tuple, kwargs: dict) -> tuple[nn.Module, tuple]:
    if not kwargs:
        return model, tuple(args)
    keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    bound = {k: v for k, v in kwargs.items() if k not in keys}
    return Positional(model, len(args), keys, bound).eval(), tuple(args) + tuple(kwargs[k] for k in keys)


def case(name: str, seed: int) -> tuple[nn.Module, tuple, dict]:
    """(model with weights drawn from ``seed``, positional example inputs, Torch-TensorRT settings)."""
    source, _, model_name = name.partition(":")
    if source == "issue":
        _, make, inputs = ISSUES[model_name]
        torch.manual_seed(seed)
        model = make().eval()
        torch.manual_seed(0)
        return model, inputs(), {"min_block_size": 1}
    if source == "tiny":
        model, inputs = ttrt_models.build(model_name, seed)
        return model, tuple(inputs), {"min_block_size": 1, **ttrt_models.SETTINGS.get(model_name, {})}
    _, build = zoo_repos.MODELS[model_name]
    model, args, kwargs = build(seed)
    model = zoo_repos._randomized(model, seed)
    model, args = _positional(model, tuple(args), dict(kwargs))
    return model, args, ({"min_block_size": 1} if model_name in zoo_repos.CUSTOM else {})


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def run_one(name: str) -> dict:
    """One row: convert, refit through Torch-TensorRT's refit, compare with eager, audit every weight."""
    import refitcore
    from refitcore.errors import RefitCoreError

    row: dict[str, Any] = {"model": name, "label": names().get(name, ""), "versions": versions()}
    model, args, settings = case(name, 0)
    dynamic = settings.pop("dynamic_shapes", None)
    t0 = time.perf_counter()
    try:
        engine = refitcore.compile(model, args, compiler="torch_tensorrt", backend="reference",
                                   dynamic_shapes=dynamic, **settings)
    except Exception as err:  # noqa: BLE001 - the row records why Torch-TensorRT (or the harness) cannot convert it
        row.update(converts=False, reason=_first_line(err), compile_s=time.perf_counter() - t0)
        return row
    row["compile_s"] = time.perf_counter() - t0
    cov = engine.summary()
    row.update(converts=True, op_share=cov.op_share, weight_share=cov.weight_share, ops=cov.ops_total,
               ops_trt=cov.ops_tensorrt, segments=len(cov.segments) or 1, weights=len(engine.weight_names))
    with torch.no_grad():
        row["err_compile"] = zoo_repos.max_err(engine(*args), model(*args))
    new_model = case(name, 1)[0]
    t0 = time.perf_counter()
    try:
        result = refitcore.refit(engine, new_model, path="fallback", verify_inputs=[args])
    except RefitCoreError as err:   # Torch-TensorRT's refit did not go through: the error names the weight
        row.update(refit_s=time.perf_counter() - t0, refit_ok=False, reason=_first_line(err),
                   failing=list(getattr(err, "problems", []) or [_first_line(err)])[:10])
        return row
    row["refit_s"] = time.perf_counter() - t0
    row["refit_ok"] = bool(result)
    with torch.no_grad():
        row["err_refit"] = zoo_repos.max_err(result.engine(*args), new_model(*args))
    audit = result.audit
    row["audited"] = len(audit.diffs) if audit is not None else 0
    row["failing"] = [str(d) for d in audit.failures][:10] if audit is not None else []
    if not result:   # the audit against the witness first: it names the weight
        bad = result.audit if audit is not None and not audit.ok else result.verdict
        row["reason"] = str(bad).splitlines()[0][:300]
    return row


def _child(name: str, out: str) -> int:
    try:
        row = run_one(name)
    except Exception as err:  # noqa: BLE001 - recorded in the row, not lost with the child
        row = {"model": name, "label": names().get(name, ""), "converts": None, "reason": _first_line(err),
               "trace": traceback.format_exc()[-2000:]}
    Path(out).write_text(json.dumps(row, default=str))
    return 0


def run_isolated(name: str, timeout: float) -> dict:
    """``run_one`` in a child process: a crash or a hang costs one row, not the sweep."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--out", str(out)], timeout=timeout,
                                  capture_output=True, text=True, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"model": name, "label": names().get(name, ""), "converts": None,
                    "reason": f"timed out after {timeout:g} s", "wall_s": time.perf_counter() - t0}
        if out.exists():
            row = json.loads(out.read_text())
        else:
            tail = (proc.stderr or "").strip().splitlines()
            row = {"model": name, "label": names().get(name, ""), "converts": None,
                   "reason": f"the child exited with {proc.returncode}: {tail[-1] if tail else ''}"}
        row["wall_s"] = time.perf_counter() - t0
        return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _verdict(r: dict) -> str:
    if r.get("converts") is None:
        return "not run: " + r.get("reason", "")
    if not r["converts"]:
        return "no: " + r.get("reason", "")
    share = f"yes ({r['ops_trt']}/{r['ops']} ops in TensorRT, {r['segments']} segment(s))"
    return share


def table(rows: list[dict]) -> str:
    converted = [r for r in rows if r.get("converts")]
    matched = [r for r in converted if r.get("refit_ok")]
    v = next((r["versions"] for r in rows if r.get("versions")), {})
    ttrt = v.get("torch-tensorrt-rtx") or v.get("torch-tensorrt")
    not_run = [r["model"] for r in rows if r.get("converts") is None]
    lines = ["# Torch-TensorRT's refit under the verifier", "",
             f"{len(rows) - len(not_run)} model(s) ran"
             + (f" ({len(not_run)} more could not: {', '.join(not_run)})" if not_run else "")
             + f": Torch-TensorRT converts {len(converted)}; its refit of new random weights "
             f"matches eager and passes the exact witness audit on {len(matched)}. Torch-TensorRT "
             f"{ttrt}, torch {v.get('torch')}, transformers {v.get('transformers')}, timm {v.get('timm')} "
             f"(reference backend: Torch-TensorRT's networks interpreted on the CPU; `scripts/ttrt_sweep.py`).", "",
             "| model | family / label | Torch-TensorRT converts it | refit matches eager | max abs err "
             "(compile / refit) | engine weights that fail, and why | compile s | refit s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        refit = "-" if not r.get("converts") else ("yes" if r.get("refit_ok") else "**no**")
        failing = "; ".join(r.get("failing") or []) or ("-" if r.get("refit_ok") or not r.get("converts")
                                                         else r.get("reason", ""))
        errs = f"{_fmt(r.get('err_compile'), '.1e')} / {_fmt(r.get('err_refit'), '.1e')}"
        lines.append(f"| {r['model']} | {r.get('label', '')} | {_verdict(r)} | {refit} | {errs} | "
                     f"{failing.replace('|', '/')} | {_fmt(r.get('compile_s'), '.1f')} | "
                     f"{_fmt(r.get('refit_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ttrt_sweep.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (RESULTS / "ttrt_sweep.md").write_text(table(rows))


def _select(wanted: list[str]) -> list[str]:
    every = list(names())
    if not wanted:
        return every
    out: list[str] = []
    for w in wanted:
        if w in ("tiny", "zoo", "issue"):
            out += [n for n in every if n.startswith(w + ":")]
        elif w in every:
            out.append(w)
        else:
            raise SystemExit(f"unknown model {w!r}; give tiny, zoo or one of: {', '.join(every)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="tiny, zoo, issue, or model names (tiny:<name>, zoo:<name>, "
                                                  "issue:<name>)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of models not re-run")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per model (default 600)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.one:
        return _child(ns.one, ns.out)
    selected = _select(ns.models)
    previous = []
    if ns.merge and (RESULTS / "ttrt_sweep.json").exists():
        previous = json.loads((RESULTS / "ttrt_sweep.json").read_text())
    order = list(names())
    rows = {r["model"]: r for r in previous}
    for name in selected:
        row = run_isolated(name, ns.timeout)
        rows[name] = row
        print(f"{name}: {_verdict(row)}; refit ok={row.get('refit_ok')} err={row.get('err_refit')} "
              f"failing={row.get('failing')}", flush=True)
        write(sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else len(order)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
