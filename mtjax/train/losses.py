"""Per-token cross entropy and predictive entropy, reduced per task by segment sums.

objective = sum_t w_t * loss_t - sum_t beta_t * entropy_t  (+ z_loss * mean(logsumexp^2))

loss_t, entropy_t and accuracy_t are means over task t's loss-masked tokens. A task with no
tokens in the batch contributes exactly zero (no NaN, no gradient). Padding carries task id -1
and a zero loss mask, and lands in an overflow segment that is dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import cast

import jax
import jax.numpy as jnp


def _task_segments(task_ids: jax.Array, num_tasks: int) -> jax.Array:
  """Flat segment index per token; anything outside [0, T) goes to the overflow segment T."""
  ids = task_ids.reshape(-1)
  return jnp.where((ids >= 0) & (ids < num_tasks), ids, num_tasks)


def task_sums(values: jax.Array, batch: Mapping[str, jax.Array], num_tasks: int) -> jax.Array:
  """Sum of values * loss_mask per task: [B, L] -> [T]."""
  weighted = (values * batch["loss_mask"]).reshape(-1)
  sums = jax.ops.segment_sum(weighted, _task_segments(batch["task_ids"], num_tasks),
                             num_segments=num_tasks + 1)
  return sums[:num_tasks]


def token_counts(batch: Mapping[str, jax.Array], num_tasks: int) -> jax.Array:
  """Loss-masked tokens per task, [T] float32."""
  return task_sums(jnp.ones_like(batch["loss_mask"]), batch, num_tasks)


def per_token(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Cross entropy, predictive entropy, correctness and logsumexp per token ([B, L] each)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  logp = logits - lse[..., None]
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"ce": ce, "entropy": entropy, "correct": correct, "lse": lse}


def _objective_from_tokens(tok: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                           task_weights: jax.Array, entropy_coefs: jax.Array, *, z_loss: float,
                           normalizer: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The per-task reduction shared by the dense and chunked objectives (tok: per_token's dict)."""
  num_tasks = task_weights.shape[0]
  tokens = token_counts(batch, num_tasks)
  counts = tokens if normalizer is None else normalizer
  denom = jnp.maximum(counts, 1.0)
  per_task = {
      "loss": task_sums(tok["ce"], batch, num_tasks) / denom,
      "entropy": task_sums(tok["entropy"], batch, num_tasks) / denom,
      "accuracy": task_sums(tok["correct"], batch, num_tasks) / denom,
      "tokens": tokens,
  }
  objective = (jnp.sum(task_weights * per_task["loss"])
               - jnp.sum(entropy_coefs * per_task["entropy"]))
  if z_loss:
    z = task_sums(jnp.square(tok["lse"]), batch, num_tasks)
    objective = objective + z_loss * jnp.sum(z) / jnp.maximum(jnp.sum(counts), 1.0)
  return objective, per_task


