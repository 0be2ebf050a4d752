"""Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization": the min-norm point
sum_t alpha_t g_t of the convex hull of the task gradients (closed form for two tasks, Frank-Wolfe
on the Gram matrix for more, as their MinNormSolver, train.weighting.solver_iters steps); the
update is along it (alpha sums to 1)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtjax.train.weighting import EPS, Decision, Method, Need, Stats, combine, gram


def _min_norm_2(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> jax.Array:
  """gamma minimizing |gamma x1 + (1 - gamma) x2|^2 from the inner products (MinNormSolver's
  _min_norm_element_from2, in closed form: 0.999/0.001 at the ends as theirs)."""
  interior = (v22 - v12) / jnp.maximum(v11 + v22 - 2 * v12, EPS)
  return jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, interior))


def mgda_coefs(g: jax.Array, present: jax.Array, iters: int) -> jax.Array:
  """alpha on the simplex over present tasks minimizing |sum_t alpha_t g_t|^2 (g: the Gram matrix).
  Two tasks: the closed form; more: Frank-Wolfe from the uniform point, `iters` steps, each moving
  toward the task minimizing (G alpha)_t with the exact line search."""
  t = g.shape[0]
  n = jnp.maximum(present.sum(), 1)
  alpha = jnp.where(present, 1.0 / n, 0.0)

  def step(alpha, _):
    grad = g @ alpha
    j = jnp.argmin(jnp.where(present, grad, jnp.inf))
    v11, v12, v22 = alpha @ grad, grad[j], g[j, j]
    gamma = _min_norm_2(v11, v12, v22)
    return gamma * alpha + (1 - gamma) * jax.nn.one_hot(j, t), None

  if t == 2:  # the closed form between the two (one present: all on it)
    gamma = jnp.clip((g[1, 1] - g[0, 1]) / jnp.maximum(g[0, 0] + g[1, 1] - 2 * g[0, 1], EPS), 0, 1)
    two = jnp.stack([gamma, 1 - gamma])
    return jnp.where(present.all(), two, alpha)
  alpha, _ = jax.lax.scan(step, alpha, None, length=iters)
  return alpha


class MGDA(Method):
  need = Need.GRADIENTS

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    coefs = mgda_coefs(gram(stats.rows), stats.present, self.cfg.solver_iters)
    return Decision(weights=coefs, update=combine(stats.rows, coefs)), state
