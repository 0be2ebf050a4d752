"""Adaptive per-task loss weighting inside the one compiled step (`train.weighting.method`).

L_t is task t's mean loss in the step's batch (per-token task ids: a packed batch holds several
tasks), T the number of tasks, `present` the tasks with loss tokens in the batch. A task absent
from a batch contributes nothing and keeps its previous statistics. Each method's state is a dict
of arrays in `TrainState.extra["weighting"]` (checkpointed with the rest: exact resume). Every
method balances the weighted losses w_t L_t (w_t: train.loss_weights; a task of weight 0 takes no
part): the adaptive weight multiplies w_t, and the rules that are invariant to a task's scale
(FAMO and DB-MTL work on log losses, uncertainty learns a scale) mostly undo a static w_t.

Loss-based (O(T) extra work):
  uncertainty  Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh
               Losses": learnable log-variances s_t (init 0), objective sum_t (exp(-s_t) w_t L_t
               + s_t) / 2; s takes its own Adam step (train.weighting.lr) from d/ds_t =
               (1 - exp(-s_t) w_t L_t) / 2 after the model's.
  dwa          Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with Attention" (Dynamic
               Weight Average): r_t = Lbar_t(k-1) / Lbar_t(k-2) over EMAs Lbar of each task's loss
               (decay train.weighting.ema; the paper averages over epochs, which packed streams do
               not have), weights T softmax(r / tau)_t; 1 until a task has two EMA updates.
  famo         Liu, Liu, Zhang & Stone 2023, "FAMO: Fast Adaptive Multitask Optimization": logits
               xi (init 0), z = softmax(xi), objective sum_t c z_t log(L_t - m_t), c = 1 / sum_t
               (z_t / (L_t - m_t)) held constant; xi takes an Adam step (lr 0.025, L2 weight decay
               0.001 as in the paper's code) with gradient J_z^T d, d_t = log(L_t(now) - m_t) -
               log(L_t(next) - m_t). The paper evaluates L(next) with a second forward pass on the
               same batch after the update; here L(next) is the NEXT step's losses (one step late,
               no extra forward), so step k first updates xi from (L(k-1), L(k)), then weights
               with softmax(xi) and L(k). d_t = 0 where task t is absent in either step.
Gradient-based (a research mode: per-task gradients from one forward pass and one jax.vjp whose
pullback runs once per one-hot cotangent on the per-task losses, in a lax.map; memory grows with T):
  pcgrad       Yu et al. 2020, "Gradient Surgery for Multi-Task Learning": for each task, in a
               random order (a key from the seed and the step), project its gradient off every
               other task's original gradient it conflicts with (negative dot product); sum.
               Done on the [T, T] Gram matrix: each projected gradient is a combination of the
               originals, so the result is sum_t coef_t g_t with coefficients from the Gram matrix.
  mgda         Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization": the
               min-norm point sum_t alpha_t g_t of the convex hull of the task gradients (closed
               form for two tasks, Frank-Wolfe on the Gram matrix for more, as their MinNormSolver);
               the update is along it (alpha sums to 1).
  dbmtl        Lin et al. 2023, "Dual-Balancing Multi-Task Learning": gradients of log L_t, an EMA
               ghat_t of each (beta_k = ema / k ** beta_sigma at the task's k-th update, as in
               LibMTL's DB_MTL), update sum_t (max_s |ghat_s| / |ghat_t|) ghat_t over present tasks.
The entropy and z-loss terms are regularizers: their gradient is added unweighted to every
method's update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtjax.config import WeightingConfig

LOSS_BASED = ("uncertainty", "dwa", "famo")
GRADIENT_BASED = ("pcgrad", "mgda", "dbmtl")
# Methods whose weights depend on this batch's losses: the backward pass waits for them (vjp path).
NEEDS_LOSSES_FIRST = ("famo",) + GRADIENT_BASED
_EPS = 1e-8


def param_optimizer(w: WeightingConfig) -> optax.GradientTransformation:
  """The weighting parameters' own optimizer (uncertainty's s, FAMO's logits)."""
  if w.method == "famo":  # torch.optim.Adam(weight_decay=...) adds the L2 term to the gradient
    return optax.chain(optax.add_decayed_weights(w.weight_decay), optax.adam(w.lr))
  return optax.adam(w.lr)


