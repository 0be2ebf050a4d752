#!/usr/bin/env bash
# One prepared check for a single-GPU machine; installs nothing from the network.
#
# Needs: python3 with jax[cuda], flax, optax, orbax-checkpoint (and torch, optionally); the
# other mtjax dependencies as wheels in .whl/ if that python lacks them (fetch them on a machine
# with PyPI access: see the list in README.md, "Performance"). Writes JSON and a log to $OUT
# (default bench/results/gpu). Usage:  bash bench/gpu_check.sh
#   1. the GPU-marked tests (GPU vs CPU step in float32, bf16 training, eval and generation)
#   2. mtjax bench at a size that fills the GPU (configs/bench.py:gpu, bf16)
#   3. mtjax bench of the CPU demo model on this host's CPU, with the PyTorch eager CPU arm
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

echo "== GPU-marked tests"
JAX_PLATFORMS=cuda,cpu "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
JAX_PLATFORMS=cpu "$PY" -m pytest -q -p no:cacheprovider tests/test_bench.py -k "torch or bare" 2>&1 \
    | tee -a "$OUT/tests.log"

echo "== benchmark on the GPU (bf16)"
JAX_PLATFORMS=cuda "$PY" -m mtjax bench --config configs/bench.py:gpu --out "$OUT/bench_gpu.json" \
    --rounds "${ROUNDS:-3}" --steps "${STEPS:-10}" --torch_steps 0 2>&1 | grep -v -i warning

echo "== benchmark on this host's CPU (the demo model, with the PyTorch eager arm)"
JAX_PLATFORMS=cpu "$PY" -m mtjax bench --config configs/bench.py --out "$OUT/bench_cpu.json" \
    --rounds 3 --steps 5 2>&1 | grep -v -i warning
