"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), the LoRA kind
model.lora.kind=dora, computed as PEFT 0.21 does (peft/tuners/lora/dora.py).

Beside LoRA's A and B, a trained magnitude `<t>_lora_magnitude` [T, *out] per output row. With
s = alpha / r and n = ||W + s A B|| the norm over the input axes of each output row (computed from
the adapter's current A and B but detached, as the paper's section 4.3 and PEFT), a token of
adapter t sees

  y = x W + (m/n - 1) x W + (m/n) s x A B      (x W without the projection's bias)

i.e. the output of (m/n)(W + s A B): the direction of the adapted weight rescaled to m. m starts
at n = ||W|| (B is zero at the start), so the model starts equal to its base. With dropout in
training the base term is recomputed on the dropped input too, as PEFT does. Merged:
W' = (m/n)(W + s A B). PEFT export: LoRA's tensors and `<module>.lora_magnitude_vector`
[out_features], with use_dora=true.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.model.adapters import Call, Site, Trained
from mtjax.model.lora import HF_MODULES, LoRA


class DoraMagnitude(Trained):
  """`<target>_lora_magnitude` [T, *out]: the adapted weight's norm per output row."""


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  kind = "dora"
  label = "DoRA"

  def names(self, site: Site) -> tuple[str, ...]:
    return (*super().names(site), f"{site.name}_lora_magnitude")

  def init(self, site: Site, w: jax.Array, key: jax.Array) -> dict[str, tuple[type, Any, tuple]]:
    lead = 1 if site.stacked else 0
    norm = _row_norm(w.astype(jnp.float32), lead, len(site.in_axes))  # [*lead, *out]
    m = jnp.broadcast_to(jnp.expand_dims(norm, lead), (*w.shape[:lead], self.tasks, *norm.shape[lead:]))
    return {**super().init(site, w, key),
            f"{site.name}_lora_magnitude": (DoraMagnitude, m.astype(w.dtype),
                                            (*site.lead, "lora_task", *site.out_axes))}

  def ratio(self, w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array, n_in: int) -> jax.Array:
    """m / ||W + s A_t B_t|| per adapter t [T, *out] (one layer; the norm detached), float32."""
    w, a, b = w.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32)
    adapted = w[None] + self.scale * jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
    norm = jax.lax.stop_gradient(_row_norm(adapted, 1, n_in))
    return m.astype(jnp.float32) / norm

  def apply(self, call: Call) -> jax.Array:
    assert call.w is not None
    x = self.dropped(call)
    dt = x.dtype
    base = call.y if x is call.x else jnp.einsum(call.equation, x, call.w)
    lora = self.delta(call, x)
    ratio = self.ratio(call.w, call.var("_lora_a"), call.var("_lora_b"),
                       call.var("_lora_magnitude"), call.x.ndim - 2).astype(dt)  # [T, *out]
    mix = self.mix(call, dt)
    if mix is None:
      return call.y + (ratio[0] - 1) * base + ratio[0] * lora
    # Each token's own adapter's ratio; a token of no adapter's task keeps the base (ratio - 1: 0).
    per_token = lambda r: jnp.einsum("blt,t...->bl...", mix, r)
    return call.y + per_token(ratio - 1) * base + per_token(ratio) * lora

  def neutral(self, params: Mapping[str, jax.Array], site: Site) -> dict[str, jax.Array]:
    """B = 0 and m = ||W||: the base model."""
    out = super().neutral(params, site)
    path = site.beside(f"{site.name}_lora_magnitude")
    w = params[site.path]
    lead = 1 if site.stacked else 0
    norm = _row_norm(w.astype(jnp.float32), lead, len(site.in_axes))
    out[path] = jnp.broadcast_to(jnp.expand_dims(norm, lead), params[path].shape).astype(
        params[path].dtype)
    return out

  def merge(self, params: Mapping[str, jax.Array], site: Site, index: int) -> jax.Array:
    w = params[site.path]
    adapted = w.astype(jnp.float32) + self.product(params, site, index)
    lead, n_in = (1 if site.stacked else 0), len(site.in_axes)
    m = params[site.beside(f"{site.name}_lora_magnitude")].astype(jnp.float32)
    m = m[:, index] if site.stacked else m[index]  # [*lead, *out]
    ratio = m / _row_norm(adapted, lead, n_in)
    return (adapted * jnp.expand_dims(ratio, tuple(range(lead, lead + n_in)))).astype(w.dtype)

  def peft_tensors(self, params: Mapping[str, Any], site: Site, index: int,
                   layers: int) -> dict[str, np.ndarray]:
    out = super().peft_tensors(params, site, index, layers)
    m = np.asarray(jax.device_get(params[site.beside(f"{site.name}_lora_magnitude")][:, index]),
                   np.float32)  # [L, *out]
    for i in range(layers):
      name = f"base_model.model.model.layers.{i}.{HF_MODULES[site.name]}"
      out[f"{name}.lora_magnitude_vector"] = np.ascontiguousarray(m[i].reshape(-1))
    return out

  def peft_config(self) -> dict[str, Any]:
    return {**super().peft_config(), "use_dora": True}


def _row_norm(w: jax.Array, lead: int, n_in: int) -> jax.Array:
  """The L2 norm over the input axes [lead, lead + n_in) of a weight [*lead, *in, *out]."""
  return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(lead, lead + n_in))))
