"""LR schedules (constant, WSD) by hand; parameter groups (LR multipliers, frozen = no state); EMA."""

import jax
import numpy as np
import pytest

from conftest import build_step, host_batch, tiny_config
from mtjax.config import OptimizerConfig
from mtjax.parallel import sharding
from mtjax.train import optimizer
from mtjax.train import setup as setup_lib


def test_constant_and_wsd_schedules_by_hand():
  base = dict(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
  constant = optimizer.lr_schedule(OptimizerConfig(schedule="constant", **base), 20)
  np.testing.assert_allclose([float(constant(s)) for s in range(25)],
                             [s / 4 for s in range(4)] + [1.0] * 21, rtol=1e-6)
  wsd = optimizer.lr_schedule(OptimizerConfig(schedule="wsd", decay_fraction=0.25, **base), 20)
  # 20 steps: warmup 0-3, stable 4-14, linear decay over the last 5 (15-19), then the end value.
  expected = [s / 4 for s in range(4)] + [1.0] * 11 + [1.0 - 0.9 * k / 5 for k in range(5)] + [0.1] * 5
  np.testing.assert_allclose([float(wsd(s)) for s in range(25)], expected, rtol=1e-6)


def _grads(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)


def _update(cfg, params, grads):
  tx, _ = optimizer.make_optimizer(cfg, 10)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  return jax.device_get(updates), state


def test_param_groups_scale_the_lr_and_frozen_groups_keep_no_state():
  cfg = tiny_config()
  params = jax.device_get(setup_lib.build(cfg).state.params)
  grads = _grads(params)
  plain = OptimizerConfig(lr=0.01, warmup_steps=0, clip_norm=0.0)
  grouped = OptimizerConfig(lr=0.01, warmup_steps=0, clip_norm=0.0,
                            param_groups={"token_embed": 0.0, "attn": 0.5})
  ref, ref_state = _update(plain, params, grads)
  got, got_state = _update(grouped, params, grads)
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
  for path, update in jax.tree_util.tree_flatten_with_path(got)[0]:
    name = optimizer.param_path(path)
    scale = 0.0 if "token_embed" in name else 0.5 if "attn" in name else 1.0
    np.testing.assert_allclose(update, scale * flat_ref[path], rtol=1e-5, atol=1e-12, err_msg=name)
  size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree) if np.ndim(x))  # not counts
  embed = size(params["token_embed"])
  assert size(got_state) == size(ref_state) - 2 * embed  # no Adam moments for the frozen embedding


@pytest.mark.multidevice
def test_ema_of_weights_by_hand_and_state_is_sharded_like_params():
  cfg = tiny_config(**{"optimizer.ema": 0.9, "optimizer.param_groups": {"token_embed": 0.0},
                       "mesh.fsdp": 8})
  mesh, _, state, step, _ = build_step(cfg)
  p0 = jax.device_get(state.params)
  ema = optimizer.ema_params(state.opt_state)
  leaf_sh = {optimizer.param_path(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  for path, x in jax.tree_util.tree_flatten_with_path(ema)[0]:  # EMA leaves follow their params
    assert x.sharding == leaf_sh[optimizer.param_path(path)]
  expected = p0
  with jax.set_mesh(mesh):
    for i in range(2):
      batch = {k: jax.device_put(v, sharding.named(mesh, sharding.BATCH_AXES))
               for k, v in host_batch(cfg, start=i).items()}
      state, _ = step(state, batch, np.ones(3, np.float32), np.zeros(3, np.float32))
      new = jax.device_get(state.params)
      expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, expected, new)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(optimizer.ema_params(state.opt_state)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  frozen = jax.device_get(state.params)["token_embed"]
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(p0["token_embed"])):
    np.testing.assert_array_equal(a, b)  # frozen: unchanged by two steps


def test_group_labels_first_match_wins():
  params = {"layers": {"0": {"attn": {"wq": np.zeros((2, 2))}}}, "token_embed": np.zeros((3, 2))}
  labels = optimizer.group_labels(params, {"attn/wq": 2.0, "attn": 0.5, "embed": 0.0})
  assert labels == {"layers": {"0": {"attn": {"wq": "attn/wq"}}}, "token_embed": optimizer.FROZEN}
