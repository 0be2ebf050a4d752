"""Lin et al. 2023, "Dual-Balancing Multi-Task Learning": gradients of log L_t (rows / (w_t L_t)),
an EMA ghat_t of each (beta_k = ema / k ** beta_sigma at the task's k-th update, as in LibMTL's
DB_MTL), update sum_t (max_s |ghat_s| / |ghat_t|) ghat_t over present tasks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtjax.config import WeightingConfig
from mtjax.train.weighting import EPS, Decision, Method, Need, Stats, combine, gram, keep_absent


def dbmtl_update(w: WeightingConfig, state: dict[str, Any], log_grads: Any,
                 present: jax.Array) -> tuple[dict[str, Any], jax.Array]:
  """The EMA of each present task's log-loss gradient; returns (state, scales) with scales_t =
  max_s |ghat_s| / |ghat_t| over present tasks (0 for absent ones)."""
  count = state["count"] + 1
  beta = w.ema / count.astype(jnp.float32) ** w.beta_sigma
  t = count.shape[0]
  mix = lambda new, old: new + beta.reshape((t,) + (1,) * (new.ndim - 1)) * (old - new)
  ema = jax.tree.map(lambda n, o: mix(n.astype(jnp.float32), o), log_grads, state["grads"])
  new_state = keep_absent(present, {"grads": ema, "count": count}, state)
  norms = jnp.sqrt(jnp.diagonal(gram(new_state["grads"])))
  top = jnp.max(jnp.where(present, norms, 0.0))
  scales = jnp.where(present, top / (norms + EPS), 0.0)
  return new_state, scales


class DBMTL(Method):
  need = Need.GRADIENTS

  def init(self, num_tasks: int, params: Any = None) -> dict[str, Any]:
    # Per-task gradient EMAs [T, *param] (sharded like their parameter: mtjax.train.state).
    return {"grads": jax.tree.map(lambda p: jnp.zeros((num_tasks, *p.shape), jnp.float32), params),
            "count": jnp.zeros((num_tasks,), jnp.int32)}

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    weighted = stats.task_weights * stats.losses
    scale = jnp.where(stats.present, 1.0 / jnp.maximum(weighted, 1e-8), 0.0)
    log_rows = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), stats.rows)
    new, coefs = dbmtl_update(self.cfg, state, log_rows, stats.present)
    return Decision(weights=coefs, update=combine(new["grads"], coefs)), new
