#!/usr/bin/env bash
# The prepared GPU check: CUDA tests (kernels, graphs, prefetch), then the side-by-side
# benchmark. Run on a lent GPU machine from the repository root with the missing wheels in
# .whl/ (see bench/README.md); results and logs go to $OUT.
#   MODELS=sd15-512,sd21-768,sdxl-1024 bash bench/gpu_check.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/engine/kernels tests/engine/test_cache.py \
  tests/engine/test_graphs.py 2>&1 | tee "$out/gpu-tests.log"
python3 -m fisedit.cli bench --device cuda --models "${MODELS:-sd15-512}" --out "$out" \
  2>&1 | tee "$out/bench.log"