def init_state(w: WeightingConfig, num_tasks: int, params: Any = None) -> dict[str, Any]:
  """The method's initial state ({} for methods without one). params: the model's (abstract or
  real) parameters, for DB-MTL's per-task gradient EMAs."""
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  if w.method == "uncertainty":
    return {"log_var": zeros, "opt": param_optimizer(w).init(zeros)}
  if w.method == "dwa":
    return {"ema": zeros, "ema_prev": zeros, "count": jnp.zeros((num_tasks,), jnp.int32)}
  if w.method == "famo":
    return {"logits": zeros, "opt": param_optimizer(w).init(zeros), "prev_log_loss": zeros,
            "has_prev": jnp.zeros((num_tasks,), jnp.bool_)}
  if w.method == "dbmtl":
    return {"grads": jax.tree.map(lambda p: jnp.zeros((num_tasks, *p.shape), jnp.float32), params),
            "count": jnp.zeros((num_tasks,), jnp.int32)}
  return {}


def _keep_absent(present: jax.Array, new: Any, old: Any) -> Any:
  """new where the task is present, old where absent, on every leaf with a leading task axis."""
  t = present.shape[0]

  def one(a, b):
    if a.ndim and a.shape[0] == t:
      return jnp.where(present.reshape((t,) + (1,) * (a.ndim - 1)), a, b)
    return a
  return jax.tree.map(one, new, old)


# ------------------------------------------------------------------------- loss-based methods

def uncertainty_weights(state: dict[str, Any]) -> jax.Array:
  """d objective / d (w_t L_t) = exp(-s_t) / 2."""
  return jnp.exp(-state["log_var"]) / 2


def uncertainty_update(w: WeightingConfig, state: dict[str, Any], weighted_losses: jax.Array,
                       present: jax.Array) -> dict[str, Any]:
  """One Adam step on s from d/ds_t = (1 - exp(-s_t) w_t L_t) / 2 (absent tasks: unchanged)."""
  s = state["log_var"]
  grad = jnp.where(present, (1 - jnp.exp(-s) * weighted_losses) / 2, 0.0)
  updates, opt = param_optimizer(w).update(grad, state["opt"], s)
  new = {"log_var": optax.apply_updates(s, updates), "opt": opt}
  return _keep_absent(present, new, state)


def uncertainty_regularizer(state: dict[str, Any]) -> jax.Array:
  """The objective's sum_t s_t / 2 (constant for the model: reported, not differentiated)."""
  return jnp.sum(state["log_var"]) / 2


def dwa_weights(w: WeightingConfig, state: dict[str, Any]) -> jax.Array:
  t = state["ema"].shape[0]
  ratio = jnp.where(state["count"] >= 2, state["ema"] / jnp.maximum(state["ema_prev"], _EPS), 1.0)
  return t * jax.nn.softmax(ratio / w.temperature)


def dwa_update(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
               present: jax.Array) -> dict[str, Any]:
  ema = jnp.where(state["count"] == 0, losses, w.ema * state["ema"] + (1 - w.ema) * losses)
  new = {"ema": ema, "ema_prev": state["ema"], "count": state["count"] + 1}
  return _keep_absent(present, new, state)


def famo_update_logits(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
                       present: jax.Array) -> dict[str, Any]:
  """The logits' Adam step from the previous step's and this step's losses, then this step's
  log-losses recorded (absent tasks keep theirs)."""
  log_loss = jnp.log(jnp.maximum(losses - w.min_loss, _EPS))
  both = present & state["has_prev"]
  d = jnp.where(both, state["prev_log_loss"] - log_loss, 0.0)
  xi = state["logits"]
  _, pullback = jax.vjp(jax.nn.softmax, xi)
  (grad,) = pullback(d)  # J_z^T d
  updates, opt = param_optimizer(w).update(grad, state["opt"], xi)
  stepped = {"logits": optax.apply_updates(xi, updates), "opt": opt}
  # The first step with any earlier losses is the first update (the paper starts after step 1).
  stepped = jax.tree.map(lambda a, b: jnp.where(both.any(), a, b), stepped,
                         {"logits": xi, "opt": state["opt"]})
  return {**stepped, "prev_log_loss": jnp.where(present, log_loss, state["prev_log_loss"]),
          "has_prev": state["has_prev"] | present}


def famo_weights(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
                 present: jax.Array) -> jax.Array:
  """d/dL_t of sum_t c z_t log(L_t - m_t) with c held constant: c z_t / (L_t - m_t)."""
  z = jax.nn.softmax(state["logits"])
  gap = jnp.maximum(losses - w.min_loss, _EPS)
  ratio = jnp.where(present, z / gap, 0.0)
  c = 1.0 / jnp.maximum(jnp.sum(ratio), _EPS)
  return c * ratio


