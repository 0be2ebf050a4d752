"""Adapters as plug-ins: what an adapter is, where it attaches, and the one place it runs.

The base model (mtjax.model.llama) knows nothing of adapters. It declares its sites: every
projection parameter carries `projection=n_in` metadata (how many of its leading axes are
inputs), the token embedding `embedding=True`; it computes every projection through `project`
and the embedding through `embed`, passing an opaque `Context` (each token's task id, a dropout
key). `attach`, a tree transform run at the end of the Decoder's construction, walks the module
graph and, for each adapter of the spec, adds its variables beside the sites it targets and
records the adapter on the module; `project` / `embed` then apply the adapters recorded there.

An adapter is a frozen dataclass (hashable: it lives in ModelSpec and in the graphdef):

  kind, group           its registered name; the config group it reads (model.<group>)
  freezes_base          whether the base is frozen (only Trained variables train)
  targets               the site names it attaches to (projections: q, k, v, o, gate, up, down;
                        the embedding: token_embed)
  tasks                 its task axis (1: shared by every task)
  init(site, w, key)    its variables for a site: {attribute: (Variable type, value, logical
                        axes)}, from the base weight w (the values a fresh adapter starts at)
  apply(call)           the site's output with the adapter, given the input, the base weight,
                        the base output and the context (DoRA needs the base)
  neutral(params, site) its variables' values that give the base model back (RL's reference)
  merge(params, site, index)  the base weight with adapter `index` folded in (export)
  from_config(model_config, num_tasks, tokenizer_vocab)  the adapter of a config, or None

Variables are typed: `Trained` ones train (LoRA's A and B, SVF's p, DoRA's magnitude, soft
prompts); other `AdapterParam`s are derived and frozen (SVF's basis). Code that must tell them
apart filters by type (`trained_paths`), never by name. Adapter kinds are registered once in
KINDS (kind -> "module:Class", imported when a config uses it): a new kind is one module and one
line there.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from mtjax.errors import BadInputError

KINDS: Mapping[str, str] = {
    "lora": "mtjax.model.lora:LoRA",
    "dora": "mtjax.model.dora:DoRA",
    "svf": "mtjax.model.svf:SVF",
    "soft_prompt": "mtjax.model.soft_prompt:SoftPrompt",
}

ATTR = "adapters"  # the static attribute of a module: ((site name, (adapter, ...)), ...)
EMBEDDING = "token_embed"  # the embedding site's name


class AdapterParam(nnx.Param):
  """A variable an adapter adds (frozen unless it is also Trained)."""


class Trained(AdapterParam):
  """An adapter variable that trains (on a frozen base, the only ones that do)."""


@dataclasses.dataclass(frozen=True)
class Site:
  """A base parameter an adapter can attach to: a projection [*in, *out] or the embedding."""

  name: str  # the parameter's attribute name: q, k, ..., token_embed
  path: str  # its path in the params tree: layers/attn/q
  in_axes: tuple[str, ...]  # logical axes of its inputs (without "layers")
  out_axes: tuple[str, ...]
  stacked: bool  # a leading "layers" axis (the scanned layers)

  @property
  def lead(self) -> tuple[str, ...]:
    return ("layers",) if self.stacked else ()

  def beside(self, attr: str) -> str:
    """The params path of a variable named `attr` in the site's module."""
    return self.path.rsplit("/", 1)[0] + "/" + attr if "/" in self.path else attr


@dataclasses.dataclass(frozen=True)
class Context:
  """What a site's adapters see of the batch: each token's task id [B, L] (< 0: none, as padding)
  and the dropout key of this module in training (None: no dropout)."""

  task_ids: Any = None
  key: Any = None

  def fold(self, i: int) -> Context:
    return self if self.key is None else dataclasses.replace(self, key=jax.random.fold_in(self.key, i))


@dataclasses.dataclass(frozen=True)
class Call:
  """One application of a site's adapter: `apply` returns the new output."""

  module: Any  # the module holding the site and the adapter's variables
  site: str
  x: jax.Array  # the input (token ids at the embedding)
  w: jax.Array | None  # the base weight, in the compute dtype
  y: jax.Array  # the base output (or the previous adapter's)
  equation: str  # the projection's einsum (x, w -> y)
  ctx: Context

  def var(self, suffix: str) -> jax.Array:
    """The value of the adapter variable `<site><suffix>` beside the site."""
    return getattr(self.module, self.site + suffix)[...]


