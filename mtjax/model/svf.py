"""Singular-value fine-tuning (SVF) experts, the building block of Transformer-squared (Sun et al.
2025, arXiv 2501.06252), and the SVF adapter plug-in (mtjax.model.adapters, model.svf).

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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from mtjax.model.adapters import Adapter, AdapterParam, Call, Site, Trained


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


# ---------------------------------------------------------------- the adapter (model.svf)

# Beside a projection `<t>`: its thin SVD (frozen, computed from the base once and stored with the
# checkpoint) and the trained logits p [T, r] of the experts.
BASIS = ("_svf_u", "_svf_s", "_svf_vt")
LOGITS = "_svf_p"


class SvfBasis(AdapterParam):
  """`<target>_svf_u` [*in, r], `<target>_svf_s` [r], `<target>_svf_vt` [r, *out]: W's thin SVD."""


class SvfParam(Trained):
  """`<target>_svf_p` [T, r]: the experts' logits, z_t = sigmoid(p_t)."""


def svf_basis(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(U [*in, r], S [r], V^T [r, *out]) of one projection [*in, *out], in float32."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  u, s, vt = jnp.linalg.svd(w.astype(jnp.float32).reshape(math.prod(in_shape), -1),
                            full_matrices=False)
  r = s.shape[0]
  return u.reshape(*in_shape, r), s, vt.reshape(r, *out_shape)


def svf_coefficients(s: jax.Array, p: jax.Array) -> jax.Array:
  """S z k - S per expert [..., T, r]: W'_t - W = U diag(this) V^T (z = sigmoid(p), k = sum(S) /
  sum(S z), batched over leading axes)."""
  return svf_coefficients_of_z(s, jax.nn.sigmoid(p.astype(jnp.float32)))


def svf_coefficients_of_z(s: jax.Array, z: jax.Array) -> jax.Array:
  s = s.astype(jnp.float32)[..., None, :]
  scaled = s * z
  return scaled * (jnp.sum(s, -1, keepdims=True) / jnp.sum(scaled, -1, keepdims=True)) - s


@dataclasses.dataclass(frozen=True)
class SVF(Adapter):
  """A token of expert t sees W'_t = U diag(S z_t) V^T sum(S) / sum(S z_t), z_t = sigmoid(p_t),
  computed as W + U diag(S z_t k_t - S) V^T so tokens without an expert see W itself; p starts at
  0.1 + 0.01 N(0, 1). The basis is an SVD per layer (lax.map: never a sharded SVD, which XLA does
  not have), so it is initialised apart from the sharded random init."""

  kind = "svf"
  group = "svf"

  @classmethod
  def from_config(cls, model_config: Any, num_tasks: int, tokenizer_vocab: int) -> Adapter | None:
    svf = model_config.svf
    if not svf.enabled:
      return None
    return cls(targets=tuple(svf.targets), tasks=max(1, num_tasks) if svf.per_task else 1)

  @property
  def init_apart(self) -> bool:
    return True

  def describe(self) -> str:
    return f"SVF experts on {','.join(self.targets)}"

  def names(self, site: Site) -> tuple[str, ...]:
    return tuple(site.name + suffix for suffix in (*BASIS, LOGITS))

  def init(self, site: Site, w: jax.Array, key: jax.Array) -> dict[str, tuple[type, Any, tuple]]:
    n_in = len(site.in_axes)
    basis = lambda x: svf_basis(x, n_in)
    u, s, vt = jax.lax.map(basis, w) if site.stacked else basis(w)
    p = init_logits(key, (*s.shape[:-1], self.tasks, s.shape[-1]))
    lead = site.lead
    return {site.name + "_svf_u": (SvfBasis, u, (*lead, *site.in_axes, "svf_rank")),
            site.name + "_svf_s": (SvfBasis, s, (*lead, "svf_rank")),
            site.name + "_svf_vt": (SvfBasis, vt, (*lead, "svf_rank", *site.out_axes)),
            site.name + LOGITS: (SvfParam, p, (*lead, "lora_task", "svf_rank"))}

  def apply(self, call: Call) -> jax.Array:
    """y + x U diag(c) V^T, c = each token's expert's coefficients (none: zeros)."""
    x = call.x
    dt = x.dtype
    u, vt = call.var("_svf_u").astype(dt), call.var("_svf_vt").astype(dt)
    coef = svf_coefficients(call.var("_svf_s"), call.var(LOGITS)).astype(dt)  # [T, r]
    n_in = u.ndim - 1
    i, o = "defg"[:n_in], "uvwz"[:vt.ndim - 1]
    xu = jnp.einsum(f"bl{i},{i}r->blr", x, u)
    mix = self.mix(call, dt)
    c = coef[0] if mix is None else jnp.einsum("blt,tr->blr", mix, coef)
    return call.y + jnp.einsum(f"blr,r{o}->bl{o}", xu * c, vt)

  def merge(self, params: Mapping[str, jax.Array], site: Site, index: int) -> jax.Array:
    z = jax.nn.sigmoid(params[site.beside(site.name + LOGITS)].astype(jnp.float32))  # [L, T, r]
    return merged_weight(params, site.path, z[:, index])


