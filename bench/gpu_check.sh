#!/usr/bin/env bash
# One prepared check for a single-GPU machine; installs nothing from the network; ~6 minutes.
#
# Needs: python3 with jax[cuda], flax, optax, orbax-checkpoint (and torch, optionally); the
# other mtjax dependencies as wheels in .whl/ if that python lacks them (fetch them on a machine
# with PyPI access: see the list in README.md, "Performance"). Writes JSON and a log to $OUT
# (default bench/results/gpu; copy them to docs/bench/ to commit). Usage:  bash bench/gpu_check.sh
#   1. the GPU-marked tests: every attention kernel (cudnn, triton) against the reference on
#      packed bf16 batches, forward and gradients; GPU vs CPU step; bf16 training, eval, generation
#   2. mtjax bench at ~150M parameters (configs/bench.py:gpu, attention auto) and with the
#      reference attention (:gpu_reference), then at ~1.2B parameters, seq 2048 (:gpu_1b, remat
#      dots): MFU against the H200's spec peak (causal attention at half) and the measured peak
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/mtjax-site .whl/*.whl
  export PYTHONPATH="/tmp/mtjax-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MTJAX_DATA_DIR=/tmp/mtjax-tfds
# The GPU XLA flag preset of launch/slurm_gpu.sbatch (latency-hiding scheduler and friends).
GPU_XLA_FLAGS=$(DRY_RUN=1 REQUEUE=0 XLA_FLAGS= bash launch/slurm_gpu.sbatch --config x | head -1 \
    | "$PY" -c "import shlex, sys; print(shlex.split(sys.stdin.read())[1].split('=', 1)[1])")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "XLA_FLAGS preset: ${GPU_XLA_FLAGS:-<none>}"

echo "== GPU-marked tests (kernels against the reference, GPU step, bf16 training, eval)"
JAX_PLATFORMS=cuda,cpu timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu.py tests/test_attention.py 2>&1 | tee "$OUT/tests.log" || true

bench() {  # name config
  JAX_PLATFORMS=cuda XLA_FLAGS="${GPU_XLA_FLAGS:-}" timeout "${3:-120}" "$PY" -m mtjax bench \
      --config "$2" --out "$OUT/$1.json" --rounds "${ROUNDS:-2}" --steps "${STEPS:-5}" \
      --loader_seconds 1 --torch_steps 0 2>&1 | grep -v -i warning | tee "$OUT/$1.log" || true
}
echo "== benchmark: ~150M parameters, bf16, attention auto"
bench bench_gpu configs/bench.py:gpu
echo "== benchmark: ~150M parameters, bf16, reference attention (the kernel's gain)"
bench bench_gpu_reference configs/bench.py:gpu_reference
echo "== benchmark: ~1.2B parameters, seq 2048, attention auto, remat dots"
bench bench_gpu_1b configs/bench.py:gpu_1b 150
ls -l "$OUT"
