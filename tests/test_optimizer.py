"""Gradient accumulation equals one big batch; norms and embeddings get no weight decay."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import build_step, host_batch, tiny_config
from mtjax.train import step as step_lib


def test_grad_accumulation_equals_one_big_batch():
  cfg = tiny_config(**{"data.batch_size": 16, "mesh.fsdp": 1, "mesh.data": 1})
  batch = {k: jnp.asarray(v) for k, v in host_batch(cfg).items()}
  _, graphdef, state, _, _ = build_step(cfg, jax.devices()[:1])
  weights = jnp.array([1.0, 0.5, 2.0])
  coefs = jnp.array([0.0, 0.1, -0.05])
  results = {}
  for accum in (1, 4):
    fn = jax.jit(step_lib.make_grad_fn(graphdef, num_tasks=3, grad_accum=accum, z_loss=1e-3))
    results[accum] = jax.device_get(fn(state.params, batch, weights, coefs))
  (obj1, pt1, g1), (obj4, pt4, g4) = results[1], results[4]
  np.testing.assert_allclose(obj4, obj1, rtol=1e-5)
  for k in pt1:
    np.testing.assert_allclose(pt4[k], pt1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_with_grad_accum_runs_sharded():
  cfg = tiny_config(**{"data.batch_size": 16, "optimizer.grad_accum": 2, "mesh.fsdp": 4,
                       "mesh.data": 2})
  mesh, _, state, step, _ = build_step(cfg)
  from mtjax.parallel import sharding
  batch = {k: jax.device_put(v, sharding.named(mesh, step_lib.BATCH_AXES))
           for k, v in host_batch(cfg).items()}
  with jax.set_mesh(mesh):
    state, metrics = step(state, batch, np.ones(3, np.float32), np.zeros(3, np.float32))
  assert np.isfinite(float(metrics["objective"])) and int(state.step) == 1


def test_no_weight_decay_on_norms_and_embeddings():
  # Zero loss weights and coefficients: zero gradients, so Adam moves nothing and only decoupled
  # weight decay acts: p <- p * (1 - lr * wd) on decayed parameters, unchanged elsewhere.
  cfg = tiny_config(**{"optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.5,
                       "optimizer.lr": 0.1, "model.z_loss": 0.0, "mesh.fsdp": 1})
  mesh, _, state, step, schedule = build_step(cfg, jax.devices()[:1])
  before = jax.device_get(state.params)
  batch = host_batch(cfg)
  with jax.set_mesh(mesh):
    state, _ = step(state, batch, np.zeros(3, np.float32), np.zeros(3, np.float32))
  after = jax.device_get(state.params)
  factor = 1 - float(schedule(0)) * 0.5
  assert factor < 0.96
  np.testing.assert_array_equal(after["token_embed"], before["token_embed"])
  np.testing.assert_array_equal(after["final_norm"]["scale"], before["final_norm"]["scale"])
  np.testing.assert_array_equal(after["layers"][0]["attn_norm"]["scale"],
                                before["layers"][0]["attn_norm"]["scale"])
  for path in (("layers", 0, "attn", "q"), ("layers", 1, "mlp", "down"), ("lm_head",)):
    b, a = before, after
    for k in path:
      b, a = b[k], a[k]
    np.testing.assert_allclose(a, b * factor, rtol=1e-6, err_msg=str(path))
