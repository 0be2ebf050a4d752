"""THE train step: one pure function, jitted once here with explicit shardings and donated state.

step(state, batch, task_weights[T], entropy_coefs[T]) -> (state, metrics)

Everything that may change between steps (task weights, entropy coefficients, their schedules)
is an array argument, so it never recompiles. A non-finite objective, gradient norm, update, new
parameter or new optimizer-state value skips the update inside the step (no extra host sync) and
is counted: no non-finite number ever reaches the state, hence a checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mtjax.config import WeightingConfig
from mtjax.model import Decoder, ModelSpec
from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.sharding import BATCH_AXES
from mtjax.train import losses
from mtjax.tree import param_path
from mtjax.train import weighting as weighting_lib

# The layout of a saved TrainState; checkpoint.py migrates older ones (1: no `extra`; 1-2: one
# parameter subtree per layer, before the layers were stacked for the scan).
FORMAT_VERSION = 3


@flax.struct.dataclass
class TrainState:
  # Leaves are jax.Arrays; the same class holds their NamedShardings (`shardings`), hence Any.
  step: Any  # int32 []
  params: Any  # nested dict of float32 arrays
  opt_state: Any
  skipped_steps: Any  # int32 [], total non-finite steps skipped
  consecutive_skips: Any  # int32 []
  # Method state beside params and optimizer (weighting statistics, adapters, RL): a dict of
  # arrays, checkpointed with the rest; {} for plain supervised training.
  extra: Any = flax.struct.field(default_factory=dict)


def _logical_axes(abstract_state: nnx.State) -> Any:
  """Nested dict of logical-axis tuples, same structure as the pure params dict."""
  flat = {path: var.get_metadata()["logical_axes"] for path, var in nnx.to_flat_state(abstract_state)}
  return traverse_util.unflatten_dict(flat)


def param_shardings(mesh: jax.sharding.Mesh, spec: ModelSpec) -> tuple[Any, Any, Any]:
  """(graphdef, abstract pure params, NamedSharding per param), checking divisibility."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  axes = _logical_axes(abstract)
  shapes = nnx.to_pure_dict(abstract)

  def one(path, shape_leaf, names):
    sh = sharding_lib.named(mesh, names)
    for dim, (size, part) in enumerate(zip(shape_leaf.shape, sh.spec)):
      parts = (part,) if isinstance(part, str) else (part or ())
      n = 1
      for p in parts:
        n *= mesh.shape[p]
      if size % n:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        from mtjax.errors import BadInputError
        raise BadInputError("model", f"parameter {name} axis {names[dim]!r} of size {size} is not "
                            f"divisible by mesh axes {parts} (size {n})")
    return sh

  shardings = jax.tree_util.tree_map_with_path(
      one, shapes, axes, is_leaf=lambda x: isinstance(x, tuple) and all(
          isinstance(n, (str, type(None))) for n in x))
  return graphdef, shapes, shardings


def _trained(tree: Any, lora: bool) -> Any:
  """The part of a params-like tree that gets gradients: the LoRA adapters with LoRA, else all."""
  return traverse_util.unflatten_dict(_split_lora(tree)[0], sep="/") if lora else tree


def _extra_init(weighting: WeightingConfig | None, num_tasks: int, lora: bool,
                reference: bool = False) -> Callable:
  """params -> TrainState.extra at init: {"weighting": the method's state} (none for static),
  {"reference": a copy of the starting params} (RL's KL reference, without LoRA)."""
  def init(params):
    extra = {}
    if weighting is not None:
      state = weighting_lib.init_state(weighting, num_tasks, _trained(params, lora))
      if state:
        extra["weighting"] = state
    if reference and not lora:
      extra["reference"] = jax.tree.map(jnp.copy, params)
    return extra
  return init


def _extra_shardings(mesh: jax.sharding.Mesh, extra_init: Callable, abstract_params: Any,
                     params_sh: Any, lora: bool) -> Any:
  """Per-task [T] statistics replicate; DB-MTL's per-task gradient EMAs [T, *param] follow their
  parameter's sharding on the trailing axes."""
  replicated = NamedSharding(mesh, PartitionSpec())
  extra = jax.eval_shape(extra_init, abstract_params)
  shardings = jax.tree.map(lambda _: replicated, extra)
  if "reference" in extra:
    shardings["reference"] = params_sh
  grads = extra.get("weighting", {}).get("grads")
  if grads is not None:
    shardings["weighting"]["grads"] = jax.tree.map(
        lambda sh: NamedSharding(mesh, PartitionSpec(None, *sh.spec)), _trained(params_sh, lora))
  return shardings


