"""THE train step: one pure function, jitted once here with explicit shardings and donated state.

step(state, batch, task_weights[T], entropy_coefs[T]) -> (state, metrics)

Everything that may change between steps (task weights, entropy coefficients, their schedules)
is an array argument, so it never recompiles. The pieces, each a named function the RL update
uses too: `Gradients` (the objective and its gradients w.r.t. the trained parameters: the adapters
only on a frozen base), `apply_update` (the optimizer update with the non-finite guard: a
non-finite objective, gradient norm, new parameter or new optimizer-state value keeps the old
state and is counted, with no extra host sync, so no non-finite number ever reaches a checkpoint),
and the adaptive weighting method's path (mtjax.train.weighting, chosen by what it needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from mtjax.config import WeightingConfig
from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.sharding import BATCH_AXES
from mtjax.train import losses
from mtjax.train import weighting as weighting_lib
from mtjax.train.state import TrainState, split_trainable, with_frozen_zeros
from mtjax.train.weighting import Need


@dataclasses.dataclass(frozen=True)
class Gradients:
  """The multi-task objective of a batch and its gradients w.r.t. the trained parameters (the
  adapters with `lora`: the frozen base gets zeros).

  Gradient accumulation scans over microbatches, normalizing every microbatch by the FULL batch's
  per-task token counts: the objective is then linear in the microbatches and the summed
  gradients equal those of one big batch.
  """

  graphdef: Any
  num_tasks: int
  grad_accum: int = 1
  z_loss: float = 0.0
  loss_chunk: int = 1024  # 0: the dense [B, L, V] logits at once
  lora: bool = False  # a frozen base: only the Trained adapter variables get gradients

  def objective(self, params: Any, batch: Mapping[str, jax.Array], task_weights: jax.Array,
                entropy_coefs: jax.Array, normalizer: jax.Array,
                dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(objective, per_task) of a batch: the model's forward and the multi-task loss."""
    model = nnx.merge(self.graphdef, params)
    hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"],
                            adapter_ids=batch["task_ids"], dropout_key=dropout_key)
    if not self.loss_chunk:  # dense: the whole [B, L, V] float32 logits at once
      return losses.multitask_objective(model.logits(hidden), batch, task_weights, entropy_coefs,
                                        z_loss=self.z_loss, normalizer=normalizer)
    head, tied = model.head()
    return losses.multitask_objective_chunked(
        hidden, head.astype(hidden.dtype), batch, task_weights, entropy_coefs, tied=tied,
        z_loss=self.z_loss, normalizer=normalizer, chunk=self.loss_chunk)

  def value_and_grad(self, params: Any, *args: Any) -> tuple[Any, Any]:
    """((objective, per_task), grads) of `objective(params, *args)`; grads a full params tree."""
    return value_and_grad_trainable(self.objective, self.graphdef, self.lora)(params, *args)

  def __call__(self, params: Any, batch: Mapping[str, jax.Array], task_weights: jax.Array,
               entropy_coefs: jax.Array,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any], Any]:
    """(objective, per_task, grads). dropout_key: the model's dropout (LoRA's); None: none."""
    counts = losses.token_counts(batch, self.num_tasks)
    if self.grad_accum == 1:
      (objective, per_task), grads = self.value_and_grad(params, batch, task_weights,
                                                         entropy_coefs, counts, dropout_key)
      return objective, per_task, grads
    accum = self.grad_accum

    def split(x):  # strided, so every microbatch stays evenly spread over the batch shards
      return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      micro, index = xs
      micro = {k: sharding_lib.constrain(v, BATCH_AXES) for k, v in micro.items()}
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
      (obj, per_task), grads = self.value_and_grad(params, micro, task_weights, entropy_coefs,
                                                   counts, key)
      return jax.tree.map(jnp.add, carry, (obj, per_task, grads)), None

    zeros = (jnp.zeros((), jnp.float32),
             {k: jnp.zeros_like(counts) for k in ("loss", "entropy", "accuracy", "tokens")},
             jax.tree.map(jnp.zeros_like, params))
    (objective, per_task, grads), _ = jax.lax.scan(
        body, zeros, (jax.tree.map(split, dict(batch)), jnp.arange(accum)))
    return objective, per_task, grads

  def terms_vjp(self, params: Any, batch: Mapping[str, jax.Array],
                dropout_key: jax.Array | None = None) -> tuple[dict[str, Any], Callable]:
    """One forward pass: (per_task, pullback), pullback(loss_cot [T], entropy_cot [T], z_cot [])
    -> the gradient of sum_t loss_cot_t L_t + sum_t entropy_cot_t H_t + z_cot * z-loss w.r.t.
    the trained parameters (the adapters with LoRA; `with_frozen` completes the tree). The
    weighting methods that need this batch's losses (or per-task gradients) before the backward
    pass use it; the objective is linear in the cotangents, so per-task gradients are the
    pullback applied to one-hot rows (in a lax.map)."""
    zeros = jnp.zeros((self.num_tasks,), jnp.float32)
    counts = losses.token_counts(batch, self.num_tasks)

    def terms(trained_params, frozen):
      full = traverse_util.unflatten_dict(
          {**frozen, **traverse_util.flatten_dict(trained_params, sep="/")}, sep="/") \
          if self.lora else trained_params
      z_term, per_task = self.objective(full, batch, zeros, zeros, counts, dropout_key)
      return (per_task["loss"], per_task["entropy"], z_term), per_task

    if self.lora:
      adapters, frozen = split_trainable(self.graphdef, params)
      trained_params = traverse_util.unflatten_dict(adapters, sep="/")
    else:
      trained_params, frozen = params, {}
    _, pullback, per_task = jax.vjp(lambda t: terms(t, jax.lax.stop_gradient(frozen)),
                                    trained_params, has_aux=True)
    return per_task, lambda *cot: pullback(cot)[0]

  def with_frozen(self, grads: Any, params: Any) -> Any:
    """Trained-part gradients -> a full params tree (zeros for the frozen base with LoRA)."""
    return with_frozen_zeros(grads, split_trainable(self.graphdef, params)[1]) if self.lora else grads


