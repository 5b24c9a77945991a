"""``trtrefit doctor``: what this machine can do, and why not.

Each check is a :class:`Check` ``(item, value, reason)``: ``value`` is True/False for a yes/no
question, or a string for plain information. The TensorRT line comes from the same cached
capability probe that chooses the ``auto`` backend and skips the GPU tests, so the three always
agree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import NamedTuple

from refitcore import _trt, _version
from refitcore.backends import resolve_backend, tensorrt as trt_backend
from refitcore.backends.tensorrt_probe import STAGES, ProbeResult
from refitcore.cli.text import DOCTOR_FLAGS

__all__ = ["Check", "doctor", "render", "main", "stage_checks"]


class Check(NamedTuple):
    item: str
    value: bool | str
    reason: str
    applicable: bool = True     # False: a "no" this machine is not expected to answer "yes" (shown n/a)

    @property
    def status(self) -> str:
        if self.value is True:
            return "ok"
        if self.value is False:
            return "FAIL" if self.applicable else "n/a"
        return "info"


def _torch_checks() -> list[Check]:
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - torch is a hard dependency, but say so instead of crashing
        return [Check("torch", False, f"cannot import torch: {type(err).__name__}: {err}")]
    out = [Check("torch", torch.__version__, f"CUDA build {torch.version.cuda or 'none (CPU-only wheel)'}")]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        out.append(Check("CUDA device", True, f"{n} visible; current #{i}: {torch.cuda.get_device_name(i)}, "
                                              f"compute capability {cap[0]}.{cap[1]}"))
    else:
        out.append(Check("CUDA device", False, "torch.cuda.is_available() is False (no GPU, or no driver visible)"))
    return out


def _tensorrt_checks() -> list[Check]:
    if not _trt.available():
        try:
            _trt.trt()
        except _trt.TensorRTUnavailableError as err:
            return [Check("TensorRT Python API", False, str(err))]
    return [Check("TensorRT Python API", True, f"{_trt.flavour()} {_trt.version()}")]


def stage_checks(result: ProbeResult) -> list[Check]:
    """One line per step of the capability probe: plan build, engine deserialize and run, refit."""
    ok, reason = result.ok, result.reason
    stage = "done" if ok else result.stage
    steps = [("TensorRT plan build (REFIT flag)", ("build",)),
             ("TensorRT engine deserialize and run", ("deserialize", "run")),
             ("TensorRT refit of an engine", ("refit",))]
    if stage not in STAGES:
        return [Check(item, False, f"unknown: {reason}") for item, _ in steps]
    reached = STAGES.index(stage)
    out = []
    for item, names in steps:
        first = STAGES.index(names[0])
        last = STAGES.index(names[-1])
        if reached > last:
            out.append(Check(item, True, "works on the test engine"))
        elif first <= reached <= last:
            out.append(Check(item, False, reason))
        else:
            where = "finding a CUDA device" if stage == "find a CUDA device for" else f"the '{stage}' step"
            out.append(Check(item, False, f"not tried: the probe stopped earlier, at {where}"))
    return out


def doctor() -> list[Check]:
    """Run every check (the TensorRT capability probe may take a few seconds on a GPU machine)."""
    checks = [Check("python", platform.python_version(), sys.executable),
              Check("refitcore", _version.__version__, os.path.dirname(_version.__file__))]
    torch_checks = _torch_checks()
    # Without a CUDA GPU, "no GPU, no TensorRT engine" is expected, not a failure: those lines say n/a
    # (the reference backend covers this machine). The values stay False: --require-tensorrt still fails.
    gpu = next((c.value for c in torch_checks if c.item == "CUDA device"), False) is True
    checks += [c._replace(applicable=False) if c.item == "CUDA device" and not gpu else c for c in torch_checks]
    checks += _tensorrt_checks()
    result = trt_backend.probe_result()
    ok, reason = result.ok, result.reason
    trt_lines = stage_checks(result) + [Check("tensorrt backend (build, run, refit)", bool(ok), reason)]
    checks += [c if gpu else c._replace(applicable=False) for c in trt_lines]
    checks.append(Check("reference backend", True, "always available: a CPU interpreter of the TensorRT network; "
                                                   "it checks the network and the weight mapping, not TensorRT's "
                                                   "kernels"))
    name, why = resolve_backend("auto")
    checks.append(Check("backend 'auto' picks", name, why))
    return checks


def render(checks: Sequence[Check] | None = None) -> str:
    """The checks as aligned text lines: ``[ ok ]``/``[FAIL]`` for yes/no checks, ``[ n/a]`` for a "no"
    this machine is not expected to answer "yes" (no CUDA GPU: no TensorRT engine), ``[info]`` else."""
    checks = doctor() if checks is None else list(checks)
    width = max((len(c.item) for c in checks), default=0)
    lines = []
    for c in checks:
        if c.value is True:
            tag, shown = "[ ok ]", ""
        elif c.value is False:
            tag, shown = ("[FAIL]", "") if c.applicable else ("[ n/a]", "not expected without a CUDA GPU: ")
        else:
            tag, shown = "[info]", f"{c.value}: "
        lines.append(f"{tag} {c.item.ljust(width)}  {shown}{c.reason}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``trtrefit doctor [--json] [--require-tensorrt]``. Exit status 0 (n/a lines included: a CPU
    machine is not expected to run TensorRT), or 1 when ``--require-tensorrt`` is given and the
    TensorRT backend cannot run here."""
    parser = argparse.ArgumentParser(prog="trtrefit doctor",
                                     description="Report what this machine can do: torch, CUDA, TensorRT, and "
                                                 "which backend 'auto' picks and why.")
    for flag, text in DOCTOR_FLAGS:
        parser.add_argument(flag, action="store_true", help=text)
    args = parser.parse_args(list(argv) if argv is not None else None)
    checks = doctor()
    if args.json:
        print(json.dumps([dict(c._asdict(), status=c.status) for c in checks], indent=2))
    else:
        print(render(checks))
    if args.require_tensorrt:
        trt_ok = next(c.value for c in checks if c.item.startswith("tensorrt backend"))
        return 0 if trt_ok is True else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
