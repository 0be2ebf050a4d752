"""The train state and its initialisation, directly into the mesh's shardings.

TrainState holds the step, the params (a nested dict: nnx.to_pure_dict of the Decoder), the
optimizer state, the non-finite skip counters and `extra` (method state: weighting statistics, a
reference copy of the starting params). `init_state` makes it from a random init or from a loaded
base (a pretrained model streamed into the shardings), with fresh adapters on a frozen base; every
leaf gets a NamedSharding (optimizer moments follow their parameter).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from mtjax.config import WeightingConfig
from mtjax.model import Decoder, ModelSpec
from mtjax.parallel import sharding as sharding_lib
from mtjax.train import weighting as weighting_lib
from mtjax.tree import param_path

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


def trained(tree: Any, lora: bool) -> Any:
  """The part of a params-like tree that gets gradients: the LoRA adapters with LoRA, else all."""
  return traverse_util.unflatten_dict(split_trainable(tree)[0], sep="/") if lora else tree


def _extra_init(weighting: WeightingConfig | None, num_tasks: int, lora: bool,
                reference: bool = False) -> Callable:
  """params -> TrainState.extra at init: {"weighting": the method's state} (none for static),
  {"reference": a copy of the starting params} (RL's KL reference, without LoRA)."""
  def init(params):
    extra = {}
    if weighting is not None:
      state = weighting_lib.get(weighting).init(num_tasks, trained(params, lora))
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
        lambda sh: NamedSharding(mesh, PartitionSpec(None, *sh.spec)), trained(params_sh, lora))
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


def split_trainable(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
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
  adapters, rest = split_trainable(abstract)
  adapters_sh, rest_sh = split_trainable(shardings)
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


def with_frozen_zeros(grads: Any, frozen: dict[str, Any]) -> Any:
  """The adapters' gradients (nested or flat) + zeros for the frozen base, as one nested tree."""
  flat = traverse_util.flatten_dict(grads, sep="/")  # a flat {path: array} stays as it is
  zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
  return traverse_util.unflatten_dict({**zeros, **flat}, sep="/")
