"""The fixed-shape RL update on the tiny model: gradients, the clip, one compilation, the KL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from mtjax.monitoring import CompileCounter
from mtjax.rl import objectives as obj
from mtjax.rl import update as rl
from mtjax.train import state as state_lib

ROWS, PROMPT, WIDTH = 8, 6, 10  # 2 prompts x 4 samples; L = 16


@functools.cache
def _run(devices=1):
  """The tiny run on one device (quicker to compile), or on all 8 (fsdp: sharded params and
  rollout rows)."""
  from mtjax.train import setup as setup_lib
  return setup_lib.build(tiny_config(), devices=jax.devices()[:devices])


def _state(tx, devices=1):
  """A fresh TrainState for optimizer tx (the tiny run's initial params), in its shardings."""
  run = _run(devices)
  _, abstract, params_sh = state_lib.param_shardings(run.mesh, run.spec)
  shardings = state_lib.state_shardings(run.mesh, tx, abstract, params_sh)
  params = jax.tree.map(jnp.copy, run.state.params)
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
  state = state_lib.TrainState(step=zero(), params=params, opt_state=tx.init(params),
                              skipped_steps=zero(), consecutive_skips=zero())
  return jax.device_put(state, shardings), shardings


def _rollout(seed, num_tasks=3):
  """A hand-built rollout in the sampler's layout: prompts of 2-6 tokens left-padded to 6, then
  completions of 1-10 tokens (some stopped, some out of budget)."""
  rng = np.random.default_rng(seed)
  vocab = _run().spec.vocab_size
  prompt_len = rng.integers(2, PROMPT + 1, ROWS)
  valid = np.arange(PROMPT)[None, :] >= PROMPT - prompt_len[:, None]
  prompts = np.where(valid, rng.integers(3, vocab, (ROWS, PROMPT)), 0)
  new = rng.integers(3, vocab, (ROWS, WIDTH))
  lengths = rng.integers(0, WIDTH + 1, ROWS)
  budgets = np.full(ROWS, WIDTH)
  rewards = rng.integers(0, 2, (ROWS // 4, 4)).astype(np.float32)
  rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group has a signal
  adv = np.asarray(obj.group_advantages(rewards)).reshape(-1)
  task_ids = np.repeat(np.arange(ROWS // 4) % num_tasks, 4)
  return rl.rollout_from_samples(prompts, valid, new, np.zeros((ROWS, WIDTH)), lengths, budgets,
                                 adv, task_ids)


def _policy_logp(params, rollout):
  """Independent: log p(next token) from the model's dense logits."""
  run = _run()
  model = nnx.merge(run.graphdef, params)
  logits = model(jnp.asarray(rollout["tokens"]), jnp.asarray(rollout["positions"]),
                 jnp.asarray(rollout["segment_ids"]))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = jnp.concatenate([rollout["tokens"][:, 1:], np.zeros((ROWS, 1), np.int32)], axis=1)
  return jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def test_rollout_layout():
  r = _rollout(0)
  assert all(r[k].shape == (ROWS, PROMPT + WIDTH) for k in rl.ROLLOUT_KEYS if k not in rl.ROW_KEYS)
  # A row with prompt of 3 tokens and a completion stopped after 2 tokens (3 with the stop).
  one = rl.rollout_from_samples(
      np.array([[0, 0, 0, 5, 6, 7]]), np.array([[0, 0, 0, 1, 1, 1]]),
      np.array([[8, 9, 2, 2, 2, 2, 2, 2, 2, 2]]), np.arange(1, 11)[None] * -0.1,
      np.array([2]), np.array([10]), np.array([0.5]), np.array([1]))
  np.testing.assert_array_equal(one["segment_ids"][0], [0, 0, 0] + [1] * 6 + [0] * 7)
  np.testing.assert_array_equal(one["positions"][0, 3:9], np.arange(6))
  # Target j scores token j + 1: the first new token (index 6) is predicted at 5.
  np.testing.assert_array_equal(one["completion_mask"][0], [0] * 5 + [1] * 3 + [0] * 8)
  np.testing.assert_allclose(one["old_logp"][0, 5:8], [-0.1, -0.2, -0.3], rtol=1e-6)
  assert one["old_logp"][0, 8:].sum() == 0.0
  # Out of budget (length == budget, no stop token): every budgeted token is a completion token.
  two = rl.rollout_from_samples(
      np.array([[5, 6]]), np.array([[1, 1]]), np.array([[8, 9, 10]]), np.zeros((1, 3)),
      np.array([2]), np.array([2]), np.array([0.0]), np.array([0]))
  np.testing.assert_array_equal(two["completion_mask"][0], [0, 1, 1, 0, 0])


def _on_policy(lr):
  """(state, shardings, rollout with old_logp = the current policy's, params on the host, the
  independent gradient of -sum(A * logp * mask) / sum(mask) through the dense logits)."""
  state, shardings = _state(optax.sgd(lr))
  rollout = _rollout(1)
  params = jax.device_get(state.params)
  rollout["old_logp"] = np.asarray(_policy_logp(params, rollout)) * rollout["completion_mask"]
  mask = jnp.asarray(rollout["completion_mask"])
  adv = jnp.asarray(rollout["advantages"])

  def reference(p):
    return -jnp.sum(adv[:, None] * _policy_logp(p, rollout) * mask) / jnp.sum(mask)

  want = jax.jit(jax.grad(reference))(params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  assert scale > 0
  return state, shardings, rollout, params, want, scale


def test_on_policy_loss_gradient_is_policy_gradient():
  """(a) old_logp = the current policy's: the ratio is 1, nothing is clipped, the KL to an equal
  reference has zero gradient, so the loss's gradient is that of -sum(A * logp * mask) /
  sum(mask) (an independent jax.grad through the dense logits)."""
  run = _run()
  _, _, rollout, params, want, scale = _on_policy(1.0)
  loss_fn = rl.make_rl_loss_fn(run.graphdef, clip_eps=0.2, kl_coef=0.5)
  old = jnp.asarray(rollout["old_logp"])
  got, aux = jax.jit(jax.grad(loss_fn, has_aux=True))(params, rollout, old, old)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=1e-4)
  assert float(aux["clip_fraction"]) == 0.0 and float(aux["kl"]) == 0.0


def test_on_policy_update_follows_policy_gradient():
  """(a) The jitted update, one epoch with SGD: the params move by -lr * that gradient."""
  run = _run()
  lr = 1.0
  state, shardings, rollout, params, want, scale = _on_policy(lr)
  adv, mask = rollout["advantages"], rollout["completion_mask"]
  update = rl.jit_rl_update(rl.make_rl_update_fn(run.graphdef, optax.sgd(lr), epochs=1,
                                                 clip_eps=0.2, kl_coef=0.5, num_tasks=3),
                            run.mesh, shardings)
  with jax.set_mesh(run.mesh):
    new_state, metrics = update(state, rollout, params)
  metrics = jax.device_get(metrics)
  delta = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / -lr,
                       jax.device_get(new_state.params), params)
  for d, w in zip(jax.tree.leaves(delta), jax.tree.leaves(want)):
    np.testing.assert_allclose(d, np.asarray(w), atol=1e-4 * scale)
  assert metrics["clip_fraction"] == 0.0 and metrics["kl"] < 1e-7
  assert metrics["old_logp_gap"] < 1e-5
  np.testing.assert_allclose(metrics["surrogate"], (adv[:, None] * mask).sum() / mask.sum(),
                             atol=1e-6)
  assert int(new_state.step) == 1 and int(new_state.skipped_steps) == 0


def test_epochs_clip_binds_and_metrics_match_numpy():
  """(b) Three epochs at a large learning rate on one rollout: the policy moves away from the
  sampling one, the clip binds by the later epochs, and every epoch's logged objective, clip
  fraction and KL equal numpy's recomputation from the returned log-probs."""
  run = _run()
  eps, beta = 0.2, 0.1
  tx = optax.adam(0.05)
  state, shardings = _state(tx)
  fn = rl.make_rl_update_fn(run.graphdef, tx, epochs=3, clip_eps=eps, kl_coef=beta,
                            num_tasks=3, recompute_old_logp=True, return_logp=True)
  update = rl.jit_rl_update(fn, run.mesh, shardings)
  rollout = _rollout(2)
  ref = jax.device_get(state.params)
  with jax.set_mesh(run.mesh):
    new_state, m = update(state, rollout, ref)
  m = jax.device_get(m)
  mask, adv = rollout["completion_mask"], rollout["advantages"].astype(np.float64)
  old, refl = m["old_logp"].astype(np.float64), m["ref_logp"].astype(np.float64)
  np.testing.assert_allclose(old * mask, refl * mask, atol=1e-6)  # same params
  assert m["per_epoch"]["clip_fraction"][0] == 0.0  # epoch 1 is on policy
  assert m["per_epoch"]["clip_fraction"][2] > 0.0
  for e in range(3):
    logp = m["logp"][e].astype(np.float64)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    per_token = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    surrogate = (per_token * mask).sum() / mask.sum()
    binds = ((a > 0) & (ratio > 1 + eps)) | ((a < 0) & (ratio < 1 - eps))
    x = refl - logp
    kl = ((np.exp(x) - x - 1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["per_epoch"]["surrogate"][e], surrogate, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(m["per_epoch"]["kl"][e], kl, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(m["per_epoch"]["loss"][e], -surrogate + beta * kl, atol=1e-5,
                               rtol=1e-4)
    np.testing.assert_allclose(m["per_epoch"]["clip_fraction"][e],
                               (binds * mask).sum() / mask.sum(), atol=1e-6)
  np.testing.assert_allclose(m["clip_fraction"], m["per_epoch"]["clip_fraction"].mean(),
                             rtol=1e-6)
  # Per-task metrics: tasks 0 and 1 hold one group each, task 2 none.
  ent = m["per_task"]["entropy"]
  for t in range(2):
    rows = rollout["task_ids"] == t
    tok_ent = np.asarray(rl.make_token_stats_fn(run.graphdef)(ref, rollout)[1])
    np.testing.assert_allclose(ent[t], (tok_ent * mask)[rows].sum() / mask[rows].sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(m["per_task"]["advantage"][t], adv[rows].mean(), atol=1e-6)
    assert m["per_task"]["tokens"][t] == mask[rows].sum()
  assert ent[2] == 0.0 and m["per_task"]["sequences"].tolist() == [4.0, 4.0, 0.0]
  assert int(new_state.step) == 1


@pytest.mark.multidevice
def test_one_compilation_and_kl_grows():
  """(c) Several rollouts of one shape: one compilation. (d) The KL to the reference is 0 while
  the params equal it, and grows as the policy moves away."""
  run = _run(8)  # sharded params and rollout rows
  assert run.mesh.size == 8
  tx = optax.adam(0.02)
  state, shardings = _state(tx, 8)
  fn = rl.make_rl_update_fn(run.graphdef, tx, epochs=2, clip_eps=0.2, kl_coef=0.05,
                            num_tasks=3, recompute_old_logp=True)
  update = rl.jit_rl_update(fn, run.mesh, shardings)
  ref = jax.device_put(jax.device_get(state.params), shardings.params)
  rollouts = [jax.device_put(_rollout(10 + i), rl.rollout_shardings(run.mesh)) for i in range(4)]
  kls, counts = [], []
  for r in rollouts:
    counter = CompileCounter()
    with jax.set_mesh(run.mesh), counter:
      state, m = update(state, r, ref)
    counts.append(counter.count)
    kls.append(float(m["per_epoch"]["kl"][0]))  # before this call's updates
  assert counts[0] >= 1 and counts[1:] == [0, 0, 0], counts
  assert update._cache_size() == 1
  assert kls[0] < 1e-7
  assert 0 < kls[1] < kls[2] < kls[3], kls
  assert int(state.step) == 4 and int(state.skipped_steps) == 0


def test_non_finite_update_is_skipped():
  run = _run()
  tx = optax.sgd(1.0)
  state, shardings = _state(tx)
  fn = rl.make_rl_update_fn(run.graphdef, tx, epochs=2, clip_eps=0.2, kl_coef=0.0, num_tasks=3)
  rollout = _rollout(3)
  rollout["advantages"] = np.full(ROWS, np.nan, np.float32)
  before = jax.device_get(state.params)
  with jax.set_mesh(run.mesh):
    new_state, m = rl.jit_rl_update(fn, run.mesh, shardings)(state, rollout, before)
  for a, b in zip(jax.tree.leaves(jax.device_get(new_state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(new_state.skipped_steps) == 2 and int(new_state.consecutive_skips) == 2
  assert int(m["skipped_steps"]) == 2


@pytest.mark.parametrize("loss_chunk", [0, 1024])
def test_sampler_log_probs_line_up(loss_chunk):
  """The rollout built from the KV-cache sampler's own outputs (temperature 1) scores the same
  log-probs in the update's forward pass: the layout and the target alignment agree."""
  from mtjax.eval.decode import make_generate_fn
  run = _run()
  gen = make_generate_fn(run.graphdef, run.spec, WIDTH, eos_id=1)
  rng = np.random.default_rng(4)
  prompt_len = rng.integers(2, PROMPT + 1, ROWS)
  valid = np.arange(PROMPT)[None, :] >= PROMPT - prompt_len[:, None]
  prompts = np.where(valid, rng.integers(3, run.spec.vocab_size, (ROWS, PROMPT)), 0)
  budgets = rng.integers(3, WIDTH + 1, ROWS)
  with jax.set_mesh(run.mesh):
    out, logp, length = gen(run.state.params, prompts.astype(np.int32), valid, budgets,
                            jax.random.key(0), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0),
                            np.zeros(ROWS, np.int32))
  out, logp, length = (np.asarray(x) for x in jax.device_get((out, logp, length)))
  rollout = rl.rollout_from_samples(prompts, valid, out, logp, length, budgets, np.zeros(ROWS),
                                    np.zeros(ROWS, np.int32))
  assert rollout["completion_mask"].sum() > ROWS
  got, entropy = rl.make_token_stats_fn(run.graphdef, loss_chunk=loss_chunk)(
      run.state.params, rollout)
  mask = rollout["completion_mask"]
  np.testing.assert_allclose(np.asarray(got) * mask, rollout["old_logp"], atol=1e-4)
  assert (np.asarray(entropy)[mask > 0] > 0).all()


def test_lora_trains_only_the_adapters_of_the_rollouts_tasks():
  """With per-task LoRA adapters: the frozen base never moves, the adapters of the tasks in the
  rollout do, a task absent from it keeps its adapter."""
  from flax import traverse_util

  from mtjax.model.lora import is_lora_path
  from mtjax.train import setup as setup_lib
  cfg = tiny_config(**{"model.lora.targets": ("q", "v", "up"), "model.lora.rank": 4,
                       "model.lora.alpha": 8.0, "model.lora.per_task": True,
                       "optimizer.lr": 1e-2, "optimizer.warmup_steps": 0,
                       "optimizer.weight_decay": 0.0})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  flat = lambda p: {k: np.asarray(v) for k, v in
                    traverse_util.flatten_dict(jax.device_get(p), sep="/").items()}
  before = flat(run.state.params)
  ref = jax.device_get(run.state.params)
  fn = rl.make_rl_update_fn(run.graphdef, run.tx, epochs=2, clip_eps=0.2, kl_coef=0.1,
                            num_tasks=3, lora=True, recompute_old_logp=True)
  rollout = _rollout(5, num_tasks=2)  # tasks 0 and 1 only
  with jax.set_mesh(run.mesh):
    state, m = rl.jit_rl_update(fn, run.mesh, run.shardings)(run.state, rollout, ref)
  after = flat(state.params)
  assert int(m["skipped_steps"]) == 0
  for k, b in before.items():
    if not is_lora_path(k):
      np.testing.assert_array_equal(after[k], b, err_msg=k)
    else:  # [layers, T, ...]: B starts at zero, so both A and B move within two epochs
      assert not np.array_equal(after[k][:, 0], b[:, 0]), k
      assert not np.array_equal(after[k][:, 1], b[:, 1]), k
      np.testing.assert_array_equal(after[k][:, 2], b[:, 2], err_msg=k)
