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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


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


# ---------------------------------------------------------------- a run's experts (model.svf)

def expert_vectors(params: Any, spec: Any) -> dict[str, jax.Array]:
  """Each SVF target's expert vectors z = sigmoid(p): {projection path: [layers, T, r]}."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  return {path[:-len("_svf_p")]: jax.nn.sigmoid(flat[path].astype(jnp.float32))
          for path in sorted(flat) if path.endswith("_svf_p")}


def select(zs: Mapping[str, jax.Array], index: int) -> dict[str, jax.Array]:
  """Expert `index`'s z per projection: {path: [layers, r]}."""
  return {k: z[:, index] for k, z in zs.items()}


def mix(zs: Mapping[str, jax.Array], alpha: jax.Array) -> dict[str, jax.Array]:
  """The composed z' = sum_k alpha_k z_k per projection: {path: [layers, r]} (alpha [T])."""
  return {k: jnp.einsum("ltr,t->lr", z, jnp.asarray(alpha, z.dtype)) for k, z in zs.items()}


def merge(params: Any, z: Mapping[str, jax.Array]) -> Any:
  """The base parameters (spec.without_adapters()'s Decoder: no SVF entries) with each projection
  W replaced by W + U diag(S z k - S) V^T = U diag(S z) V^T sum(S) / sum(S z) (exactly W where
  z = 1), in float32, stored in W's dtype; z: {path: [layers, r]} (select, mix)."""
  from mtjax.model.llama import is_adapter_path, is_svf_basis_path, svf_coefficients_of_z
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  out = {k: v for k, v in flat.items() if not (is_adapter_path(k) or is_svf_basis_path(k))}
  for path, zt in z.items():
    u, s, vt, w = flat[path + "_svf_u"], flat[path + "_svf_s"], flat[path + "_svf_vt"], out[path]
    coef = svf_coefficients_of_z(s, zt[:, None, :])[:, 0]  # [layers, r]
    r = s.shape[-1]
    um = u.astype(jnp.float32).reshape(u.shape[0], -1, r)
    vm = vt.astype(jnp.float32).reshape(vt.shape[0], r, -1)
    delta = jnp.einsum("lmr,lr,lrn->lmn", um, coef, vm).reshape(w.shape)
    out[path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return traverse_util.unflatten_dict(out, sep="/")