def multitask_objective(logits: jax.Array, batch: Mapping[str, jax.Array],
                        task_weights: jax.Array, entropy_coefs: jax.Array, *,
                        z_loss: float = 0.0,
                        normalizer: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (objective, per_task) with per_task["loss"|"entropy"|"accuracy"|"tokens"] of shape [T].

  normalizer: per-task token counts to divide by (default: this batch's). Gradient accumulation
  passes the FULL batch's counts, so the objective is linear in the microbatches and summing
  their gradients gives exactly the gradient of one big batch.
  """
  tok = per_token(logits, batch["targets"])
  return _objective_from_tokens(tok, batch, task_weights, entropy_coefs, z_loss=z_loss,
                                normalizer=normalizer)


# --- Chunked head + loss: never holds more than one chunk of [tokens, V] float32 logits. ---

def _head_logits(h: jax.Array, head: jax.Array, tied: bool) -> jax.Array:
  """[B, l, d] x head -> [B, l, V] float32, accumulated in float32 (no bf16 rounding of logits)."""
  spec = "bld,vd->blv" if tied else "bld,dv->blv"
  return jnp.einsum(spec, h, head, preferred_element_type=jnp.float32)


def _chunk_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
  """per_token's four terms from one chunk of float32 logits."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  logp = logits - lse[..., None]
  # A masked sum rather than take_along_axis: stays elementwise when V is sharded.
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  ce = lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # first max, as jnp
  return ce, entropy, correct, lse


def _chunked_fwd_impl(hs: jax.Array, head: jax.Array, tg: jax.Array,
                      tied: bool) -> tuple[jax.Array, ...]:
  """hs [n, B, l, d], tg [n, B, l] -> (ce, entropy, correct, lse) each [n, B, l] float32."""
  return jax.lax.map(lambda xs: _chunk_stats(_head_logits(xs[0], head, tied), xs[1]), (hs, tg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_stats(hs: jax.Array, head: jax.Array, tg: jax.Array,
                   tied: bool) -> tuple[jax.Array, ...]:
  return _chunked_fwd_impl(hs, head, tg, tied)


def _chunked_stats_fwd(hs: jax.Array, head: jax.Array, tg: jax.Array, tied: bool):
  out = _chunked_fwd_impl(hs, head, tg, tied)
  _, entropy, _, lse = out
  # Only [n, B, l] statistics are saved; each chunk's logits are recomputed in the backward.
  return out, (hs, head, tg, entropy, lse)


def _chunked_stats_bwd(tied: bool, res, g):
  hs, head, tg, entropy, lse = res
  g_ce, g_ent, _, g_lse = g  # correctness is piecewise constant: no gradient
  cdt = jnp.result_type(hs.dtype, head.dtype)

  def body(dhead, xs):
    h, t, ent, z, gc, ge, gz = xs
    logits = _head_logits(h, head, tied)
    logp = logits - z[..., None]
    p = jnp.exp(logp)
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == t[..., None]
    # d ce = p - onehot; d H = -p (logp + H); d lse = p.
    coef = (gc + gz)[..., None] - ge[..., None] * (logp + ent[..., None])
    dlogits = (p * coef - jnp.where(hit, gc[..., None], 0.0)).astype(cdt)  # as the dense bwd does
    if tied:
      dh = jnp.einsum("blv,vd->bld", dlogits, head, preferred_element_type=jnp.float32)
      dhead = dhead + jnp.einsum("blv,bld->vd", dlogits, h, preferred_element_type=jnp.float32)
    else:
      dh = jnp.einsum("blv,dv->bld", dlogits, head, preferred_element_type=jnp.float32)
      dhead = dhead + jnp.einsum("bld,blv->dv", h, dlogits, preferred_element_type=jnp.float32)
    return dhead, dh.astype(hs.dtype)

  dhead, dhs = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32),
                            (hs, tg, entropy, lse, g_ce, g_ent, g_lse))
  return dhs, dhead.astype(head.dtype), None


_chunked_stats.defvjp(_chunked_stats_fwd, _chunked_stats_bwd)


def per_token_chunked(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, tied: bool,
                      chunk: int = 1024) -> dict[str, jax.Array]:
  """per_token(hidden @ head in float32, targets) without materializing [B, L, V] logits.

  hidden [B, L, d] (float32 or bfloat16, the final-normed state); head [d, V], or the [V, d]
  embedding when tied; targets [B, L] int. Returns {"ce", "entropy", "correct", "lse"}, each
  [B, L] float32. The matmul takes its inputs in their own dtype and accumulates in float32.

  Tokens go through a scan in chunks of [B, chunk // B] (the sequence is split, the batch axis
  kept whole), so at most one [B, chunk // B, V] float32 block of logits (and its softmax in the
  backward) is live. Keeping the batch axis inside each chunk keeps the scan axis unsharded:
  under a mesh with batch over the data axes each device scans its own rows, holding
  ~chunk / (data parallelism) tokens' logits per step. The custom VJP recomputes each chunk's
  logits and accumulates d head in float32 over chunks; gradients are cast back to the inputs'
  dtypes (d logits is cast to the matmul dtype first, as the dense bf16 backward does).

  Vocab-sharded head (V over "tensor"): correct under GSPMD with no special handling; each
  chunk's logits stay sharded on V, and logsumexp, the target logit (a masked sum), entropy and
  argmax become cross-device reductions over the tensor axis, once per chunk.
  """
  b, length = targets.shape
  piece = max(1, min(length, chunk // max(b, 1)))
  n = -(-length // piece)
  pad = n * piece - length
  # Padded positions see zero hidden state and target 0; they are sliced off below, so their
  # cotangents are zero and they add nothing to any gradient.
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
  hs = h.reshape(b, n, piece, h.shape[-1]).transpose(1, 0, 2, 3)
  tg = t.reshape(b, n, piece).transpose(1, 0, 2)
  out = cast(tuple[jax.Array, ...], _chunked_stats(hs, head, tg, tied))  # custom_vjp loses types
  unchunk = lambda x: x.transpose(1, 0, 2).reshape(b, n * piece)[:, :length]
  return {k: unchunk(x) for k, x in zip(("ce", "entropy", "correct", "lse"), out)}


def multitask_objective_chunked(hidden: jax.Array, head: jax.Array, batch: Mapping[str, jax.Array],
                                task_weights: jax.Array, entropy_coefs: jax.Array, *, tied: bool,
                                z_loss: float = 0.0, normalizer: jax.Array | None = None,
                                chunk: int = 1024) -> tuple[jax.Array, dict[str, jax.Array]]:
  """multitask_objective(hidden @ head, ...) from the hidden state, chunked over tokens.

  Same objective, per-task metrics and normalizer semantics; see per_token_chunked for the
  arguments hidden, head, tied and chunk.
  """
  tok = per_token_chunked(hidden, head, batch["targets"], tied=tied, chunk=chunk)
  return _objective_from_tokens(tok, batch, task_weights, entropy_coefs, z_loss=z_loss,
                                normalizer=normalizer)
