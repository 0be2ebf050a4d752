"""THE RL step of a run: the loop's step signature around update.py's GRPO update.

step(state, rollout, task_weights[T], entropy_coefs[T]) -> (state, metrics), jitted once with
explicit shardings and the state donated, like the supervised step. train.loss_weights (and a
hook's fed-back weights) scale each task's advantages; GRPO has no entropy term (the config
refuses train.entropy_coefs with rl.algorithm=grpo), the coefficients are ignored. The
reference model of the KL term is the starting model: a copy kept in TrainState.extra
["reference"] (checkpointed: a resumed run keeps its reference), or with LoRA the frozen base
itself (every adapter at its neutral values: no copy).

Metrics follow the supervised step's where they mean the same (objective: the loss minimized,
grad_norm, lr, skipped_steps, consecutive_skips) and per_task holds entropy (the sampling
policy's, per completion token), accuracy (the mean verifier reward of the task's samples) and
tokens (completion tokens); rl/clip_fraction, rl/kl, rl/surrogate and rl/old_logp_gap are
logged as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mtjax.config import Config
from mtjax.model import adapters as adapters_lib
from mtjax.rl import update as update_lib
from mtjax.train.state import TrainState


def reference_of(graphdef: Any, params: Any, extra: Mapping[str, Any], lora: bool) -> Any:
  """The KL term's reference model: the stored copy, or on a frozen base the base itself (every
  adapter at its neutral values: LoRA's B zero)."""
  if not lora:
    return extra["reference"]
  return adapters_lib.neutral(nnx.merge(graphdef, params), params)


def make_rl_step_fn(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: Config, *, lora: bool) -> Callable:
  r, num_tasks = config.rl, config.num_tasks
  update = update_lib.make_rl_update_fn(graphdef, tx, epochs=r.epochs, clip_eps=r.clip_eps,
                                        kl_coef=r.kl_coef, num_tasks=num_tasks, lora=lora,
                                        loss_chunk=config.train.loss_chunk)

  def step(state: TrainState, rollout: Mapping[str, jax.Array], task_weights: jax.Array,
           entropy_coefs: jax.Array) -> tuple[TrainState, dict[str, Any]]:
    del entropy_coefs
    ids = rollout["task_ids"]
    scale = jnp.where(ids >= 0, task_weights[jnp.clip(ids, 0, num_tasks - 1)], 0.0)
    arrays = {k: rollout[k] for k in update_lib.ROLLOUT_KEYS}
    arrays["advantages"] = rollout["advantages"] * scale
    ref = jax.lax.stop_gradient(reference_of(graphdef, state.params, state.extra, lora))
    updates_before = state.step * r.epochs - state.skipped_steps
    new_state, m = update(state, arrays, ref)
    rows = (ids >= 0).astype(jnp.float32)
    reward, _ = update_lib.per_task_means(rollout["rewards"], rows, ids, num_tasks)
    metrics = {
        "objective": m["loss"], "grad_norm": m["grad_norm"], "lr": schedule(updates_before),
        "skipped_steps": m["skipped_steps"], "consecutive_skips": m["consecutive_skips"],
        "per_task": {"entropy": m["per_task"]["entropy"], "accuracy": reward,
                     "tokens": m["per_task"]["tokens"]},
        "task_weights": task_weights,
        "rl/clip_fraction": m["clip_fraction"], "rl/kl": m["kl"],
        "rl/surrogate": m["surrogate"], "rl/old_logp_gap": m["old_logp_gap"],
    }
    return new_state, metrics

  return step


def jit_rl_step(step_fn: Callable, mesh: jax.sharding.Mesh, shardings: TrainState) -> Callable:
  """The RL step jitted once: explicit in/out shardings, the state donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rollout_sh = dict(update_lib.rollout_shardings(mesh))
  rollout_sh["rewards"] = rollout_sh["advantages"]
  return jax.jit(step_fn, in_shardings=(shardings, rollout_sh, replicated, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
