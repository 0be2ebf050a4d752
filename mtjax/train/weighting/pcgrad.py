"""Yu et al. 2020, "Gradient Surgery for Multi-Task Learning": for each task, in a random order (a
key from the seed and the step), project its gradient off every other task's original gradient it
conflicts with (negative dot product); sum. Done on the [T, T] Gram matrix: each projected
gradient is a combination of the originals, so the result is sum_t coef_t g_t with coefficients
from the Gram matrix."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtjax.train.weighting import EPS, Decision, Method, Need, Stats, combine, gram


def pcgrad_coefs(g: jax.Array, present: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad as coefficients on the original gradients: sum_i c_i where c_i starts at e_i and,
  for j in orders[i] (j != i, present), loses (c_i . g g_j) / |g_j|^2 e_j if c_i . g g_j < 0.
  g: the [T, T] Gram matrix; orders: [T, T] a permutation of the tasks per task."""
  t = g.shape[0]

  def one_task(i, order):
    def visit(c, j):
      dot = c @ g[:, j]
      conflict = (j != i) & present[j] & (dot < 0) & (g[j, j] > 0)
      return c - jnp.where(conflict, dot / jnp.maximum(g[j, j], EPS), 0.0) * jax.nn.one_hot(j, t), None
    c, _ = jax.lax.scan(visit, jax.nn.one_hot(i, t), order)
    return jnp.where(present[i], c, 0.0)

  return jax.vmap(one_task)(jnp.arange(t), orders).sum(axis=0)


def pcgrad_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """[T, T]: a random permutation of the tasks for each task (LibMTL shuffles per task)."""
  return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(jax.random.split(key, num_tasks))


class PCGrad(Method):
  need = Need.GRADIENTS

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    orders = pcgrad_orders(stats.key, stats.present.shape[0])
    coefs = pcgrad_coefs(gram(stats.rows), stats.present, orders)
    return Decision(weights=coefs, update=combine(stats.rows, coefs)), state
