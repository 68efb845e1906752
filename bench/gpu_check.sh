#!/usr/bin/env bash
# The prepared GPU check: the side-by-side benchmark, then the CUDA tests (kernels, graphs,
# prefetch, the GroupNorm that keeps channels_last maps). Run on a lent GPU machine from the
# repository root with the missing wheels in .whl/ (see bench/README.md); results and logs
# go to $OUT. Each part stops at its own time limit (seconds: BENCH_S, TESTS_S), and the
# benchmark writes its JSON and PNG after every case, so a part cut short keeps what it
# did. Last in the benchmark, the 15% edit under the options that move fewer bytes (cached
# keys and values; fewer split-K convs too: issue 8's bytes target) says what they cost in
# time. The whole script takes at most about 9 minutes.
#   MODELS=sd15-512 bash bench/gpu_check.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout "${BENCH_S:-360}" python3 -m fisedit.cli bench --device cuda \
  --models "${MODELS:-sd15-512}" --compare-sparse cached_keys_values=true \
  --compare-sparse cached_keys_values=true,split_k_partials=0.25 \
  --out "$out" 2>&1 | tee "$out/bench.log"
echo "bench exit status: ${PIPESTATUS[0]} (124: stopped at BENCH_S)" | tee -a "$out/bench.log"
timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/engine/kernels \
  tests/engine/test_cache.py tests/engine/test_graphs.py \
  tests/engine/test_layers.py::test_on_a_gpu_a_map_group_norm_is_group_norm_in_the_maps_layout \
  2>&1 | tee "$out/gpu-tests.log"
echo "tests exit status: ${PIPESTATUS[0]} (124: stopped at TESTS_S)" | tee -a "$out/gpu-tests.log"