def famo_objective(w: WeightingConfig, state: dict[str, Any], losses: jax.Array,
                   present: jax.Array) -> jax.Array:
  z = jax.nn.softmax(state["logits"])
  gap = jnp.maximum(losses - w.min_loss, _EPS)
  c = 1.0 / jnp.maximum(jnp.sum(jnp.where(present, z / gap, 0.0)), _EPS)
  return jnp.sum(jnp.where(present, c * z * jnp.log(gap), 0.0))


# --------------------------------------------------------------------- gradient-based methods

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


def pcgrad_coefs(g: jax.Array, present: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad as coefficients on the original gradients: sum_i c_i where c_i starts at e_i and,
  for j in orders[i] (j != i, present), loses (c_i . g g_j) / |g_j|^2 e_j if c_i . g g_j < 0.
  g: the [T, T] Gram matrix; orders: [T, T] a permutation of the tasks per task."""
  t = g.shape[0]

  def one_task(i, order):
    def visit(c, j):
      dot = c @ g[:, j]
      conflict = (j != i) & present[j] & (dot < 0) & (g[j, j] > 0)
      return c - jnp.where(conflict, dot / jnp.maximum(g[j, j], _EPS), 0.0) * jax.nn.one_hot(j, t), None
    c, _ = jax.lax.scan(visit, jax.nn.one_hot(i, t), order)
    return jnp.where(present[i], c, 0.0)

  return jax.vmap(one_task)(jnp.arange(t), orders).sum(axis=0)


def pcgrad_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """[T, T]: a random permutation of the tasks for each task (LibMTL shuffles per task)."""
  return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(jax.random.split(key, num_tasks))


def _min_norm_2(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> jax.Array:
  """gamma minimizing |gamma x1 + (1 - gamma) x2|^2 from the inner products (MinNormSolver's
  _min_norm_element_from2, in closed form: 0.999/0.001 at the ends as theirs)."""
  interior = (v22 - v12) / jnp.maximum(v11 + v22 - 2 * v12, _EPS)
  return jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, interior))


def mgda_coefs(g: jax.Array, present: jax.Array, iters: int) -> jax.Array:
  """alpha on the simplex over present tasks minimizing |sum_t alpha_t g_t|^2 (g: the Gram matrix).
  Two tasks: the closed form; more: Frank-Wolfe from the uniform point, `iters` steps, each moving
  toward the task minimizing (G alpha)_t with the exact line search."""
  t = g.shape[0]
  n = jnp.maximum(present.sum(), 1)
  alpha = jnp.where(present, 1.0 / n, 0.0)

  def step(alpha, _):
    grad = g @ alpha
    j = jnp.argmin(jnp.where(present, grad, jnp.inf))
    v11, v12, v22 = alpha @ grad, grad[j], g[j, j]
    gamma = _min_norm_2(v11, v12, v22)
    return gamma * alpha + (1 - gamma) * jax.nn.one_hot(j, t), None

  if t == 2:  # the closed form between the two (one present: all on it)
    gamma = jnp.clip((g[1, 1] - g[0, 1]) / jnp.maximum(g[0, 0] + g[1, 1] - 2 * g[0, 1], _EPS), 0, 1)
    two = jnp.stack([gamma, 1 - gamma])
    return jnp.where(present.all(), two, alpha)
  alpha, _ = jax.lax.scan(step, alpha, None, length=iters)
  return alpha


def dbmtl_update(w: WeightingConfig, state: dict[str, Any], log_grads: Any,
                 present: jax.Array) -> tuple[dict[str, Any], jax.Array]:
  """The EMA of each present task's log-loss gradient; returns (state, scales) with scales_t =
  max_s |ghat_s| / |ghat_t| over present tasks (0 for absent ones)."""
  count = state["count"] + 1
  beta = w.ema / count.astype(jnp.float32) ** w.beta_sigma
  t = count.shape[0]
  mix = lambda new, old: new + beta.reshape((t,) + (1,) * (new.ndim - 1)) * (old - new)
  ema = jax.tree.map(lambda n, o: mix(n.astype(jnp.float32), o), log_grads, state["grads"])
  new_state = _keep_absent(present, {"grads": ema, "count": count}, state)
  norms = jnp.sqrt(jnp.diagonal(gram(new_state["grads"])))
  top = jnp.max(jnp.where(present, norms, 0.0))
  scales = jnp.where(present, top / (norms + _EPS), 0.0)
  return new_state, scales