# ---------------------------------------------------------------- a run's experts

def _is_svf(path: str) -> bool:
  return path.endswith((*BASIS, LOGITS))


def expert_vectors(params: Any, spec: Any = None) -> dict[str, jax.Array]:
  """Each SVF target's expert vectors z = sigmoid(p): {projection path: [layers, T, r]}."""
  del spec
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  return {path[:-len(LOGITS)]: jax.nn.sigmoid(flat[path].astype(jnp.float32))
          for path in sorted(flat) if path.endswith(LOGITS)}


def select(zs: Mapping[str, jax.Array], index: int) -> dict[str, jax.Array]:
  """Expert `index`'s z per projection: {path: [layers, r]}."""
  return {k: z[:, index] for k, z in zs.items()}


def mix(zs: Mapping[str, jax.Array], alpha: jax.Array) -> dict[str, jax.Array]:
  """The composed z' = sum_k alpha_k z_k per projection: {path: [layers, r]} (alpha [T])."""
  return {k: jnp.einsum("ltr,t->lr", z, jnp.asarray(alpha, z.dtype)) for k, z in zs.items()}


def merged_weight(flat: Mapping[str, jax.Array], path: str, z: jax.Array) -> jax.Array:
  """The stacked projection at `path` [layers, *in, *out] with W + U diag(S z k - S) V^T per
  layer (z [layers, r]), in float32, stored in W's dtype."""
  u, s, vt, w = flat[path + "_svf_u"], flat[path + "_svf_s"], flat[path + "_svf_vt"], flat[path]
  coef = svf_coefficients_of_z(s, z[:, None, :])[:, 0]  # [layers, r]
  r = s.shape[-1]
  um = u.astype(jnp.float32).reshape(u.shape[0], -1, r)
  vm = vt.astype(jnp.float32).reshape(vt.shape[0], r, -1)
  delta = jnp.einsum("lmr,lr,lrn->lmn", um, coef, vm).reshape(w.shape)
  return (w.astype(jnp.float32) + delta).astype(w.dtype)


def merge(params: Any, z: Mapping[str, jax.Array]) -> Any:
  """The base parameters (spec.without_adapters()'s Decoder: no SVF entries) with each projection
  W replaced by W + U diag(S z k - S) V^T = U diag(S z) V^T sum(S) / sum(S z) (exactly W where
  z = 1), in float32, stored in W's dtype; z: {path: [layers, r]} (select, mix)."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  out = {k: v for k, v in flat.items() if not _is_svf(k)}
  for path, zt in z.items():
    out[path] = merged_weight({**flat, path: out[path]}, path, zt)
  return traverse_util.unflatten_dict(out, sep="/")
