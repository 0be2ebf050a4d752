"""multitask_objective against a float64 numpy reference written from the definition."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.train import losses


def numpy_objective(logits, batch, weights, coefs, z_loss=0.0):
  logits = logits.astype(np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = logits - lse[..., None]
  T = len(weights)
  out = {k: np.zeros(T) for k in ("loss", "entropy", "accuracy", "tokens")}
  B, L = batch["targets"].shape
  z_sum, total = 0.0, 0.0
  for t in range(T):
    ce_sum = ent_sum = acc_sum = n = 0.0
    for b in range(B):
      for i in range(L):
        m = batch["loss_mask"][b, i]
        if batch["task_ids"][b, i] != t or m == 0:
          continue
        p = np.exp(logp[b, i])
        ce_sum += -logp[b, i, batch["targets"][b, i]] * m
        ent_sum += -(p * logp[b, i]).sum() * m
        acc_sum += float(np.argmax(logits[b, i]) == batch["targets"][b, i]) * m
        z_sum += lse[b, i] ** 2 * m
        n += m
    out["tokens"][t] = n
    total += n
    if n > 0:
      out["loss"][t], out["entropy"][t], out["accuracy"][t] = ce_sum / n, ent_sum / n, acc_sum / n
  obj = (weights * out["loss"]).sum() - (coefs * out["entropy"]).sum() + z_loss * z_sum / max(total, 1)
  return obj, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  B, L, V, T = 3, 11, 17, 5
  logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
  task_ids = rng.choice([0, 2, 4], size=(B, L)).astype(np.int32)  # tasks 1 and 3 absent
  task_ids[:, -2:] = -1  # padding
  loss_mask = (rng.random((B, L)) < 0.7).astype(np.float32)
  loss_mask[:, -2:] = 0
  batch = {"targets": rng.integers(0, V, size=(B, L)).astype(np.int32),
           "task_ids": task_ids, "loss_mask": loss_mask}
  weights = rng.random(T).astype(np.float32) * 2
  coefs = rng.normal(size=T).astype(np.float32) * 0.1
  z = 1e-3 * seed
  obj, per_task = losses.multitask_objective(
      jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(weights),
      jnp.asarray(coefs), z_loss=z)
  ref_obj, ref = numpy_objective(logits, batch, weights, coefs, z)
  np.testing.assert_allclose(float(obj), ref_obj, rtol=1e-5, atol=1e-5)
  for k in ("loss", "entropy", "accuracy", "tokens"):
    assert per_task[k].shape == (T,)
    np.testing.assert_allclose(np.asarray(per_task[k]), ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert per_task["tokens"][1] == 0 and per_task["loss"][1] == 0  # absent task: zero, not NaN


def test_absent_task_has_no_gradient_and_no_nan():
  import jax
  logits = jnp.zeros((1, 4, 5))
  batch = {"targets": jnp.zeros((1, 4), jnp.int32), "task_ids": jnp.array([[0, 0, -1, -1]]),
           "loss_mask": jnp.array([[1.0, 1.0, 0.0, 0.0]])}

  def f(w):
    return losses.multitask_objective(logits, batch, w, jnp.zeros(2))[0]

  g = jax.grad(f)(jnp.ones(2))
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(np.asarray(g), [np.log(5.0), 0.0], rtol=1e-6)
