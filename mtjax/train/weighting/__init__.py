"""Adaptive per-task loss weighting inside the one compiled step (`train.weighting.method`).

Every method is an object with optax-style `init` / `update` and a declared `need`: what it must
know of this batch before the backward pass. The step (mtjax.train.step) chooses its path by it:

  Need.NOTHING    weights from the method's state alone (`weights(state)`): one forward and
                  backward pass as with static weights; `update` then records this batch's losses
                  (uncertainty, dwa, imtl_l).
  Need.LOSSES     this batch's per-task losses first: one forward pass and one jax.vjp whose
                  pullback takes the method's weights as cotangents (famo).
  Need.GRADIENTS  per-task gradients: the same pullback once per task, in a lax.map; memory grows
                  with the number of tasks (pcgrad, mgda, dbmtl: a research mode).

L_t is task t's mean loss in the step's batch (per-token task ids: a packed batch holds several
tasks), T the number of tasks, `present` the tasks with loss tokens in the batch. A task absent
from a batch contributes nothing and keeps its previous statistics. A method's state is a dict of
arrays in `TrainState.extra["weighting"]` (checkpointed with the rest: exact resume). Every method
balances the weighted losses w_t L_t (w_t: train.loss_weights; a task of weight 0 takes no part):
the adaptive weight multiplies w_t. The entropy and z-loss terms are regularizers: their gradient
is added unweighted to every method's update.

The methods are listed once, in mtjax.config.WEIGHTING_METHODS (name -> "module:Class", read by
the config's validation, the benchmark and the weighting study); a new method is one module here
and one line there. Each module's docstring gives its paper and rule.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any

import jax
import jax.numpy as jnp

from mtjax.config import WEIGHTING_METHODS, WeightingConfig
from mtjax.errors import BadInputError


class Need(enum.Enum):
  NOTHING = "nothing"
  LOSSES = "losses"
  GRADIENTS = "gradients"


@dataclasses.dataclass(frozen=True)
class Stats:
  """What `update` is given about the step's batch."""

  losses: jax.Array  # [T] per-task mean losses (not differentiated)
  task_weights: jax.Array  # [T] the static weights w_t (train.loss_weights, fed-back controls)
  present: jax.Array  # [T] bool: tasks with loss tokens (and, but for Need.NOTHING, w_t > 0)
  rows: Any = None  # Need.GRADIENTS: per-task gradients of w_t L_t, each leaf [T, ...]
  key: Any = None  # Need.GRADIENTS: this step's key (from the seed and the step)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What `update` decides for the step."""

  weights: jax.Array  # [T] as applied: the per-task weights (Need.NOTHING, LOSSES; static x
  # adaptive) or the coefficients on the task gradients (GRADIENTS); train/<task>/weight
  objective: jax.Array | None = None  # LOSSES: the method's objective (reported); NOTHING: a term
  # added to the reported objective (a regularizer of the method's own parameters)
  update: Any = None  # GRADIENTS: the combined gradient, a tree like `rows` without the task axis


class Method:
  """A weighting method (see the module docstring). The defaults are static weighting's."""

  need: Need = Need.NOTHING

  def __init__(self, cfg: WeightingConfig):
    self.cfg = cfg

  def check(self, grad_accum: int) -> None:
    """Raises BadInputError for settings the method cannot run with."""
    if self.need is not Need.NOTHING and grad_accum != 1:
      raise BadInputError("train.weighting.method", f"{self.cfg.method} needs the whole batch's "
                          "per-task losses before the backward pass: expected "
                          f"optimizer.grad_accum=1, got {grad_accum}")

  def init(self, num_tasks: int, params: Any = None) -> dict[str, Any]:
    """The initial state ({} for none). params: the trained parameters (abstract or real)."""
    del num_tasks, params
    return {}

  def weights(self, state: dict[str, Any]) -> jax.Array | None:
    """Need.NOTHING: the multipliers of the static weights for this step's pass (None: 1)."""
    del state
    return None

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    del stats
    raise NotImplementedError(f"{type(self).__name__}.update")


def get(cfg: WeightingConfig) -> Method:
  """The method of `cfg` from its registration (mtjax.config.WEIGHTING_METHODS)."""
  where = WEIGHTING_METHODS.get(cfg.method)
  if where is None:
    raise BadInputError("train.weighting.method", f"expected one of "
                        f"{', '.join(WEIGHTING_METHODS)}, got {cfg.method!r}")
  module, _, name = where.partition(":")
  return getattr(importlib.import_module(module), name)(cfg)


def names(need: Need | None = None) -> tuple[str, ...]:
  """The registered methods (those with this need), in registration order."""
  return tuple(n for n in WEIGHTING_METHODS
               if need is None or get(WeightingConfig(method=n)).need is need)


# ---------------------------------------------------------------- helpers the methods share

EPS = 1e-8


def keep_absent(present: jax.Array, new: Any, old: Any) -> Any:
  """new where the task is present, old where absent, on every leaf with a leading task axis."""
  t = present.shape[0]

  def one(a, b):
    if a.ndim and a.shape[0] == t:
      return jnp.where(present.reshape((t,) + (1,) * (a.ndim - 1)), a, b)
    return a
  return jax.tree.map(one, new, old)


def gram(grads: Any) -> jax.Array:
  """[T, T] inner products of per-task gradients (each leaf [T, ...]), in float32."""
  def one(g):
    g = g.reshape(g.shape[0], -1).astype(jnp.float32)
    return g @ g.T
  leaves = jax.tree.leaves(grads)
  total = one(leaves[0])
  for g in leaves[1:]:
    total = total + one(g)
  return total


def combine(grads: Any, coefs: jax.Array) -> Any:
  """sum_t coefs_t g_t over the leading task axis of every leaf."""
  return jax.tree.map(lambda g: jnp.tensordot(coefs.astype(jnp.float32), g.astype(jnp.float32),
                                              axes=1).astype(g.dtype), grads)