def state_shardings(mesh: jax.sharding.Mesh, tx: optax.GradientTransformation,
                    abstract_params: Any, params_sh: Any, extra_sh: Any = None) -> TrainState:
  """Every state leaf gets a NamedSharding: optimizer leaves that hold a copy of a parameter
  (moments, EMA; also inside masked and multi_transform states) follow that parameter, matched
  by the end of their path and their shape; everything else (counts, scalars) replicates."""
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = {}
  for (path, shape), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree_util.tree_flatten_with_path(params_sh)[0]):
    by_path[tuple(param_path(path).split("/"))] = (shape.shape, sh)

  def follow(path, leaf):
    keys = tuple(param_path(path).split("/"))
    for k in range(len(keys)):
      shape_sh = by_path.get(keys[k:])
      if shape_sh is not None and shape_sh[0] == leaf.shape:
        return shape_sh[1]
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(follow, jax.eval_shape(tx.init, abstract_params))
  return TrainState(step=replicated, params=params_sh, opt_state=opt_sh,
                    skipped_steps=replicated, consecutive_skips=replicated,
                    extra={} if extra_sh is None else extra_sh)


def init_state(mesh: jax.sharding.Mesh, spec: ModelSpec, tx: optax.GradientTransformation,
               seed: int, load_params: Callable[[Any, Any], Any] | None = None, *,
               weighting: WeightingConfig | None = None, num_tasks: int = 1,
               reference: bool = False) -> tuple[Any, TrainState, TrainState]:
  """Initializes parameters, optimizer state and method state directly into their shardings.

  load_params(abstract params, their shardings) -> params: start from these (a pretrained
  checkpoint streamed into the shardings) instead of a random init. weighting: the adaptive
  weighting method whose state goes in TrainState.extra (num_tasks: its task axis). reference:
  keep a copy of the starting params in TrainState.extra["reference"] (RL's KL reference).
  """
  graphdef, abstract_params, params_sh = param_shardings(mesh, spec)
  extra_init = _extra_init(weighting, num_tasks, spec.adapters, reference)
  shardings = state_shardings(mesh, tx, abstract_params, params_sh,
                              _extra_shardings(mesh, extra_init, abstract_params, params_sh,
                                               spec.adapters))
  if load_params is None and spec.svf:
    # A fresh base, then its SVD layer by layer as for a loaded one: an SVD inside the sharded
    # init (batched over the stacked layers) deadlocked XLA:CPU with several devices.
    load_params = functools.partial(_fresh_base, spec.without_adapters(), seed)
  if load_params is not None and spec.soft_prompt_len:
    load_params = functools.partial(_load_with_fresh_soft_prompt, load_params, spec, seed)
  if load_params is not None:
    params = _load_with_fresh_adapters(load_params, abstract_params, params_sh, seed) \
        if spec.adapters else load_params(abstract_params, params_sh)

    def init_from(params):
      zero = jnp.zeros((), jnp.int32)
      return TrainState(step=zero, params=params, opt_state=tx.init(params),
                        skipped_steps=zero, consecutive_skips=zero, extra=extra_init(params))

    with jax.set_mesh(mesh):
      state = jax.jit(init_from, out_shardings=shardings, donate_argnums=0)(params)
    return graphdef, state, shardings

  def init(key):
    params = nnx.to_pure_dict(nnx.split(Decoder(spec, nnx.Rngs(key)))[1])
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      skipped_steps=zero, consecutive_skips=zero, extra=extra_init(params))

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  return graphdef, state, shardings


