"""Per-task adapters routed per token (model.lora.per_task, model.svf.per_task): in one packed
batch holding several tasks' examples, each task's adapter gets the same gradient as from a batch
with that task's examples alone (issue 20's routing check), and one compile serves the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import host_batch, is_adapter_path, tiny_config
from mtjax.train import setup as setup_lib
from mtjax.train import step as step_lib

KINDS = {
    "lora": {"model.lora.targets": ("q", "v", "up", "down"), "model.lora.rank": 4,
             "model.lora.per_task": True},
    "svf": {"model.svf.enabled": True, "model.svf.targets": ("q", "o", "gate", "up", "down")},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_packed_batch_gives_each_adapter_its_single_task_gradient(kind):
  cfg = tiny_config(**KINDS[kind], **{"model.dtype": "float32"})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  T = cfg.num_tasks
  # B starts at zero, so A's gradient is zero at init: take the gradient at random adapters.
  flat = dict(traverse_util.flatten_dict(run.state.params, sep="/"))
  rng = np.random.default_rng(0)
  for k, v in flat.items():
    if k.endswith("_lora_b"):
      flat[k] = jnp.asarray(rng.normal(size=v.shape) * 0.1, v.dtype)
  params = traverse_util.unflatten_dict(flat, sep="/")
  grad_fn = jax.jit(step_lib.make_grad_fn(run.graphdef, num_tasks=T, lora=True,
                                          loss_chunk=cfg.train.loss_chunk))
  batch = {k: np.asarray(v) for k, v in host_batch(cfg).items()}
  present = sorted(set(batch["task_ids"][batch["loss_mask"] > 0].tolist()))
  assert present == list(range(T))  # the packed batch holds every task
  rows_with = [len({t for t in np.unique(r) if t >= 0}) for r in batch["task_ids"]]
  assert max(rows_with) > 1  # and some row packs several tasks
  ones, zeros = jnp.ones(T), jnp.zeros(T)
  _, _, packed = grad_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, ones, zeros)
  packed = traverse_util.flatten_dict(packed, sep="/")
  for t in range(T):
    keep = batch["task_ids"] == t
    alone = dict(batch)
    alone["segment_ids"] = np.where(keep, batch["segment_ids"], 0)
    alone["loss_mask"] = np.where(keep, batch["loss_mask"], 0.0).astype(batch["loss_mask"].dtype)
    alone["task_ids"] = np.where(keep, t, -1).astype(batch["task_ids"].dtype)
    one_hot = jnp.asarray(np.eye(T, dtype=np.float32)[t])
    _, _, single = grad_fn(params, {k: jnp.asarray(v) for k, v in alone.items()}, one_hot, zeros)
    single = traverse_util.flatten_dict(single, sep="/")
    for k in packed:
      if not is_adapter_path(k):
        continue
      a, b = np.asarray(packed[k])[:, t], np.asarray(single[k])[:, t]  # [layers, T, ...]
      assert np.abs(b).max() > 0, k
      np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), err_msg=f"{k} task {t}")
