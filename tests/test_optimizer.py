"""AdamW with its LR schedule, clipping and decay mask against a numpy hand computation;
gradient accumulation equals one big batch; norms and embeddings get no weight decay."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_step, host_batch, tiny_config
from mtjax.config import OptimizerConfig
from mtjax.train import optimizer
from mtjax.train import step as step_lib


# ---------------------------------------------------------------- AdamW by hand (numpy, float64)

def warmup_then(decay):
  """Linear warmup from 0 to lr over warmup_steps, then decay(cfg, s, n, peak, end) where s counts
  steps after warmup and n is the number of decay steps (decay_steps, or total_steps, minus warmup)."""
  def lr(cfg, total_steps, step):
    peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
      return peak * step / cfg.warmup_steps
    n = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1) - cfg.warmup_steps
    return decay(cfg, min(step - cfg.warmup_steps, n), n, peak, end)
  return lr


def _wsd(cfg, s, n, peak, end):
  """Warmup-stable-decay (MiniCPM, Hu et al. 2024): the peak, then a linear decay to the end
  value over the last decay_fraction of decay_steps (warmup included in decay_steps)."""
  total = n + cfg.warmup_steps
  decay = max(1, round(cfg.decay_fraction * total))
  start = max(total - decay, cfg.warmup_steps) - cfg.warmup_steps  # in steps after warmup
  if s <= start:
    return peak
  return peak + (end - peak) * (s - start) / (n - start)


REFERENCE_LR = {  # the LR of step t (counted from 0), by schedule name
    # Loshchilov & Hutter's cosine (SGDR) without restarts, down to min_lr_ratio * lr
    "cosine": warmup_then(lambda cfg, s, n, peak, end:
                          end + (peak - end) * 0.5 * (1 + math.cos(math.pi * s / n))),
    "constant": warmup_then(lambda cfg, s, n, peak, end: peak),
    "wsd": warmup_then(_wsd),
}
SCHEDULES = sorted(REFERENCE_LR)  # every schedule make_optimizer knows, against its reference

# A params tree named like the model's; True where AdamW's decoupled weight decay applies (matrices),
# False on 1-D parameters (norm scales, biases) and on the token embedding (a lookup table).
# Scanned layers stack their parameters on a leading layer axis: a [layers, d] norm is still a
# vector per layer, and biases are never decayed.
DECAYED = {"token_embed": False, "final_norm": {"scale": False}, "lm_head": True,
           "layers": {"attn_norm": {"scale": False}, "attn": {"q": True, "q_bias": False},
                      "mlp": {"gate": True}}}
SHAPES = {"token_embed": (11, 4), "final_norm": {"scale": (4,)}, "lm_head": (4, 11),
          "layers": {"attn_norm": {"scale": (2, 4)}, "attn": {"q": (2, 4, 2, 3), "q_bias": (2, 2, 3)},
                     "mlp": {"gate": (2, 4, 5)}}}
GRAD_NORMS = (5.0, 0.2, 1.0, 3.0, 0.5, 2.0, 0.1, 0.7)  # clip_norm 1: clipped on some steps only


def adamw_by_hand(cfg, total_steps, params, grads_per_step, lr_fn, decayed):
  """Params after each step: global-norm clipping, Adam's moments with bias correction, and
  weight decay decoupled from the gradient (added to the Adam direction, scaled by the LR).
  decayed: one bool per leaf of params, in tree order."""
  leaves, treedef = jax.tree.flatten(params)
  p = [np.asarray(x, np.float64) for x in leaves]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  history = []
  for t, grads in enumerate(grads_per_step):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
    if cfg.clip_norm > 0 and norm > cfg.clip_norm:
      g = [x * cfg.clip_norm / norm for x in g]
    lr = lr_fn(cfg, total_steps, t)  # the LR of the step counted from 0
    for i in range(len(p)):
      m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * g[i]
      v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * g[i] ** 2
      m_hat = m[i] / (1 - cfg.b1 ** (t + 1))
      v_hat = v[i] / (1 - cfg.b2 ** (t + 1))
      direction = m_hat / (np.sqrt(v_hat) + cfg.eps)
      if decayed[i]:
        direction = direction + cfg.weight_decay * p[i]
      p[i] = p[i] - lr * direction
    history.append(jax.tree.unflatten(treedef, [x.copy() for x in p]))
  return history


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_adamw_steps_match_a_hand_computation(schedule):
  # Steps 0..7 cover warmup (LR 0 at step 0), the decay and the floor after decay_steps.
  cfg = dataclasses.replace(OptimizerConfig(), schedule=schedule, lr=0.1, warmup_steps=2,
                            decay_steps=0, decay_fraction=0.5, min_lr_ratio=0.1, weight_decay=0.5,
                            clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-3)  # eps matters beside sqrt(v)
  total_steps = 6
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  grads_per_step = []
  for norm in GRAD_NORMS:
    g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    scale = norm / math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in jax.tree.leaves(g)))
    grads_per_step.append(jax.tree.map(lambda x, s=scale: (x * s).astype(np.float32), g))
  expected = adamw_by_hand(cfg, total_steps, params, grads_per_step, REFERENCE_LR[schedule],
                           jax.tree.leaves(DECAYED))

  tx, lr_schedule = optimizer.make_optimizer(cfg, total_steps)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  state, p = tx.init(params), params
  for t, grads in enumerate(grads_per_step):
    np.testing.assert_allclose(float(lr_schedule(t)), REFERENCE_LR[schedule](cfg, total_steps, t),
                               rtol=1e-6, atol=1e-9, err_msg=f"lr at step {t}")
    updates, state = update(grads, state, p)
    p = jax.tree.map(lambda a, u: np.asarray(a + u), p, updates)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(expected[t])):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6,
                                 err_msg=f"step {t} {jax.tree_util.keystr(path)}")


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


@pytest.mark.multidevice
def test_sharded_step_with_grad_accum_is_one_adamw_update_of_the_big_batch_gradient():
  # The real jitted step (8 devices, 2 microbatches) against: the gradient of the whole batch on
  # one device, then one AdamW update by hand. No warmup, so step 0 has the peak LR and moves.
  base = {"data.batch_size": 16, "optimizer.warmup_steps": 0, "optimizer.eps": 1e-4}
  cfg = tiny_config(**base, **{"optimizer.grad_accum": 2, "mesh.fsdp": 4, "mesh.data": 2})
  mesh, graphdef, state, step, _ = build_step(cfg)
  before = jax.device_get(state.params)
  host = host_batch(cfg)
  w, c = np.array([1.0, 0.5, 2.0], np.float32), np.array([0.0, 0.1, -0.05], np.float32)
  grad_fn = jax.jit(step_lib.make_grad_fn(graphdef, num_tasks=3, z_loss=cfg.model.z_loss))
  objective, _, grads = jax.device_get(grad_fn(before, {k: jnp.asarray(v) for k, v in host.items()},
                                                w, c))
  from mtjax.parallel import sharding
  batch = {k: jax.device_put(v, sharding.named(mesh, sharding.BATCH_AXES)) for k, v in host.items()}
  with jax.set_mesh(mesh):
    state, metrics = step(state, batch, w, c)
  assert int(state.step) == 1 and int(metrics["skipped_steps"]) == 0
  np.testing.assert_allclose(float(metrics["objective"]), float(objective), rtol=1e-5)
  decayed = [leaf.ndim - (path[0].key == "layers") >= 2 and path[0].key != "token_embed"
             for path, leaf in jax.tree_util.tree_leaves_with_path(before)]  # layers: stacked
  assert sum(decayed) and not all(decayed)
  (expected,) = adamw_by_hand(cfg.optimizer, cfg.train.steps, before, [grads],
                              REFERENCE_LR[cfg.optimizer.schedule], decayed)
  after = jax.device_get(state.params)
  moved = 0
  for (path, got), want, old in zip(jax.tree_util.tree_leaves_with_path(after),
                                    jax.tree.leaves(expected), jax.tree.leaves(before)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    moved += int(np.abs(got - old).max() > 1e-4)
  assert moved == len(decayed)  # every parameter took a real step


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
  np.testing.assert_array_equal(after["layers"]["attn_norm"]["scale"],  # [layers, d]: a norm
                                before["layers"]["attn_norm"]["scale"])
  for path in (("layers", "attn", "q"), ("layers", "mlp", "down"), ("lm_head",)):
    b, a = before, after
    for k in path:
      b, a = b[k], a[k]
    np.testing.assert_allclose(a, b * factor, rtol=1e-6, err_msg=str(path))
