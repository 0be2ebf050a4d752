"""Per-token cross entropy and predictive entropy, reduced per task by segment sums.

objective = sum_t w_t * loss_t - sum_t beta_t * entropy_t  (+ z_loss * mean(logsumexp^2))

loss_t, entropy_t and accuracy_t are means over task t's loss-masked tokens. A task with no
tokens in the batch contributes exactly zero (no NaN, no gradient). Padding carries task id -1
and a zero loss mask, and lands in an overflow segment that is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def _task_segments(task_ids: jax.Array, num_tasks: int) -> jax.Array:
  """Flat segment index per token; anything outside [0, T) goes to the overflow segment T."""
  ids = task_ids.reshape(-1)
  return jnp.where((ids >= 0) & (ids < num_tasks), ids, num_tasks)


def task_sums(values: jax.Array, batch: Mapping[str, jax.Array], num_tasks: int) -> jax.Array:
  """Sum of values * loss_mask per task: [B, L] -> [T]."""
  weighted = (values * batch["loss_mask"]).reshape(-1)
  sums = jax.ops.segment_sum(weighted, _task_segments(batch["task_ids"], num_tasks),
                             num_segments=num_tasks + 1)
  return sums[:num_tasks]


def token_counts(batch: Mapping[str, jax.Array], num_tasks: int) -> jax.Array:
  """Loss-masked tokens per task, [T] float32."""
  return task_sums(jnp.ones_like(batch["loss_mask"]), batch, num_tasks)


def per_token(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Cross entropy, predictive entropy, correctness and logsumexp per token ([B, L] each)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  logp = logits - lse[..., None]
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"ce": ce, "entropy": entropy, "correct": correct, "lse": lse}


def multitask_objective(logits: jax.Array, batch: Mapping[str, jax.Array],
                        task_weights: jax.Array, entropy_coefs: jax.Array, *,
                        z_loss: float = 0.0,
                        normalizer: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (objective, per_task) with per_task["loss"|"entropy"|"accuracy"|"tokens"] of shape [T].

  normalizer: per-task token counts to divide by (default: this batch's). Gradient accumulation
  passes the FULL batch's counts, so the objective is linear in the microbatches and summing
  their gradients gives exactly the gradient of one big batch.
  """
  num_tasks = task_weights.shape[0]
  tok = per_token(logits, batch["targets"])
  tokens = token_counts(batch, num_tasks)
  counts = tokens if normalizer is None else normalizer
  denom = jnp.maximum(counts, 1.0)
  per_task = {
      "loss": task_sums(tok["ce"], batch, num_tasks) / denom,
      "entropy": task_sums(tok["entropy"], batch, num_tasks) / denom,
      "accuracy": task_sums(tok["correct"], batch, num_tasks) / denom,
      "tokens": tokens,
  }
  objective = (jnp.sum(task_weights * per_task["loss"])
               - jnp.sum(entropy_coefs * per_task["entropy"]))
  if z_loss:
    z = task_sums(jnp.square(tok["lse"]), batch, num_tasks)
    objective = objective + z_loss * jnp.sum(z) / jnp.maximum(jnp.sum(counts), 1.0)
  return objective, per_task
