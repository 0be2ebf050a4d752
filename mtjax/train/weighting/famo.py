"""Liu, Liu, Zhang & Stone 2023, "FAMO: Fast Adaptive Multitask Optimization": logits xi (init 0),
z = softmax(xi), objective sum_t c z_t log(L_t - m_t), c = 1 / sum_t (z_t / (L_t - m_t)) held
constant; xi takes an Adam step (lr 0.025, L2 weight decay 0.001 as in the paper's code) with
gradient J_z^T d, d_t = log(L_t(now) - m_t) - log(L_t(next) - m_t). The paper evaluates L(next)
with a second forward pass on the same batch after the update; here L(next) is the NEXT step's
losses (one step late, no extra forward), so step k first updates xi from (L(k-1), L(k)), then
weights with softmax(xi) and L(k). d_t = 0 where task t is absent in either step. It balances the
weighted losses w_t L_t, as every method."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtjax.config import WeightingConfig
from mtjax.train.weighting import EPS, Decision, Method, Need, Stats


def logits_optimizer(w: WeightingConfig) -> optax.GradientTransformation:
  # torch.optim.Adam(weight_decay=...) adds the L2 term to the gradient
  return optax.chain(optax.add_decayed_weights(w.weight_decay), optax.adam(w.lr))


def famo_update_logits(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
                       present: jax.Array) -> dict[str, Any]:
  """The logits' Adam step from the previous step's and this step's losses, then this step's
  log-losses recorded (absent tasks keep theirs)."""
  log_loss = jnp.log(jnp.maximum(losses - w.min_loss, EPS))
  both = present & state["has_prev"]
  d = jnp.where(both, state["prev_log_loss"] - log_loss, 0.0)
  xi = state["logits"]
  _, pullback = jax.vjp(jax.nn.softmax, xi)
  (grad,) = pullback(d)  # J_z^T d
  updates, opt = logits_optimizer(w).update(grad, state["opt"], xi)
  stepped = {"logits": optax.apply_updates(xi, updates), "opt": opt}
  # The first step with any earlier losses is the first update (the paper starts after step 1).
  stepped = jax.tree.map(lambda a, b: jnp.where(both.any(), a, b), stepped,
                         {"logits": xi, "opt": state["opt"]})
  return {**stepped, "prev_log_loss": jnp.where(present, log_loss, state["prev_log_loss"]),
          "has_prev": state["has_prev"] | present}


def famo_weights(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
                 present: jax.Array) -> jax.Array:
  """d/dL_t of sum_t c z_t log(L_t - m_t) with c held constant: c z_t / (L_t - m_t)."""
  z = jax.nn.softmax(state["logits"])
  gap = jnp.maximum(losses - w.min_loss, EPS)
  ratio = jnp.where(present, z / gap, 0.0)
  c = 1.0 / jnp.maximum(jnp.sum(ratio), EPS)
  return c * ratio


def famo_objective(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
                   present: jax.Array) -> jax.Array:
  z = jax.nn.softmax(state["logits"])
  gap = jnp.maximum(losses - w.min_loss, EPS)
  c = 1.0 / jnp.maximum(jnp.sum(jnp.where(present, z / gap, 0.0)), EPS)
  return jnp.sum(jnp.where(present, c * z * jnp.log(gap), 0.0))


class FAMO(Method):
  need = Need.LOSSES

  def init(self, num_tasks: int, params: Any = None) -> dict[str, Any]:
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {"logits": zeros, "opt": logits_optimizer(self.cfg).init(zeros), "prev_log_loss": zeros,
            "has_prev": jnp.zeros((num_tasks,), jnp.bool_)}

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    weighted = stats.task_weights * stats.losses  # the weighted losses w_t L_t, as every method
    new = famo_update_logits(self.cfg, state, weighted, stats.present)
    weights = stats.task_weights * famo_weights(self.cfg, new, weighted, stats.present)
    return Decision(weights=weights,
                    objective=famo_objective(self.cfg, new, weighted, stats.present)), new
