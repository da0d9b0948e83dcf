#!/usr/bin/env bash
# Exactness and sharded hypergradients on a GPU machine, results in one folder.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      (default: benchmarks/results/gpu)
#
# Needs the project installed with a CUDA jaxlib (pip install -e ".[test]" "jax[cuda12]").
# Runs with XLA's deterministic-ops flag (reversal needs the backward pass to recompute each
# gradient bit for bit) and writes:
#   devices.txt       nvidia-smi and jax.devices()
#   exactness.xml/.log  round trips, drift checks, segments and oracles on the GPU (pytest)
#   sharding.xml/.log   sharded params on all local GPUs (up to 8; skipped with one)
#   hypergradient.json  the quick hypergradient benchmark (time and XLA memory vs baselines)
#   offload_memory.json device and host memory against T: reversal, segments, offloaded buffer
# and exits non-zero if any check failed.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
status=0

{ nvidia-smi || echo "nvidia-smi not found"; python -c "import jax; print(jax.__version__, jax.devices())"; } \
  > "$OUT/devices.txt" 2>&1 || status=1
if ! python -c "import jax, sys; sys.exit(0 if jax.devices()[0].platform == 'gpu' else 1)"; then
  echo "no GPU visible to JAX (see $OUT/devices.txt)"; exit 1
fi

python -m pytest -q -p no:cacheprovider --junitxml="$OUT/exactness.xml" \
  tests/test_buffer.py tests/test_sgd.py tests/test_drift.py tests/test_segments.py \
  tests/test_train.py tests/test_adam.py tests/test_rmsprop.py -m "not slow" \
  > "$OUT/exactness.log" 2>&1 || status=1

(cd tests && python -m pytest -q -p no:cacheprovider --junitxml="../$OUT/sharding.xml" \
  sharding_checks.py) > "$OUT/sharding.log" 2>&1 || status=1

python benchmarks/hypergradient.py --quick --out "$OUT/hypergradient.json" \
  > "$OUT/hypergradient.log" 2>&1 || status=1

python benchmarks/offload_memory.py --out "$OUT/offload_memory.json" \
  > "$OUT/offload_memory.log" 2>&1 || status=1

tail -n 3 "$OUT"/*.log
exit $status