def _fresh_base(spec: ModelSpec, seed: int, abstract: Any, shardings: Any) -> Any:
  """A random init of the model without adapters, directly into its shardings."""
  del abstract
  init = lambda key: nnx.to_pure_dict(nnx.split(Decoder(spec, nnx.Rngs(key)))[1])
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def _load_with_fresh_soft_prompt(load_params: Callable[[Any, Any], Any], spec: ModelSpec,
                                 seed: int, abstract: Any, shardings: Any) -> Any:
  """The loaded parameters with the loaded soft prompts (an mtjax export of a run with them), or
  fresh ones: each row a copy of the loaded embedding of a random token of the tokenizer's
  vocabulary (Lester et al. 2021's vocabulary init), so the prompts start at the scale of the
  embeddings they stand in for."""
  loaded = load_params(abstract, shardings)
  if "soft_prompt" in loaded:
    return loaded
  shape = (spec.soft_prompt_tasks, spec.soft_prompt_len)

  def init(embed, key):
    ids = jax.random.randint(key, shape, 0, spec.soft_prompt_token)
    return embed[ids].astype(abstract["soft_prompt"].dtype)

  table = jax.jit(init, out_shardings=shardings["soft_prompt"])(
      loaded["token_embed"], jax.random.fold_in(jax.random.key(seed), 0x50F7))
  return {**loaded, "soft_prompt": table}


