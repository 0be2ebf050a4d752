"""THE RL update: `epochs` PPO-clip optimizer updates on one sampled rollout, inside one jit.

update(state, rollout, ref_params) -> (state, metrics)

The rollout is a dict of fixed-shape arrays (N = B * n sequences, L = L_max), the same shape for
every rollout of a run, so the update compiles once:

  tokens [N, L] int           prompt then completion: the prompt LEFT-padded to its bucket P (as
                              eval/decode.py samples), the completion after it, the tail after
                              the completion's end filled (any token; segment 0)
  positions [N, L] int        prompt: cumsum of its valid tokens - 1; completion: continuing
  segment_ids [N, L] int      1 on the prompt's and the completion's real tokens, 0 on padding
  completion_mask [N, L]      per TARGET position j (the token tokens[j + 1] the model predicts
                              at j): 1 where tokens[j + 1] is a completion token (the stop token
                              included), else 0
  old_logp [N, L] float       per target position: the sampling policy's log-probability of
                              tokens[j + 1] (0 off the mask)
  advantages [N] float        one per sequence (objectives.group_advantages / darling_...)
  task_ids [N] int            the sequence's task (-1: a filler row, which must have an all-zero
                              completion_mask)

`rollout_from_samples` builds it from the sampler's arrays (decode.make_generate_fn's outputs).
Targets are next tokens (targets[j] = tokens[j + 1], the last position predicts nothing), as in
the supervised batches (inputs/targets/loss_mask), so the model's output at j scores target j.

Each epoch: the current per-token log-probs and entropy from one forward pass (the chunked head
of losses.py with loss_chunk > 0), the loss

  loss = -clipped_objective(logp, old_logp, A, mask, clip_eps) + kl_coef * kl_k3(logp, ref_logp)

(token-level means over all completion tokens of the rollout; see objectives.py), its gradient,
the optimizer update and step.py's non-finite guard (a non-finite loss, gradient norm, new
parameter or optimizer state skips that epoch's update and counts it). The reference model's
log-probs are computed once per rollout from ref_params (no gradient). With `lora`, gradients
are taken w.r.t. the LoRA adapters only (the frozen base's are zeros), as in step.py.

Counting: state.step advances by 1 per call (one rollout, one RL step); skipped_steps and
consecutive_skips count skipped optimizer updates (epochs), so the optimizer's own update count
is state.step * epochs - skipped_steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.sharding import BATCH_AXES
from mtjax.rl import objectives
from mtjax.train import losses
from mtjax.train import step as step_lib
from mtjax.train.state import TrainState

ROLLOUT_KEYS = ("tokens", "positions", "segment_ids", "completion_mask", "old_logp",
                "advantages", "task_ids")
ROW_KEYS = ("advantages", "task_ids")  # [N]; the others are [N, L]


def targets_of(tokens: jax.Array) -> jax.Array:
  """Next tokens: targets[:, j] = tokens[:, j + 1]; the last position's target is 0 (masked)."""
  return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def make_token_stats_fn(graphdef: Any, *, loss_chunk: int = 1024) -> Callable:
  """(params, rollout) -> (logp [N, L], entropy [N, L]) float32 per target position: the
  model's log-probability of the next token and its predictive entropy (temperature 1)."""

  def token_stats(params, rollout):
    model = nnx.merge(graphdef, params)
    tokens = rollout["tokens"]
    adapter_ids = jnp.broadcast_to(rollout["task_ids"][:, None], tokens.shape)
    hidden = model.features(tokens, rollout["positions"], rollout["segment_ids"],
                            adapter_ids=adapter_ids)
    targets = targets_of(tokens)
    if loss_chunk:
      head, tied = model.head()
      tok = losses.per_token_chunked(hidden, head.astype(hidden.dtype), targets, tied=tied,
                                     chunk=loss_chunk)
    else:
      tok = losses.per_token(model.logits(hidden), targets)
    return -tok["ce"], tok["entropy"]

  return token_stats