@dataclasses.dataclass(frozen=True)
class Adapter:
  """The base of every adapter kind (see the module docstring)."""

  kind: ClassVar[str] = ""
  group: ClassVar[str] = ""
  freezes_base: ClassVar[bool] = True
  targets: tuple[str, ...] = ()
  tasks: int = 1

  @classmethod
  def from_config(cls, model_config: Any, num_tasks: int, tokenizer_vocab: int) -> Adapter | None:
    raise NotImplementedError

  @property
  def dropout(self) -> float:
    return 0.0

  @property
  def init_apart(self) -> bool:
    """Whether its fresh values are computed apart from the sharded random init of the model
    (SVF's SVD per layer; a loaded base always is)."""
    return False

  def names(self, site: Site) -> tuple[str, ...]:
    """The attribute names of its variables beside a site (their params paths: site.beside)."""
    raise NotImplementedError

  def init(self, site: Site, w: jax.Array, key: jax.Array) -> dict[str, tuple[type, Any, tuple]]:
    raise NotImplementedError

  def apply(self, call: Call) -> jax.Array:
    raise NotImplementedError

  def neutral(self, params: Mapping[str, jax.Array], site: Site) -> dict[str, jax.Array]:
    """{path: value} of this site's variables that make the model its base (default: none)."""
    del params, site
    raise NotImplementedError(f"{self.kind}: no neutral values")

  def merge(self, params: Mapping[str, jax.Array], site: Site, index: int) -> jax.Array:
    """The site's base weight with adapter `index` folded in (float32 math, W's dtype)."""
    del params, site, index
    raise NotImplementedError(f"{self.kind}: cannot be merged into the base weights")

  def describe(self) -> str:
    return f"{self.kind} on {','.join(self.targets)}"

  def mix(self, call: Call, dtype: Any) -> jax.Array | None:
    """Each token's one-hot task row [B, L, T] for per-task variables (None: one shared)."""
    if self.tasks == 1:
      return None
    if call.ctx.task_ids is None:
      raise ValueError(f"per-task {self.kind} adapters need each token's task id (adapter_ids)")
    # A token of no adapter's task (-1 padding, an id >= the adapters'): all zero, the base.
    return jax.nn.one_hot(call.ctx.task_ids, self.tasks, dtype=dtype)


def kind(name: str) -> type[Adapter]:
  module, _, cls = KINDS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def from_config(model_config: Any, num_tasks: int, tokenizer_vocab: int) -> tuple[Adapter, ...]:
  """The adapters a model config asks for (model.lora, model.svf, model.soft_prompt, ...)."""
  found = [a for a in (kind(k).from_config(model_config, num_tasks, tokenizer_vocab) for k in KINDS)
           if a is not None]
  lora = getattr(model_config, "lora", None)
  if lora is not None and lora.targets and not any(a.group == "lora" for a in found):
    choices = [k for k in KINDS if kind(k).group == "lora"]
    raise BadInputError("model.lora.kind", f"expected one of {', '.join(choices)}, got {lora.kind!r}")
  return tuple(found)


# ---------------------------------------------------------------- the model side

def sites(root: nnx.Module) -> list[tuple[nnx.Module, Site]]:
  """Every site of the model: (its module, the Site), in graph order."""
  out = []
  for path, node in nnx.iter_graph(root):
    if not isinstance(node, nnx.Module):
      continue
    for name, value in list(vars(node).items()):
      if not isinstance(value, nnx.Param) or isinstance(value, AdapterParam):
        continue
      meta = value.get_metadata()
      n_in = meta.get("projection")
      if n_in is None and not meta.get("embedding"):
        continue
      axes = tuple(meta["logical_axes"])
      stacked = bool(axes) and axes[0] == "layers"
      axes = axes[1:] if stacked else axes
      n_in = 1 if n_in is None else n_in
      site_path = "/".join(str(p) for p in (*path, name))
      out.append((node, Site(name, site_path, axes[:n_in], axes[n_in:], stacked)))
  return out


def attach(root: nnx.Module, adapters: Sequence[Adapter], rngs: nnx.Rngs) -> None:
  """The tree transform: each adapter's variables beside the sites it targets, and the adapter
  recorded on their module (in the order given)."""
  if not adapters:
    return
  for module, site in sites(root):
    chosen = [a for a in adapters if site.name in a.targets]
    if not chosen:
      continue
    for adapter in chosen:
      made = adapter.init(site, getattr(module, site.name)[...], rngs.params())
      assert tuple(made) == adapter.names(site), (adapter.kind, tuple(made), adapter.names(site))
      for attr, (var_type, value, axes) in made.items():
        setattr(module, attr, var_type(value, logical_axes=axes))
    recorded = dict(getattr(module, ATTR, ()))
    recorded[site.name] = tuple(recorded.get(site.name, ())) + tuple(chosen)
    setattr(module, ATTR, tuple(sorted(recorded.items())))


