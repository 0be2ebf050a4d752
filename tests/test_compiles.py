"""Changing task weights and entropy coefficients every step never recompiles the step, and at
fixed params they set the objective and its gradient to sum_t w_t loss_t - sum_t c_t entropy_t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_step, host_batch, tiny_config
from mtjax import recipes
from mtjax.monitoring import CompileCounter
from mtjax.parallel import sharding
from mtjax.train import step as step_lib


@pytest.mark.multidevice
def test_weights_and_coefs_change_every_step_one_compilation():
  # z_loss 0: the objective is then exactly sum_t w_t loss_t - sum_t c_t entropy_t.
  cfg = tiny_config(**{"mesh.fsdp": 8, "model.z_loss": 0.0})
  mesh, _, state0, step, _ = build_step(cfg)
  counter = CompileCounter()
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    batch = {k: jax.device_put(v, sharding.named(mesh, sharding.BATCH_AXES))
             for k, v in host_batch(cfg, start=0).items()}
    runs = []
    for _ in range(10):
      weights = rng.random(3).astype(np.float32) * 2
      coefs = rng.normal(size=3).astype(np.float32) * 0.1
      state = jax.tree.map(jnp.copy, state0)  # the SAME params every call (the step donates)
      with counter:
        state, metrics = step(state, batch, weights, coefs)
      runs.append((weights, coefs, jax.device_get(metrics)))
  assert counter.count == 1
  # At fixed params and batch, per-task values do not depend on the weights; the objective is
  # the weighted sum, computed here in float64 from those per-task values.
  first = runs[0][2]["per_task"]
  objectives = []
  for weights, coefs, m in runs:
    for k in ("loss", "entropy", "accuracy", "tokens"):
      np.testing.assert_allclose(m["per_task"][k], first[k], rtol=1e-6, err_msg=k)
    loss = np.asarray(m["per_task"]["loss"], np.float64)
    entropy = np.asarray(m["per_task"]["entropy"], np.float64)
    expected = np.sum(weights * loss) - np.sum(coefs * entropy)
    np.testing.assert_allclose(float(m["objective"]), expected, rtol=1e-5, atol=1e-6)
    objectives.append(float(m["objective"]))
  assert (first["tokens"] > 0).all() and len(set(objectives)) == 10


def test_weights_and_coefs_reach_the_gradient():
  # The step's gradient at weights w and coefficients c equals sum_t w_t grad(loss_t) -
  # sum_t c_t grad(entropy_t), with every per-task gradient taken on its own (no weights
  # involved): each task's weight and coefficient scales its own term, none ignored or swapped.
  from flax import nnx
  from mtjax.train import losses
  cfg = tiny_config(**{"mesh.fsdp": 1, "model.z_loss": 0.0})
  _, graphdef, state, _, _ = build_step(cfg, jax.devices()[:1])
  batch = {k: jnp.asarray(v) for k, v in host_batch(cfg).items()}
  zero = jnp.zeros(3, jnp.float32)

  def per_task(params, kind, t):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    return losses.multitask_objective(logits, batch, zero, zero)[1][kind][t]

  per_task_grad = jax.jit(jax.grad(per_task), static_argnums=(1,))
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
  loss_grads = [flat(per_task_grad(state.params, "loss", t)) for t in range(3)]
  entropy_grads = [flat(per_task_grad(state.params, "entropy", t)) for t in range(3)]
  for t in range(3):  # the tasks' gradients differ, so a swap would show
    for u in range(t):
      assert not np.allclose(loss_grads[t], loss_grads[u])
  w = np.array([1.5, 0.25, 3.0], np.float32)
  c = np.array([0.2, -0.1, 0.05], np.float32)
  grad_fn = jax.jit(step_lib.make_grad_fn(graphdef, num_tasks=3))
  got = flat(grad_fn(state.params, batch, w, c)[2])
  expected = sum(w[t] * loss_grads[t] - c[t] * entropy_grads[t] for t in range(3))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_run_with_linear_entropy_schedule_logs_one_compile(tmp_path, monkeypatch):
  cfg = tiny_config(**{"train.entropy_coefs": {"grammar": (0.0, 0.5)}, "train.steps": 6})
  monkeypatch.chdir(tmp_path)  # a relative workdir, as `make demo` passes
  result = recipes.run(cfg, "relative/run")
  coefs = [r["train/grammar/entropy_coef"] for r in result.history]
  assert coefs[0] == 0.0 and coefs[-1] > coefs[1] > 0
  assert [r["perf/compiles"] for r in result.history] == [1] * 6
