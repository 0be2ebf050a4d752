"""Attention behind one function, chosen by `model.attention`.

"reference": `jax.nn.dot_product_attention` with a boolean mask that is causal AND restricted to
the same packed segment, so packed examples never attend to each other (padding, segment 0,
attends to nothing; its rows stay finite). Fast fused kernels (cuDNN segment API, TPU splash
attention) go behind the same switch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_causal_mask(segment_ids: jax.Array, window: int = 0) -> jax.Array:
  """[B, L] -> bool [B, 1, L, L]: query i may see key j iff j <= i, same segment, not padding,
  and (with a sliding window W > 0) i - j < W."""
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
  if window:
    causal &= ~jnp.tril(jnp.ones((length, length), jnp.bool_), -window)
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids != 0)[:, :, None]
  return (causal[None] & same & real)[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
           implementation: str = "reference", window: int = 0) -> jax.Array:
  """q [B, L, N, H], k/v [B, L, K, H] with N % K == 0 (GQA) -> [B, L, N, H]."""
  if implementation == "reference":
    return jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(segment_ids, window))
  raise ValueError(f"unknown attention implementation {implementation!r}")


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                  cache: dict[str, jax.Array], *,
                  window: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Attention for decoding: writes this call's T keys/values at cache["index"], then attends
  over every cached slot that holds a real token and is not in the future.

  q [B, T, N, H]; k, v [B, T, K, H]; segment_ids [B, T] (0 = left padding, never attended to).
  """
  index = cache["index"]
  ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
  cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
  valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], segment_ids != 0, index, axis=1)
  t, s = q.shape[1], ck.shape[1]
  query_at = index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= query_at[:, None]  # [T, S]
  if window:  # slots are consecutive positions (left padding is never valid)
    causal &= jnp.arange(s)[None, :] > query_at[:, None] - window
  mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, S]
  y = jax.nn.dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask=mask)
  return y, {"k": ck, "v": cv, "valid": valid, "index": index + t}