def per_task_means(values: jax.Array, weights: jax.Array, task_ids: jax.Array,
                   num_tasks: int) -> tuple[jax.Array, jax.Array]:
  """(sum of values * weights per task / their weight, the weight per task), [T] each. values,
  weights [N, ...] with task_ids [N] (outside [0, T): dropped); a task without weight gets 0."""
  seg = jnp.where((task_ids >= 0) & (task_ids < num_tasks), task_ids, num_tasks)
  w = weights.astype(jnp.float32).reshape(weights.shape[0], -1)
  v = values.astype(jnp.float32).reshape(values.shape[0], -1)
  sums = jax.ops.segment_sum(jnp.sum(v * w, axis=1), seg, num_segments=num_tasks + 1)
  counts = jax.ops.segment_sum(jnp.sum(w, axis=1), seg, num_segments=num_tasks + 1)
  return sums[:num_tasks] / jnp.maximum(counts[:num_tasks], 1.0), counts[:num_tasks]


def make_rl_loss_fn(graphdef: Any, *, clip_eps: float, kl_coef: float,
                    loss_chunk: int = 1024) -> Callable:
  """(params, rollout, old_logp, ref_logp) -> (loss, aux): the loss one epoch minimizes and
  aux {"surrogate", "clip_fraction", "kl", "logp", "entropy"} (the last two [N, L])."""
  token_stats = make_token_stats_fn(graphdef, loss_chunk=loss_chunk)

  def loss_fn(params, rollout, old_logp, ref_logp):
    logp, entropy = token_stats(params, rollout)
    mask = rollout["completion_mask"]
    surrogate, clip_fraction = objectives.clipped_objective(
        logp, old_logp, rollout["advantages"], mask, clip_eps)
    kl = objectives.kl_k3(logp, ref_logp, mask)
    loss = -surrogate + kl_coef * kl
    aux = {"surrogate": surrogate, "clip_fraction": clip_fraction, "kl": kl,
           "logp": logp, "entropy": jax.lax.stop_gradient(entropy)}
    return loss, aux

  return loss_fn


def make_rl_update_fn(graphdef: Any, tx: optax.GradientTransformation, *, epochs: int,
                      clip_eps: float, kl_coef: float, num_tasks: int, lora: bool = False,
                      loss_chunk: int = 1024, recompute_old_logp: bool = False,
                      return_logp: bool = False) -> Callable:
  """The pure RL update (see the module docstring); jit it with jit_rl_update.

  recompute_old_logp: ignore rollout["old_logp"] and use the current parameters' log-probs
  before the first epoch instead (the sampling policy IS the current one, re-scored by the
  training forward pass: the ratio starts at exactly 1 whatever the sampler's numerics).
  return_logp: metrics["logp"] holds each epoch's per-token log-probs [epochs, N, L] and
  metrics["old_logp"], metrics["ref_logp"] those used (for tests and debugging).

  Metrics (scalars: means over the epochs unless said): loss, surrogate, clip_fraction, kl,
  grad_norm; per_epoch: each of those [epochs]; old_logp_gap: the masked mean |logp - old_logp|
  at the first epoch (0 on policy: the sampler's and the trainer's numerics agree); per_task:
  entropy [T] (completion tokens' mean predictive entropy at the first epoch, i.e. of the
  sampling policy), advantage [T] (mean over the task's sequences), tokens [T] (completion
  tokens), sequences [T]; skipped_steps, consecutive_skips (after the call)."""
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  loss_fn = make_rl_loss_fn(graphdef, clip_eps=clip_eps, kl_coef=kl_coef, loss_chunk=loss_chunk)
  token_stats = make_token_stats_fn(graphdef, loss_chunk=loss_chunk)

  value_and_grad = step_lib.value_and_grad_trainable(loss_fn, graphdef, lora)

  def update(state: TrainState, rollout: Mapping[str, jax.Array],
             ref_params: Any) -> tuple[TrainState, dict[str, Any]]:
    rollout = dict(rollout)
    rollout["completion_mask"] = rollout["completion_mask"].astype(jnp.float32)
    rollout["advantages"] = rollout["advantages"].astype(jnp.float32)
    mask = rollout["completion_mask"]
    ref_logp = jax.lax.stop_gradient(token_stats(ref_params, rollout)[0])
    if recompute_old_logp:
      old_logp = jax.lax.stop_gradient(token_stats(state.params, rollout)[0])
    else:
      old_logp = rollout["old_logp"].astype(jnp.float32)

    def epoch(carry, _):
      (loss, aux), grads = value_and_grad(carry.params, rollout, old_logp, ref_logp)
      carry, _, grad_norm = step_lib.apply_update(carry, grads, tx, also_finite=(loss,))
      out = {"loss": loss, "surrogate": aux["surrogate"], "clip_fraction": aux["clip_fraction"],
             "kl": aux["kl"], "grad_norm": grad_norm, "logp": aux["logp"],
             "entropy": aux["entropy"]}
      return carry, out

    updated, per_epoch = jax.lax.scan(epoch, state, None, length=epochs)

    task_ids = rollout["task_ids"]
    entropy, tokens = per_task_means(per_epoch["entropy"][0], mask, task_ids, num_tasks)
    rows = (task_ids >= 0).astype(jnp.float32)
    advantage, sequences = per_task_means(rollout["advantages"], rows, task_ids, num_tasks)
    scalars = ("loss", "surrogate", "clip_fraction", "kl", "grad_norm")
    metrics: dict[str, Any] = {k: jnp.mean(per_epoch[k]) for k in scalars}
    metrics["per_epoch"] = {k: per_epoch[k] for k in scalars}
    metrics["old_logp_gap"] = objectives.masked_mean(jnp.abs(per_epoch["logp"][0] - old_logp),
                                                     mask)
    metrics["per_task"] = {"entropy": entropy, "advantage": advantage, "tokens": tokens,
                           "sequences": sequences}
    metrics["skipped_steps"] = updated.skipped_steps
    metrics["consecutive_skips"] = updated.consecutive_skips
    if return_logp:
      metrics.update(logp=per_epoch["logp"], old_logp=old_logp, ref_logp=ref_logp)
    return dataclasses.replace(updated, step=state.step + 1), metrics

  return update