def _split_lora(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the trained adapters: LoRA's A and B, SVF's p; everything else), each a flat {path: array}."""
  from mtjax.model.llama import is_adapter_path
  flat = traverse_util.flatten_dict(params, sep="/")
  return ({k: v for k, v in flat.items() if is_adapter_path(k)},
          {k: v for k, v in flat.items() if not is_adapter_path(k)})


def _load_with_fresh_adapters(load_params: Callable[[Any, Any], Any], abstract: Any,
                              shardings: Any, seed: int) -> Any:
  """The base parameters from load_params and fresh adapters on them: LoRA's A normal with
  stddev 1 / sqrt(fan in) and B zero (the model starts equal to the loaded base); SVF's basis
  (U, S, V^T) computed from the loaded projections, one SVD per layer, and p = 0.1 + 0.01 N(0, 1)."""
  import math

  from mtjax.model.llama import SVF_BASIS, is_svf_basis_path, svf_basis
  adapters, rest = _split_lora(abstract)
  adapters_sh, rest_sh = _split_lora(shardings)
  base = {k: v for k, v in rest.items() if not is_svf_basis_path(k)}
  base_sh = {k: v for k, v in rest_sh.items() if not is_svf_basis_path(k)}
  unflat = lambda flat: traverse_util.unflatten_dict(flat, sep="/")
  loaded = traverse_util.flatten_dict(load_params(unflat(base), unflat(base_sh)), sep="/")

  def init(key):
    out = {}
    for i, (path, leaf) in enumerate(sorted(adapters.items())):
      x = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
      if path.endswith("_lora_b"):
        out[path] = jnp.zeros(leaf.shape, leaf.dtype)
      elif path.endswith("_svf_p"):
        out[path] = (0.1 + 0.01 * x).astype(leaf.dtype)
      else:
        stacked = path.startswith("layers/")
        fan_in = math.prod(leaf.shape[1 + stacked:-1])  # [layers?, T, *in, r]
        out[path] = (x / math.sqrt(fan_in)).astype(leaf.dtype)
    return out

  fresh = jax.jit(init, out_shardings=adapters_sh)(jax.random.key(seed))
  derived = {}
  for path in sorted(p for p in rest if p.endswith("_svf_u")):
    target = path[:-len("_svf_u")]
    n_in = rest[path].ndim - 2  # [layers, *in, r]
    paths = [target + suffix for suffix in SVF_BASIS]
    # One SVD per layer (lax.map): never a sharded SVD, which XLA does not have.
    basis = jax.jit(lambda w, n_in=n_in: jax.lax.map(lambda x: svf_basis(x, n_in), w),
                    out_shardings=tuple(rest_sh[p] for p in paths))(loaded[target])
    derived.update(zip(paths, basis))
  return unflat({**loaded, **fresh, **derived})


def make_grad_fn(graphdef: Any, *, num_tasks: int, grad_accum: int = 1,
                 z_loss: float = 0.0, loss_chunk: int = 1024, lora: bool = False) -> Callable:
  """(params, batch, task_weights, entropy_coefs) -> (objective, per_task, grads).

  lora: gradients are taken w.r.t. the LoRA adapters only; the frozen base's are zeros.

  Gradient accumulation scans over microbatches, normalizing every microbatch by the FULL
  batch's per-task token counts: the objective is then linear in the microbatches and the summed
  gradients equal those of one big batch.
  """

  def loss_fn(params, batch, task_weights, entropy_coefs, normalizer, dropout_key=None):
    model = nnx.merge(graphdef, params)
    hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"],
                            adapter_ids=batch["task_ids"], dropout_key=dropout_key)
    if not loss_chunk:  # dense: the whole [B, L, V] float32 logits at once
      return losses.multitask_objective(model.logits(hidden), batch, task_weights, entropy_coefs,
                                        z_loss=z_loss, normalizer=normalizer)
    head, tied = model.head()
    return losses.multitask_objective_chunked(
        hidden, head.astype(hidden.dtype), batch, task_weights, entropy_coefs, tied=tied,
        z_loss=z_loss, normalizer=normalizer, chunk=loss_chunk)

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  if lora:
    def lora_loss(adapters, frozen, *args):
      params = traverse_util.unflatten_dict({**frozen, **adapters}, sep="/")
      return loss_fn(params, *args)
    lora_value_and_grad = jax.value_and_grad(lora_loss, has_aux=True)

    def value_and_grad(params, *args):  # noqa: F811 (the adapters' gradients only)
      adapters, frozen = _split_lora(params)
      value, grads = lora_value_and_grad(adapters, jax.lax.stop_gradient(frozen), *args)
      return value, _with_frozen_zeros(grads, frozen)

  def grad_fn(params, batch, task_weights, entropy_coefs, dropout_key=None):
    """dropout_key: the model's dropout (LoRA's) in this step; None: none."""
    counts = losses.token_counts(batch, num_tasks)
    if grad_accum == 1:
      (objective, per_task), grads = value_and_grad(params, batch, task_weights, entropy_coefs,
                                                    counts, dropout_key)
      return objective, per_task, grads

    def split(x):  # strided, so every microbatch stays evenly spread over the batch shards
      return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      micro, index = xs
      micro = {k: sharding_lib.constrain(v, BATCH_AXES) for k, v in micro.items()}
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
      (obj, per_task), grads = value_and_grad(params, micro, task_weights, entropy_coefs, counts,
                                              key)
      return jax.tree.map(jnp.add, carry, (obj, per_task, grads)), None

    zeros = (jnp.zeros((), jnp.float32),
             {k: jnp.zeros_like(counts) for k in ("loss", "entropy", "accuracy", "tokens")},
             jax.tree.map(jnp.zeros_like, params))
    (objective, per_task, grads), _ = jax.lax.scan(
        body, zeros, (jax.tree.map(split, dict(batch)), jnp.arange(grad_accum)))
    return objective, per_task, grads

  def terms_vjp(params, batch, dropout_key=None):
    """One forward pass: (per_task, pullback), pullback(loss_cot [T], entropy_cot [T], z_cot [])
    -> the gradient of sum_t loss_cot_t L_t + sum_t entropy_cot_t H_t + z_cot * z-loss w.r.t.
    the trained parameters (the adapters with LoRA; `with_frozen` completes the tree). The
    weighting methods that need this batch's losses (or per-task gradients) before the backward
    pass use it; the objective is linear in the cotangents, so per-task gradients are the
    pullback applied to one-hot rows (in a lax.map)."""
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    counts = losses.token_counts(batch, num_tasks)

    def terms(trained, frozen):
      full = traverse_util.unflatten_dict(
          {**frozen, **traverse_util.flatten_dict(trained, sep="/")}, sep="/") if lora else trained
      z_term, per_task = loss_fn(full, batch, zeros, zeros, counts, dropout_key)
      return (per_task["loss"], per_task["entropy"], z_term), per_task

    trained, frozen = (_trained(params, True), _split_lora(params)[1]) if lora else (params, {})
    _, pullback, per_task = jax.vjp(lambda t: terms(t, jax.lax.stop_gradient(frozen)), trained,
                                    has_aux=True)
    return per_task, lambda *cot: pullback(cot)[0]

  def with_frozen(grads, params):
    """Trained-part gradients -> a full params tree (zeros for the frozen base with LoRA)."""
    return _with_frozen_zeros(grads, _split_lora(params)[1]) if lora else grads

  grad_fn.terms_vjp = terms_vjp  # type: ignore[attr-defined]
  grad_fn.with_frozen = with_frozen  # type: ignore[attr-defined]
  return grad_fn


def _with_frozen_zeros(grads: Any, frozen: dict[str, Any]) -> Any:
  """The adapters' gradients (nested or flat) + zeros for the frozen base, as one nested tree."""
  flat = traverse_util.flatten_dict(grads, sep="/")  # a flat {path: array} stays as it is
  zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
  return traverse_util.unflatten_dict({**zeros, **flat}, sep="/")


