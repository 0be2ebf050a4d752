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
from mtjax.model import adapters as adapters_lib
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


def trained(tree: Any, paths: frozenset[str] | None) -> Any:
  """The part of a params-like tree (params, gradients, shardings) that trains: the leaves at
  `paths` (the Trained adapter variables on a frozen base: mtjax.model.adapters), or all (None)."""
  if paths is None:
    return tree
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in paths}, sep="/")


def trained_paths(graphdef: Any, params: Any, frozen_base: bool) -> frozenset[str] | None:
  """The params paths that train on a frozen base (None: every parameter trains), from the
  variable types the graphdef records (params: real or abstract)."""
  if not frozen_base:
    return None
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return adapters_lib.trained_paths(graphdef, abstract)


def _extra_init(weighting: WeightingConfig | None, num_tasks: int,
                paths: frozenset[str] | None, reference: bool = False) -> Callable:
  """params -> TrainState.extra at init: {"weighting": the method's state} (none for static),
  {"reference": a copy of the starting params} (RL's KL reference; on a frozen base the
  reference is the base itself: no copy)."""
  def init(params):
    extra = {}
    if weighting is not None:
      state = weighting_lib.get(weighting).init(num_tasks, trained(params, paths))
      if state:
        extra["weighting"] = state
    if reference and paths is None:
      extra["reference"] = jax.tree.map(jnp.copy, params)
    return extra
  return init


def _extra_shardings(mesh: jax.sharding.Mesh, extra_init: Callable, abstract_params: Any,
                     params_sh: Any, paths: frozenset[str] | None) -> Any:
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
        lambda sh: NamedSharding(mesh, PartitionSpec(None, *sh.spec)), trained(params_sh, paths))
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
  checkpoint streamed into the shardings) instead of a random init; the adapters then start
  fresh on the loaded base. weighting: the adaptive weighting method whose state goes in
  TrainState.extra (num_tasks: its task axis). reference: keep a copy of the starting params in
  TrainState.extra["reference"] (RL's KL reference).
  """
  graphdef, abstract_params, params_sh = param_shardings(mesh, spec)
  paths = trained_paths(graphdef, abstract_params, spec.frozen_base)
  extra_init = _extra_init(weighting, num_tasks, paths, reference)
  shardings = state_shardings(mesh, tx, abstract_params, params_sh,
                              _extra_shardings(mesh, extra_init, abstract_params, params_sh, paths))
  if load_params is None and any(a.init_apart for a in spec.adapters):
    # A fresh base, then the adapters on it as on a loaded one: an SVD inside the sharded init
    # (batched over the stacked layers) deadlocked XLA:CPU with several devices.
    load_params = functools.partial(_fresh_base, spec.without_adapters(), seed)
  if load_params is not None:
    params = _load_with_fresh_adapters(load_params, graphdef, abstract_params, params_sh, seed) \
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


def _load_with_fresh_adapters(load_params: Callable[[Any, Any], Any], graphdef: Any,
                              abstract: Any, shardings: Any, seed: int) -> Any:
  """The base parameters from load_params and fresh adapters on them (each adapter's `init` from
  its site's loaded weight, e.g. LoRA's B zero so the model starts equal to the loaded base,
  SVF's basis an SVD per layer). Variables of adapters that train beside the base (soft prompts)
  are offered to load_params too: an mtjax export keeps them; what it lacks starts fresh."""
  model = nnx.merge(graphdef, abstract)
  flat, flat_sh = traverse_util.flatten_dict(abstract, sep="/"), traverse_util.flatten_dict(
      shardings, sep="/")
  attached = adapters_lib.variables_of(model)  # {path: its adapter}
  offered = {k for k, a in attached.items() if not a.freezes_base}
  base = {k: v for k, v in flat.items() if k not in attached or k in offered}
  base_sh = {k: flat_sh[k] for k in base}
  unflat = lambda tree: traverse_util.unflatten_dict(tree, sep="/")
  loaded = traverse_util.flatten_dict(load_params(unflat(base), unflat(base_sh)), sep="/")
  key = jax.random.key(seed)
  fresh: dict[str, Any] = {}
  for i, group in enumerate(adapters_lib.init_groups(model)):
    wanted = [p for p in adapters_lib.group_paths(group) if p not in loaded]
    if not wanted:
      continue
    weights = {site.path: loaded[site.path] for _, site in group}
    # Each group in its own jit (an SVF site alone: its SVD per layer, never a sharded batch).
    values = jax.jit(lambda w, key, group=group: adapters_lib.fresh_of(group, w, key),
                     out_shardings={p: flat_sh[p] for p in adapters_lib.group_paths(group)})(
                         weights, jax.random.fold_in(key, i))
    fresh.update({p: values[p] for p in wanted})
  return unflat({**loaded, **fresh})


def split_trainable(graphdef: Any, params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the Trained adapter variables, everything else) of a frozen-base model's params, each a
  flat {path: array}: the typed filter of mtjax.model.adapters, read from the graphdef."""
  paths = trained_paths(graphdef, params, True)
  assert paths is not None
  flat = traverse_util.flatten_dict(params, sep="/")
  return ({k: v for k, v in flat.items() if k in paths},
          {k: v for k, v in flat.items() if k not in paths})


def with_frozen_zeros(grads: Any, frozen: dict[str, Any]) -> Any:
  """The adapters' gradients (nested or flat) + zeros for the frozen base, as one nested tree."""
  flat = traverse_util.flatten_dict(grads, sep="/")  # a flat {path: array} stays as it is
  zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
  return traverse_util.unflatten_dict({**zeros, **flat}, sep="/")
