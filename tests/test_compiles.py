"""Changing task weights and entropy coefficients every step never recompiles the step."""

import jax
import numpy as np

from conftest import build_step, host_batch, tiny_config
from mtjax import train
from mtjax.parallel import sharding
from mtjax.train import step as step_lib


def test_weights_and_coefs_change_every_step_one_compilation():
  cfg = tiny_config(**{"mesh.fsdp": 8})
  mesh, _, state, step, _ = build_step(cfg)
  counter = step_lib.CompileCounter()
  rng = np.random.default_rng(0)
  objectives = []
  with jax.set_mesh(mesh):
    for i in range(10):
      batch = {k: jax.device_put(v, sharding.named(mesh, step_lib.BATCH_AXES))
               for k, v in host_batch(cfg, start=0).items()}
      weights = rng.random(3).astype(np.float32)
      coefs = rng.normal(size=3).astype(np.float32) * 0.1
      with counter:
        state, metrics = step(state, batch, weights, coefs)
      objectives.append(float(metrics["objective"]))
  assert counter.count == 1
  assert len(set(objectives)) == 10  # the weights really reached the step


def test_run_with_linear_entropy_schedule_logs_one_compile(tmp_path, monkeypatch):
  cfg = tiny_config(**{"train.entropy_coefs": {"grammar": (0.0, 0.5)}, "train.steps": 6})
  monkeypatch.chdir(tmp_path)  # a relative workdir, as `make demo` passes
  result = train.run(cfg, "relative/run")
  coefs = [r["train/grammar/entropy_coef"] for r in result.history]
  assert coefs[0] == 0.0 and coefs[-1] > coefs[1] > 0
  assert [r["perf/compiles"] for r in result.history] == [1] * 6