def rollout_shardings(mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  """Rows over the data-parallel axes: [N, L] arrays as supervised batches, [N] ones alike."""
  rows_sh = sharding_lib.named(mesh, BATCH_AXES)
  row_sh = sharding_lib.named(mesh, BATCH_AXES[:1])
  return {k: row_sh if k in ROW_KEYS else rows_sh for k in ROLLOUT_KEYS}


def jit_rl_update(update_fn: Callable, mesh: jax.sharding.Mesh,
                  shardings: TrainState) -> Callable:
  """THE one place the RL update is jitted: explicit in/out shardings, the state donated. The
  rollout must hold exactly ROLLOUT_KEYS; the reference params are sharded like the params."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(update_fn, in_shardings=(shardings, rollout_shardings(mesh), shardings.params),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def rollout_from_samples(prompt_tokens: np.ndarray, prompt_valid: np.ndarray,
                         new_tokens: np.ndarray, new_logp: np.ndarray, lengths: np.ndarray,
                         budgets: np.ndarray, advantages: np.ndarray,
                         task_ids: np.ndarray) -> dict[str, np.ndarray]:
  """The rollout arrays (host numpy) from what decode.make_generate_fn takes and returns: left-
  padded prompts tokens/valid [N, P], the new tokens and their log-probs [N, W], the lengths
  [N] (tokens before the stop token) and the budgets [N] the rows were given (capped at W).

  A row's completion is its first min(length + 1, budget) new tokens: the tokens before the
  stop and the stop token itself (its log-prob is the sampler's, and learning when to stop is
  part of the policy); a row that ran out of budget has no stop token. L = P + W."""
  prompt_tokens = np.asarray(prompt_tokens)
  n, p = prompt_tokens.shape
  w = np.asarray(new_tokens).shape[1]
  valid = np.asarray(prompt_valid).astype(bool)
  t = np.arange(w)[None, :]
  budgets = np.minimum(np.asarray(budgets), w)
  completion = (t <= np.asarray(lengths)[:, None]) & (t < budgets[:, None])
  tokens = np.concatenate([prompt_tokens, np.asarray(new_tokens)], axis=1).astype(np.int32)
  prompt_pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  positions = np.concatenate([prompt_pos, prompt_pos[:, -1:] + 1 + t], axis=1).astype(np.int32)
  segment_ids = np.concatenate([valid, completion], axis=1).astype(np.int32)
  # Target position j scores tokens[j + 1]: new token t is the target at P - 1 + t.
  mask = np.zeros((n, p + w), np.float32)
  mask[:, p - 1 : p - 1 + w] = completion
  old_logp = np.zeros((n, p + w), np.float32)
  old_logp[:, p - 1 : p - 1 + w] = np.where(completion, np.asarray(new_logp), 0.0)
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "completion_mask": mask, "old_logp": old_logp,
          "advantages": np.asarray(advantages, np.float32),
          "task_ids": np.asarray(task_ids, np.int32)}
