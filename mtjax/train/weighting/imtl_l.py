"""IMTL-L, the loss-balancing half of Liu et al. 2021, "Towards Impartial Multi-task Learning"
(ICLR; LibMTL's IMTL): a learnable scale s_t per task (init 0), objective
sum_t (exp(s_t) w_t L_t - s_t), so each task's scaled loss is driven to exp(s_t) w_t L_t = 1 (its
optimum in s_t): tasks are balanced by their loss scale, impartially. The model's gradient
weights each task by exp(s_t); s takes its own Adam step (train.weighting.lr) from
d/ds_t = exp(s_t) w_t L_t - 1 after the model's (LibMTL trains s with the model's optimizer).
Absent tasks keep their scale."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtjax.train.weighting import Decision, Method, Stats, keep_absent


class IMTLL(Method):

  def init(self, num_tasks: int, params: Any = None) -> dict[str, Any]:
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {"log_scale": zeros, "opt": optax.adam(self.cfg.lr).init(zeros)}

  def weights(self, state: dict[str, Any]) -> jax.Array:
    return jnp.exp(state["log_scale"])  # d objective / d (w_t L_t)

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    s = state["log_scale"]
    grad = jnp.where(stats.present, jnp.exp(s) * stats.task_weights * stats.losses - 1.0, 0.0)
    updates, opt = optax.adam(self.cfg.lr).update(grad, state["opt"], s)
    new = keep_absent(stats.present, {"log_scale": optax.apply_updates(s, updates), "opt": opt},
                      state)
    # The objective's -sum_t s_t: constant for the model, reported with it.
    return Decision(weights=stats.task_weights * jnp.exp(s), objective=-jnp.sum(s)), new
