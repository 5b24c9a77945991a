#!/usr/bin/env bash
# What benchmarks/results/build_times.* were recorded with, on a GPU machine without the project
# installed: TensorRT-RTX unpacked by `source .trt/setup.sh` (see the GPU notes), the repository on
# PYTHONPATH. Writes everything into ${OUT:-benchmarks/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv; python3 -c \
  "import torch, tensorrt_rtx as t; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'tensorrt_rtx', t.__version__)"; } \
  > "$out/gpu_env.txt" 2>&1
python3 -m refitcore.backends.tensorrt_probe > "$out/probe.txt" 2>&1
python3 -m refitcore.cli.doctor > "$out/doctor.txt" 2>&1
timeout 330 python3 benchmarks/build_times.py --out "$out" > "$out/build_times.log" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu tests/test_tensorrt_backend_cpu.py \
  > "$out/pytest_gpu.txt" 2>&1
cat "$out/gpu_env.txt" "$out/probe.txt" "$out/doctor.txt"; tail -25 "$out/build_times.md"; tail -15 "$out/pytest_gpu.txt"