def value_and_grad_trainable(fn: Callable, graphdef: Any, lora: bool) -> Callable:
  """jax.value_and_grad(fn, has_aux=True) w.r.t. the trained parameters only: with `lora` (a
  frozen base), the Trained adapter variables (by the types `graphdef` records); the base is held
  constant and gets zero gradients. The gradients come back as a full params tree either way."""
  value_and_grad = jax.value_and_grad(fn, has_aux=True)
  if not lora:
    return value_and_grad

  def adapters_fn(adapters, frozen, *args):
    return fn(traverse_util.unflatten_dict({**frozen, **adapters}, sep="/"), *args)
  adapters_value_and_grad = jax.value_and_grad(adapters_fn, has_aux=True)

  def value_and_grad_adapters(params, *args):
    adapters, frozen = split_trainable(graphdef, params)
    value, grads = adapters_value_and_grad(adapters, jax.lax.stop_gradient(frozen), *args)
    return value, with_frozen_zeros(grads, frozen)
  return value_and_grad_adapters


def make_grad_fn(graphdef: Any, *, num_tasks: int, grad_accum: int = 1,
                 z_loss: float = 0.0, loss_chunk: int = 1024, lora: bool = False) -> Gradients:
  """(params, batch, task_weights, entropy_coefs) -> (objective, per_task, grads): see Gradients."""
  return Gradients(graphdef, num_tasks=num_tasks, grad_accum=grad_accum, z_loss=z_loss,
                   loss_chunk=loss_chunk, lora=lora)


def all_finite(tree: Any) -> jax.Array:
  """A scalar bool: every floating-point leaf of `tree` is finite (True for a tree without any)."""
  ok = jnp.array(True)
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      ok = ok & jnp.isfinite(leaf).all()
  return ok


def apply_update(state: TrainState, grads: Any, tx: optax.GradientTransformation, *,
                 also_finite: Sequence[Any] = ()) -> tuple[TrainState, jax.Array, jax.Array]:
  """The optimizer update of `state` by `grads` (clipping and frozen groups are in `tx`), kept
  only if the gradient norm, the new params, the new optimizer state and every tree of
  `also_finite` (the objective, a method's new state) are finite; else the old params and
  optimizer state stay and the skip counters count it (an update can overflow even from finite
  gradients, e.g. with a huge learning rate). The step counter is the caller's.
  -> (state, ok, grad_norm)."""
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  # A non-finite update makes its parameter non-finite: checking the new params covers it.
  ok = jnp.isfinite(grad_norm) & all_finite(new_params) & all_finite(new_opt_state)
  for tree in also_finite:
    ok = ok & all_finite(tree)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  return dataclasses.replace(
      state, params=keep(new_params, state.params), opt_state=keep(new_opt_state, state.opt_state),
      skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
      consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1)), ok, grad_norm


def make_step_fn(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                 num_tasks: int, grad_accum: int = 1, z_loss: float = 0.0,
                 loss_chunk: int = 1024, lora: bool = False,
                 dropout_seed: int | None = None, weighting: WeightingConfig | None = None,
                 seed: int = 0) -> Callable:
  """The pure step: gradients (by the weighting method's path), then `apply_update`.

  dropout_seed: the model has dropout (LoRA's); a step's key is this seed's folded with the step
  number. lora: gradients and updates for the LoRA adapters only (see Gradients).
  weighting: the adaptive task weighting (mtjax.train.weighting; None or static: the task weights
  as given); its state is TrainState.extra["weighting"]; seed: random per-step keys (PCGrad's
  task orders)."""
  gradients = make_grad_fn(graphdef, num_tasks=num_tasks, grad_accum=grad_accum, z_loss=z_loss,
                           loss_chunk=loss_chunk, lora=lora)
  method = weighting_lib.get(weighting if weighting is not None else WeightingConfig())
  method.check(grad_accum)
  weighted = one_pass_weighted(gradients, method) if method.need is Need.NOTHING else \
      vjp_weighted(gradients, method, num_tasks, seed)

  def step(state: TrainState, batch: Mapping[str, jax.Array], task_weights: jax.Array,
           entropy_coefs: jax.Array) -> tuple[TrainState, dict[str, Any]]:
    dropout_key = None if dropout_seed is None else jax.random.fold_in(
        jax.random.key(dropout_seed), state.step)
    wstate = state.extra.get("weighting", {})
    objective, per_task, grads, weights, new_wstate = weighted(
        state.params, batch, task_weights, entropy_coefs, wstate, state.step, dropout_key)
    updated, ok, grad_norm = apply_update(state, grads, tx, also_finite=(objective, new_wstate))
    extra = dict(state.extra)
    if wstate:
      extra["weighting"] = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_wstate, wstate)
    new_state = dataclasses.replace(updated, step=state.step + 1, extra=extra)
    metrics = {
        "objective": objective, "per_task": per_task, "grad_norm": grad_norm,
        "lr": schedule(state.step - state.skipped_steps),
        "skipped_steps": new_state.skipped_steps,
        "consecutive_skips": new_state.consecutive_skips,
        "task_weights": weights,  # as applied (static x adaptive): train/<task>/weight
    }
    return new_state, metrics

  return step