def all_finite(tree: Any) -> jax.Array:
  """A scalar bool: every floating-point leaf of `tree` is finite (True for a tree without any)."""
  ok = jnp.array(True)
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      ok = ok & jnp.isfinite(leaf).all()
  return ok


def make_step_fn(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                 num_tasks: int, grad_accum: int = 1, z_loss: float = 0.0,
                 loss_chunk: int = 1024, lora: bool = False,
                 dropout_seed: int | None = None, weighting: WeightingConfig | None = None,
                 seed: int = 0) -> Callable:
  """The pure step: gradients, the optimizer update, a non-finite guard (the update is kept
  only if the objective, the gradient norm, the update and the new params and optimizer state are
  all finite; an update can overflow even from finite gradients, e.g. with a huge learning rate).

  dropout_seed: the model has dropout (LoRA's); a step's key is this seed's folded with the step
  number. lora: gradients and updates for the LoRA adapters only (see make_grad_fn).
  weighting: the adaptive task weighting (mtjax.train.weighting; None or static: the task weights
  as given); its state is TrainState.extra["weighting"]; seed: PCGrad's random task orders."""
  grad_fn = make_grad_fn(graphdef, num_tasks=num_tasks, grad_accum=grad_accum, z_loss=z_loss,
                         loss_chunk=loss_chunk, lora=lora)
  weighting = weighting if weighting is not None else WeightingConfig()
  method = weighting.method
  adaptive = _weighted_gradients(grad_fn, weighting, num_tasks, seed) \
      if method in weighting_lib.NEEDS_LOSSES_FIRST else None

  def step(state: TrainState, batch: Mapping[str, jax.Array], task_weights: jax.Array,
           entropy_coefs: jax.Array) -> tuple[TrainState, dict[str, Any]]:
    dropout_key = None if dropout_seed is None else jax.random.fold_in(
        jax.random.key(dropout_seed), state.step)
    wstate = state.extra.get("weighting", {})
    if adaptive is not None:
      objective, per_task, grads, weights, new_wstate = adaptive(
          state.params, batch, task_weights, entropy_coefs, wstate, state.step, dropout_key)
    else:
      weights = task_weights
      if method == "uncertainty":
        weights = task_weights * weighting_lib.uncertainty_weights(wstate)
      elif method == "dwa":
        weights = task_weights * weighting_lib.dwa_weights(weighting, wstate)
      objective, per_task, grads = grad_fn(state.params, batch, weights, entropy_coefs,
                                           dropout_key)
      present = per_task["tokens"] > 0
      new_wstate = wstate
      if method == "uncertainty":
        objective = objective + weighting_lib.uncertainty_regularizer(wstate)
        new_wstate = weighting_lib.uncertainty_update(weighting, wstate,
                                                      task_weights * per_task["loss"], present)
      elif method == "dwa":
        new_wstate = weighting_lib.dwa_update(weighting, wstate, per_task["loss"], present)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite update makes its parameter non-finite: checking the new params covers it.
    ok = (jnp.isfinite(objective) & jnp.isfinite(grad_norm) & all_finite(new_params)
          & all_finite(new_opt_state) & all_finite(new_wstate))
    keep_new = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    skipped = (~ok).astype(jnp.int32)
    extra = dict(state.extra)
    if wstate:
      extra["weighting"] = keep_new(new_wstate, wstate)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_new(new_params, state.params),
        opt_state=keep_new(new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1),
        extra=extra,
    )
    metrics = {
        "objective": objective, "per_task": per_task, "grad_norm": grad_norm,
        "lr": schedule(state.step - state.skipped_steps),
        "skipped_steps": new_state.skipped_steps,
        "consecutive_skips": new_state.consecutive_skips,
        "task_weights": weights,  # as applied (static x adaptive): train/<task>/weight
    }
    return new_state, metrics

  return step


