"""Singular-value fine-tuning (SVF) experts, the building block of Transformer-squared (Sun et al.
2025, arXiv 2501.06252).

A frozen matrix W = U diag(S) V^T (its thin SVD, computed once per matrix: per layer of a stacked
parameter, never a sharded SVD, which XLA does not have) is adapted by an expert vector z, one
entry per singular value:

  W' = U diag(S * z) V^T * sum(S) / sum(S * z)

so z = 1 gives W back and the rescaling keeps the sum of singular values (the paper's
normalization). An expert trains p with z = sigmoid(p), p initialized to 0.1 + 0.01 N(0, 1).
Experts compose at inference as z' = sum_k alpha_k z_k (mtjax.eval.cem finds alpha few-shot).

Matrices with more than two axes (attention's [d, heads, head_dim]) are flattened to
[prod(in axes), prod(out axes)] around `in_axes`; stacked layer parameters carry a leading
layer axis, decomposed layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def as_matrix(w: jax.Array, in_axes: int = 1) -> jax.Array:
  """[*in, *out] -> [prod(in), prod(out)]."""
  return w.reshape(math.prod(w.shape[:in_axes]), -1)


def decompose(w: jax.Array, in_axes: int = 1, *, stacked: bool = False
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(U [m, r], S [r], V^T [r, n]) of the matrix, in float32 (r = min(m, n)); with `stacked`, a
  leading layer axis on each (one SVD per layer)."""
  def one(x):
    u, s, vt = jnp.linalg.svd(as_matrix(x.astype(jnp.float32), in_axes), full_matrices=False)
    return u, s, vt
  return jax.vmap(one)(w) if stacked else one(w)


def expert_weight(u: jax.Array, s: jax.Array, vt: jax.Array, z: jax.Array,
                  shape: Sequence[int] | None = None) -> jax.Array:
  """W' = U diag(S z) V^T * sum(S) / sum(S z) (batched over any leading axes of u, s, vt, z),
  reshaped to `shape` when given."""
  scaled = s * z
  w = jnp.einsum("...mr,...r,...rn->...mn", u, scaled, vt)
  w = w * (jnp.sum(s, axis=-1) / jnp.sum(scaled, axis=-1))[..., None, None]
  return w if shape is None else w.reshape(shape)


def init_logits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """An expert's trainable p: 0.1 + 0.01 N(0, 1) (z = sigmoid(p) starts near 0.52)."""
  return 0.1 + 0.01 * jax.random.normal(key, tuple(shape), jnp.float32)


def compose(zs: jax.Array, alpha: jax.Array) -> jax.Array:
  """z' = sum_k alpha_k z_k: zs [K, ..., r], alpha [K]."""
  return jnp.tensordot(alpha.astype(zs.dtype), zs, axes=1)
