"""Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses": learnable
log-variances s_t (init 0), objective sum_t (exp(-s_t) w_t L_t + s_t) / 2; s takes its own Adam
step (train.weighting.lr) from d/ds_t = (1 - exp(-s_t) w_t L_t) / 2 after the model's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtjax.config import WeightingConfig
from mtjax.train.weighting import Decision, Method, Stats, keep_absent


def uncertainty_weights(state: dict[str, Any]) -> jax.Array:
  """d objective / d (w_t L_t) = exp(-s_t) / 2."""
  return jnp.exp(-state["log_var"]) / 2


def uncertainty_update(w: WeightingConfig, state: dict[str, Any], weighted_losses: jax.Array,
                       present: jax.Array) -> dict[str, Any]:
  """One Adam step on s from d/ds_t = (1 - exp(-s_t) w_t L_t) / 2 (absent tasks: unchanged)."""
  s = state["log_var"]
  grad = jnp.where(present, (1 - jnp.exp(-s) * weighted_losses) / 2, 0.0)
  updates, opt = optax.adam(w.lr).update(grad, state["opt"], s)
  new = {"log_var": optax.apply_updates(s, updates), "opt": opt}
  return keep_absent(present, new, state)


def uncertainty_regularizer(state: dict[str, Any]) -> jax.Array:
  """The objective's sum_t s_t / 2 (constant for the model: reported, not differentiated)."""
  return jnp.sum(state["log_var"]) / 2


class Uncertainty(Method):

  def init(self, num_tasks: int, params: Any = None) -> dict[str, Any]:
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {"log_var": zeros, "opt": optax.adam(self.cfg.lr).init(zeros)}

  def weights(self, state: dict[str, Any]) -> jax.Array:
    return uncertainty_weights(state)

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    new = uncertainty_update(self.cfg, state, stats.task_weights * stats.losses, stats.present)
    return Decision(weights=stats.task_weights * uncertainty_weights(state),
                    objective=uncertainty_regularizer(state)), new
