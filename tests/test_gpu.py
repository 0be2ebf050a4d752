"""On a GPU (bench/gpu_check.sh sets JAX_PLATFORMS=cuda,cpu): the step agrees with the CPU, bf16
training learns and compiles once, evaluation and generation run. Skipped without a GPU."""

import json

import jax
import numpy as np
import pytest

from conftest import gpus, requires_gpu, tiny_config
from mtjax import recipes

pytestmark = pytest.mark.gpu




def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in rows if "train/loss" in r]


@requires_gpu
def test_gpu_step_matches_cpu_in_float32(tmp_path):
  cfg = tiny_config(**{"model.dtype": "float32", "train.steps": 4, "checkpoint.every": 0})
  with jax.default_matmul_precision("highest"):
    recipes.run(cfg, tmp_path / "gpu", devices=gpus()[:1])
    recipes.run(cfg, tmp_path / "cpu", devices=jax.devices("cpu")[:1])
  np.testing.assert_allclose(_losses(tmp_path / "gpu"), _losses(tmp_path / "cpu"), rtol=1e-3)


@requires_gpu
def test_gpu_bf16_learns_compiles_once_and_evaluates(tmp_path):
  cfg = tiny_config(**{"train.steps": 60, "train.log_every": 10, "eval.every": 30,
                       "eval.num_examples": 16, "eval.num_generate": 4, "eval.sample_prompts": 2,
                       "eval.num_samples": 2})
  result = recipes.run(cfg, tmp_path / "run", devices=gpus()[:1])
  losses = _losses(tmp_path / "run")
  assert losses[-1] < 0.7 * losses[0]
  assert result.compiles == 1
  eval_rows = [r for r in result.history if "perf/eval_compiles" in r]
  assert len(eval_rows) == 3 and eval_rows[-1]["perf/eval_compiles"] == 1
  assert all(np.isfinite(r["eval/reverse/loss"]) for r in eval_rows)
  assert jax.tree.leaves(result.state.params)[0].devices() == {gpus()[0]}