def one_pass_weighted(gradients: Gradients, method: weighting_lib.Method) -> Callable:
  """Need.NOTHING: the method's weights (from its state) times the static ones, one forward and
  backward pass; then the method records the batch's losses.
  -> (objective, per_task, grads, the weights applied, the method's new state)."""

  def fn(params, batch, task_weights, entropy_coefs, wstate, step, dropout_key):
    del step
    adaptive = method.weights(wstate)
    weights = task_weights if adaptive is None else task_weights * adaptive
    objective, per_task, grads = gradients(params, batch, weights, entropy_coefs, dropout_key)
    stats = weighting_lib.Stats(losses=per_task["loss"], task_weights=task_weights,
                                present=per_task["tokens"] > 0)
    decision, new_wstate = method.update(wstate, stats)
    if decision.objective is not None:  # the method's own term (reported, not differentiated)
      objective = objective + decision.objective
    return objective, per_task, grads, weights, new_wstate

  return fn


def vjp_weighted(gradients: Gradients, method: weighting_lib.Method, num_tasks: int,
                 seed: int) -> Callable:
  """Need.LOSSES (FAMO) and Need.GRADIENTS (PCGrad, MGDA, DB-MTL): one forward pass, then the
  pullback with the method's cotangents (LOSSES) or once per task (GRADIENTS).
  -> (objective, per_task, grads, the weights or coefficients applied, the method's new state)."""
  eye = jnp.eye(num_tasks, dtype=jnp.float32)
  zeros = jnp.zeros((num_tasks,), jnp.float32)

  def fn(params, batch, task_weights, entropy_coefs, wstate, step, dropout_key):
    per_task, pullback = gradients.terms_vjp(params, batch, dropout_key)
    task_losses = jax.lax.stop_gradient(per_task["loss"])
    # A task with weight 0 takes no part (MGDA's hull would otherwise hold its zero gradient).
    present = (per_task["tokens"] > 0) & (task_weights > 0)
    entropy_term = jnp.sum(entropy_coefs * per_task["entropy"])
    if method.need is Need.LOSSES:
      decision, new_wstate = method.update(
          wstate, weighting_lib.Stats(losses=task_losses, task_weights=task_weights,
                                      present=present))
      grads = pullback(decision.weights, -entropy_coefs, jnp.float32(1.0))
      assert decision.objective is not None
      objective = decision.objective - entropy_term
      return (objective, per_task, gradients.with_frozen(grads, params), decision.weights,
              new_wstate)
    # Per-task gradients of w_t L_t (rows) and the regularizers' gradient, the pullback per row.
    cot_losses = jnp.concatenate([eye * task_weights[:, None], zeros[None]])
    cot_entropy = jnp.concatenate([jnp.zeros((num_tasks, num_tasks)), -entropy_coefs[None]])
    cot_z = jnp.concatenate([zeros, jnp.ones((1,), jnp.float32)])
    # lax.map, not vmap: vmapping this pullback gave wrong per-task gradients (their sum off the
    # full gradient by ~50% on the tiny model, one device; tests/test_weighting.py checks it).
    both = jax.lax.map(lambda cot: pullback(*cot), (cot_losses, cot_entropy, cot_z))
    rows = jax.tree.map(lambda g: g[:num_tasks], both)
    regularizers = jax.tree.map(lambda g: g[num_tasks], both)
    decision, new_wstate = method.update(wstate, weighting_lib.Stats(
        losses=task_losses, task_weights=task_weights, present=present, rows=rows,
        key=jax.random.fold_in(jax.random.key(seed), step)))
    grads = jax.tree.map(jnp.add, decision.update, regularizers)
    plain = jnp.sum(task_weights * task_losses) - entropy_term
    return plain, per_task, gradients.with_frozen(grads, params), decision.weights, new_wstate

  return fn


def jit_step(step_fn: Callable, mesh: jax.sharding.Mesh, shardings: TrainState) -> Callable:
  """THE one place the step is jitted: explicit in/out shardings, state donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sh = sharding_lib.named(mesh, BATCH_AXES)
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh, replicated, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
