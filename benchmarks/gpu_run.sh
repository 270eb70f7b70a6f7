#!/usr/bin/env bash
# The GPU benchmark round, run from the repository root on a machine with CUDA.
# Writes each table to $OUT (or ./gpu-results) and prints it. Steps are time-boxed so that one
# slow step cannot eat the others; a step that fails or times out is reported and skipped.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/$name.md"
  echo "=== $name rc=${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step gpu_check 90 python3 benchmarks/gpu_check.py --device cuda
step kernels 110 python3 benchmarks/kernels.py --device cuda --models mlp cnn --m 256 --repeat 3
step kernels_big 75 python3 benchmarks/kernels.py --device cuda --models resnet18 transformer --m-big 64 --repeat 3
step jacobian 60 python3 benchmarks/jacobian.py --device cuda --m 128 --repeat 5
step overhead 60 python3 benchmarks/overhead.py --devices cuda --epochs 20
step demo 75 python3 -m gramhook demo --device cuda --no-plot --logdir "$OUT/demo-run"