def _weighted_gradients(grad_fn: Callable, w: WeightingConfig, num_tasks: int,
                        seed: int) -> Callable:
  """The methods that need this batch's losses (FAMO) or per-task gradients (PCGrad, MGDA,
  DB-MTL) before the backward pass: one forward, then the pullback with the method's cotangents.
  -> (objective, per_task, grads, the weights or coefficients applied, the method's new state)."""
  eye = jnp.eye(num_tasks, dtype=jnp.float32)
  zeros = jnp.zeros((num_tasks,), jnp.float32)

  def fn(params, batch, task_weights, entropy_coefs, wstate, step, dropout_key):
    per_task, pullback = grad_fn.terms_vjp(params, batch, dropout_key)
    task_losses = jax.lax.stop_gradient(per_task["loss"])
    # A task with weight 0 takes no part (MGDA's hull would otherwise hold its zero gradient).
    present = (per_task["tokens"] > 0) & (task_weights > 0)
    plain = jnp.sum(task_weights * task_losses) - jnp.sum(entropy_coefs * per_task["entropy"])
    if w.method == "famo":  # on the weighted losses w_t L_t, as every method
      weighted = task_weights * task_losses
      new_wstate = weighting_lib.famo_update_logits(w, wstate, weighted, present)
      weights = task_weights * weighting_lib.famo_weights(w, new_wstate, weighted, present)
      grads = pullback(weights, -entropy_coefs, jnp.float32(1.0))
      objective = (weighting_lib.famo_objective(w, new_wstate, weighted, present)
                   - jnp.sum(entropy_coefs * per_task["entropy"]))
      return objective, per_task, grad_fn.with_frozen(grads, params), weights, new_wstate
    # Per-task gradients of w_t L_t (rows) and the regularizers' gradient, the pullback per row.
    cot_losses = jnp.concatenate([eye * task_weights[:, None], zeros[None]])
    cot_entropy = jnp.concatenate([jnp.zeros((num_tasks, num_tasks)), -entropy_coefs[None]])
    cot_z = jnp.concatenate([zeros, jnp.ones((1,), jnp.float32)])
    # lax.map, not vmap: vmapping this pullback gave wrong per-task gradients (their sum off the
    # full gradient by ~50% on the tiny model, one device; tests/test_weighting.py checks it).
    both = jax.lax.map(lambda cot: pullback(*cot), (cot_losses, cot_entropy, cot_z))
    rows = jax.tree.map(lambda g: g[:num_tasks], both)
    regularizers = jax.tree.map(lambda g: g[num_tasks], both)
    new_wstate = wstate
    if w.method == "pcgrad":
      orders = weighting_lib.pcgrad_orders(
          jax.random.fold_in(jax.random.key(seed), step), num_tasks)
      coefs = weighting_lib.pcgrad_coefs(weighting_lib.gram(rows), present, orders)
      combined = weighting_lib.combine(rows, coefs)
    elif w.method == "mgda":
      coefs = weighting_lib.mgda_coefs(weighting_lib.gram(rows), present, w.solver_iters)
      combined = weighting_lib.combine(rows, coefs)
    else:  # dbmtl: gradients of log(w_t L_t) = rows / (w_t L_t)
      scale = jnp.where(present, 1.0 / jnp.maximum(task_weights * task_losses, 1e-8), 0.0)
      log_rows = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), rows)
      new_wstate, coefs = weighting_lib.dbmtl_update(w, wstate, log_rows, present)
      combined = weighting_lib.combine(new_wstate["grads"], coefs)
    grads = jax.tree.map(jnp.add, combined, regularizers)
    return plain, per_task, grad_fn.with_frozen(grads, params), coefs, new_wstate

  return fn


def jit_step(step_fn: Callable, mesh: jax.sharding.Mesh, shardings: TrainState) -> Callable:
  """THE one place the step is jitted: explicit in/out shardings, state donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sh = sharding_lib.named(mesh, BATCH_AXES)
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh, replicated, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
