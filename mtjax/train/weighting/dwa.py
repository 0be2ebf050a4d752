"""Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with Attention" (Dynamic Weight
Average): r_t = Lbar_t(k-1) / Lbar_t(k-2) over EMAs Lbar of each task's loss (decay
train.weighting.ema; the paper averages over epochs, which packed streams do not have), weights
T softmax(r / tau)_t; 1 until a task has two EMA updates."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtjax.config import WeightingConfig
from mtjax.train.weighting import EPS, Decision, Method, Stats, keep_absent


def dwa_weights(w: WeightingConfig, state: dict[str, Any]) -> jax.Array:
  t = state["ema"].shape[0]
  ratio = jnp.where(state["count"] >= 2, state["ema"] / jnp.maximum(state["ema_prev"], EPS), 1.0)
  return t * jax.nn.softmax(ratio / w.temperature)


def dwa_update(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
               present: jax.Array) -> dict[str, Any]:
  ema = jnp.where(state["count"] == 0, losses, w.ema * state["ema"] + (1 - w.ema) * losses)
  new = {"ema": ema, "ema_prev": state["ema"], "count": state["count"] + 1}
  return keep_absent(present, new, state)


class DWA(Method):

  def init(self, num_tasks: int, params: Any = None) -> dict[str, Any]:
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {"ema": zeros, "ema_prev": zeros, "count": jnp.zeros((num_tasks,), jnp.int32)}

  def weights(self, state: dict[str, Any]) -> jax.Array:
    return dwa_weights(self.cfg, state)

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    return (Decision(weights=stats.task_weights * dwa_weights(self.cfg, state)),
            dwa_update(self.cfg, state, stats.losses, stats.present))