def _applied(module: nnx.Module, site: str) -> tuple[Adapter, ...]:
  return dict(getattr(module, ATTR, ())).get(site, ())


def project(module: nnx.Module, site: str, x: jax.Array, equation: str,
            ctx: Context | None = None) -> jax.Array:
  """THE projection: einsum(equation, x, W) with W = module.<site> in x's dtype, then the
  adapters attached there."""
  w = getattr(module, site)[...].astype(x.dtype)
  y = jnp.einsum(equation, x, w)
  for adapter in _applied(module, site):
    y = adapter.apply(Call(module, site, x, w, y, equation, ctx or Context()))
  return y


def embed(module: nnx.Module, site: str, tokens: jax.Array, dtype: Any,
          ctx: Context | None = None) -> jax.Array:
  """THE embedding lookup: rows of module.<site> in `dtype`, then the adapters attached there."""
  y = jnp.take(getattr(module, site)[...], tokens, axis=0).astype(dtype)
  for adapter in _applied(module, site):
    y = adapter.apply(Call(module, site, tokens, None, y, "", ctx or Context()))
  return y


# ---------------------------------------------------------------- the params side

def layout(model: nnx.Module) -> list[tuple[Adapter, Site]]:
  """(adapter, site) of every attachment in a model (abstract or real), in graph order."""
  return [(a, site) for module, site in sites(model) for a in _applied(module, site.name)]


def paths_of(abstract: nnx.Module, *types: type) -> frozenset[str]:
  """The params paths of a model's variables of these types (the typed filter)."""
  state = nnx.state(abstract, *types) if len(types) == 1 else nnx.state(abstract, nnx.Any(*types))
  return frozenset(traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/"))


def trained_paths(graphdef: Any, params: Any) -> frozenset[str]:
  """The params paths of Trained adapter variables, read from the types the graphdef records."""
  return paths_of(nnx.merge(graphdef, params), Trained)


def variables_of(model: nnx.Module) -> dict[str, Adapter]:
  """{params path: its adapter} of every adapter variable of a model."""
  return {site.beside(name): adapter for adapter, site in layout(model)
          for name in adapter.names(site)}


def init_groups(model: nnx.Module) -> list[list[tuple[Adapter, Site]]]:
  """The model's attachments grouped for a fresh init: per adapter, every site together, or
  one site per group when the adapter initialises apart (`init_apart`)."""
  groups: dict[Any, list[tuple[Adapter, Site]]] = {}
  for i, (adapter, site) in enumerate(layout(model)):
    groups.setdefault(i if adapter.init_apart else adapter, []).append((adapter, site))
  return list(groups.values())


def group_paths(group: Sequence[tuple[Adapter, Site]]) -> list[str]:
  return [site.beside(name) for adapter, site in group for name in adapter.names(site)]


def fresh_of(group: Sequence[tuple[Adapter, Site]], weights: Mapping[str, jax.Array],
             key: jax.Array) -> dict[str, Any]:
  """{path: value} of a group's variables, fresh on its sites' base weights {site path: w}."""
  out: dict[str, Any] = {}
  for j, (adapter, site) in enumerate(group):
    values = adapter.init(site, weights[site.path], jax.random.fold_in(key, j))
    out.update({site.beside(attr): value for attr, (_, value, _) in values.items()})
  return out


def neutral(model: nnx.Module, params: Any) -> Any:
  """The params with every adapter at its neutral values: the base model (RL's KL reference)."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  for adapter, site in layout(model):
    flat.update(adapter.neutral(flat, site))
  return traverse_util.unflatten_dict(flat, sep="/")


def merged(model: nnx.Module, params: Any, index: int = 0) -> Any:
  """The params with adapter `index` of every adapter on a frozen base folded into the weights it
  adapts (their variables dropped: the base model's params); adapters that train beside the base
  (soft prompts) are kept as they are."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  folded = [(a, site) for a, site in layout(model) if a.freezes_base]
  drop = {site.beside(name) for a, site in folded for name in a.names(site)}
  out = {k: v for k, v in flat.items() if k not in drop}
  for adapter, site in folded:
    out[site.path] = adapter.merge({**flat, site.path: out[site.path]}, site, index)
  return traverse_util.unflatten_dict(out, sep="/")
