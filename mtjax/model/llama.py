"""A Llama-style decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The model knows nothing of tasks or training. Every parameter carries `logical_axes` metadata and
the main activations are constrained by logical name; parallel/sharding.py maps names to the mesh.
Parameters are stored in `param_dtype` (float32 by default); compute runs in `dtype`.

One implementation covers the Llama family and its relatives through switches in ModelSpec (never
a class per family): tied embeddings (Llama 3.2 1B), Llama 3 RoPE scaling, a sliding window
(Mistral), q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), and for Gemma 3: per-layer sliding
or full attention (`layer_types`) with the sliding layers' own RoPE base, (1 + w) RMSNorms, norms
on the attention and MLP outputs too, the embedding scaled by sqrt(d_model), query_pre_attn_scalar
and a GeGLU (tanh) MLP. mtjax.model.pretrained maps HF checkpoints of those families onto these
parameters.

Layers of different types still run under one scan: the scan steps over the repeating pattern of
layer types (Gemma 3's five sliding layers then one full one: a scan step runs six layers, each
with its window static), or, when the layer count is not a multiple of the pattern (Gemma 3 1B: 26
layers), over single layers choosing the attention by `lax.cond` on the layer's type.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtjax.config import ModelConfig
from mtjax.model import adapters as adapters_lib
from mtjax.model import attention as attention_lib
from mtjax.model.adapters import project
from mtjax.parallel.sharding import constrain

# One layer's KV cache (see init_cache): k, v [B, S, K, H], valid [B, S], index [].
LayerCache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model's shape, resolved from ModelConfig (vocab and head_dim filled in, dtype chosen)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  dtype: str
  remat: str
  attention: str
  tie_embeddings: bool
  rope_theta: float
  norm_eps: float
  rope_type: str = "default"
  rope_scaling: tuple[tuple[str, float], ...] = ()  # sorted (name, value) pairs: hashable
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  sliding_window: int = 0
  param_dtype: str = "float32"
  layer_types: tuple[str, ...] = ()  # per layer sliding_attention | full_attention (see kinds)
  rope_local_theta: float = 0.0  # the sliding layers' RoPE base; 0: every layer's is rope_theta
  activation: str = "silu"  # silu | gelu_tanh
  norm_plus_one: bool = False
  post_norms: bool = False
  embed_scale: bool = False
  query_pre_attn_scalar: float = 0.0
  # Adapters (mtjax.model.adapters: LoRA, SVF experts, soft prompts, ...), attached to the base
  # by a tree transform at the end of the Decoder's construction; () : the base model alone.
  adapters: tuple[Any, ...] = ()

  @classmethod
  def from_config(cls, cfg: ModelConfig, tokenizer_vocab: int, auto_dtype: str,
                  num_tasks: int = 1) -> ModelSpec:
    """auto_dtype: what dtype "auto" means on the devices (mtjax.resolve.auto_dtype); num_tasks:
    the task axis of per-task adapters."""
    vocab = cfg.vocab_size or -(-tokenizer_vocab // 128) * 128
    dtype = cfg.dtype if cfg.dtype != "auto" else auto_dtype
    return cls(vocab_size=vocab, d_model=cfg.d_model, num_layers=cfg.num_layers,
               num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
               head_dim=cfg.head_dim or cfg.d_model // cfg.num_heads, mlp_dim=cfg.mlp_dim,
               dtype=dtype, remat=cfg.remat, attention=cfg.attention,
               tie_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
               norm_eps=cfg.norm_eps, rope_type=cfg.rope_type,
               rope_scaling=tuple(sorted(cfg.rope_scaling.items())), qkv_bias=cfg.qkv_bias,
               out_bias=cfg.out_bias, qk_norm=cfg.qk_norm, sliding_window=cfg.sliding_window,
               param_dtype=cfg.param_dtype, layer_types=tuple(cfg.layer_types),
               rope_local_theta=cfg.rope_local_theta, activation=cfg.activation,
               norm_plus_one=cfg.norm_plus_one, post_norms=cfg.post_norms,
               embed_scale=cfg.embed_scale, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
               adapters=adapters_lib.from_config(cfg, num_tasks, tokenizer_vocab))

  @property
  def frozen_base(self) -> bool:
    """Whether only adapter variables train (LoRA, SVF, ...): the base is frozen."""
    return any(a.freezes_base for a in self.adapters)

  @property
  def adapter_tasks(self) -> int:
    """The task axis of the adapters on a frozen base (1: one shared adapter, or none)."""
    return max((a.tasks for a in self.adapters if a.freezes_base), default=1)

  @property
  def dropout(self) -> bool:
    """Whether the model has dropout in training (an adapter's): the step passes a key."""
    return any(a.dropout > 0 for a in self.adapters)

  def without_adapters(self) -> ModelSpec:
    """The base model's spec (a merged export's)."""
    return dataclasses.replace(self, adapters=())

  without_lora = without_adapters

  def kinds(self) -> tuple[bool, ...]:
    """Per layer, whether it is a sliding layer (its window sliding_window, its RoPE base
    rope_local_theta when set): layer_types' sliding_attention, or every layer when layer_types
    is empty and sliding_window > 0."""
    if self.layer_types:
      return tuple(t == "sliding_attention" for t in self.layer_types)
    return (bool(self.sliding_window),) * self.num_layers

  def period(self) -> int:
    """The length of the repeating pattern of layer kinds (1: every layer alike)."""
    kinds = self.kinds()
    return next(p for p in range(1, len(kinds) + 1)
                if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))

  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def inv_freq(self, sliding: bool = False) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2] (float32, computed as transformers does); a
    sliding layer's use rope_local_theta (default RoPE) when it is set."""
    dim = self.head_dim
    local = sliding and self.rope_local_theta > 0
    theta = self.rope_local_theta if local else self.rope_theta
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim)))
    inv = inv.astype(np.float32)
    if local:
      return inv
    p = dict(self.rope_scaling)
    if self.rope_type == "linear":
      inv = inv / np.float32(p["factor"])
    elif self.rope_type == "llama3":
      factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
      old_len = p["original_max_position_embeddings"]
      low_wavelen, high_wavelen = old_len / low, old_len / high
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
      smooth = (old_len / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _param(rngs: nnx.Rngs, shape, axes, stddev: float, dtype: str, *, projection: int = 0,
           embedding: bool = False) -> nnx.Param:
  """A normal-initialized parameter. projection=n_in (its first n_in axes are inputs) or
  embedding=True mark a site where adapters may attach (mtjax.model.adapters)."""
  value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
  site: dict[str, Any] = ({"projection": projection} if projection else
                          {"embedding": True} if embedding else {})
  return nnx.Param(value.astype(dtype), logical_axes=axes, **site)


class RMSNorm(nnx.Module):
  """RMSNorm in float32 times `scale`, or (plus_one, Gemma) times 1 + `scale` (initialized to 0)."""

  def __init__(self, dim: int, eps: float, dtype: str = "float32", plus_one: bool = False):
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), dtype), logical_axes=("norm",))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding (rotate-half form). x: [B, L, N, H]; positions: [B, L]."""
  angle = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, L, H / 2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    d, n, k, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
    pd = spec.param_dtype
    self.spec = spec
    self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), 1 / math.sqrt(d), pd,
                    projection=1)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1 / math.sqrt(d), pd,
                    projection=1)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1 / math.sqrt(d), pd,
                    projection=1)
    out_std = 1 / math.sqrt(n * h) / math.sqrt(2 * spec.num_layers)
    self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pd, projection=2)
    if spec.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), logical_axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
    if spec.out_bias:
      self.o_bias = nnx.Param(jnp.zeros((d,), pd), logical_axes=("norm",))
    if spec.qk_norm:
      self.q_norm = RMSNorm(h, spec.norm_eps, pd, spec.norm_plus_one)
      self.k_norm = RMSNorm(h, spec.norm_eps, pd, spec.norm_plus_one)

  @overload
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: None = None, *, sliding: bool | None = None,
               ctx: adapters_lib.Context | None = None) -> jax.Array: ...
  @overload
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache, *, sliding: bool | None = None,
               ctx: adapters_lib.Context | None = None) -> tuple[jax.Array, LayerCache]: ...

  def __call__(self, x, positions, segment_ids, cache=None, *, sliding=None, ctx=None):
    """`sliding`: whether this layer is a sliding one (see ModelSpec.kinds); None: the first
    layer's kind (every layer alike). ctx: what attached adapters see (opaque here)."""
    sliding = self.spec.kinds()[0] if sliding is None else sliding
    dt = x.dtype
    q = project(self, "q", x, "bld,dnh->blnh", ctx)
    k = project(self, "k", x, "bld,dkh->blkh", ctx)
    v = project(self, "v", x, "bld,dkh->blkh", ctx)
    if self.spec.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                 v + self.v_bias[...].astype(dt))
    if self.spec.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = self.spec.inv_freq(sliding)  # a trace-time constant
    q = constrain(rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
    k = constrain(rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    window = self.spec.sliding_window if sliding else 0
    attn_scale = self.spec.attention_scale()
    if cache is None:
      y = attention_lib.attend(q, k, v, segment_ids, implementation=self.spec.attention,
                               window=window, scale=attn_scale)
    else:
      y, cache = attention_lib.attend_cached(q, k, v, segment_ids, cache, window=window,
                                             scale=attn_scale)
    out = project(self, "o", y, "blnh,nhd->bld", ctx)
    if self.spec.out_bias:
      out = out + self.o_bias[...].astype(dt)
    return out if cache is None else (out, cache)


class MLP(nnx.Module):

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    d, f, pd = spec.d_model, spec.mlp_dim, spec.param_dtype
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), 1 / math.sqrt(d), pd, projection=1)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), 1 / math.sqrt(d), pd, projection=1)
    self.down = _param(rngs, (f, d), ("mlp", "embed"),
                       1 / math.sqrt(f) / math.sqrt(2 * spec.num_layers), pd, projection=1)
    self.activation = spec.activation

  def __call__(self, x, ctx: adapters_lib.Context | None = None):
    gate = project(self, "gate", x, "bld,df->blf", ctx)
    act = (jax.nn.silu(gate) if self.activation == "silu"
           else jax.nn.gelu(gate, approximate=True))  # gelu_tanh: transformers' gelu_pytorch_tanh
    h = act * project(self, "up", x, "bld,df->blf", ctx)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return project(self, "down", h, "blf,fd->bld", ctx)


class Block(nnx.Module):

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(spec.d_model, spec.norm_eps, spec.param_dtype, spec.norm_plus_one)
    self.attn_norm = norm()
    self.attn = Attention(spec, rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(spec, rngs)
    self.post_norms = spec.post_norms
    if spec.post_norms:  # Gemma 3: post_attention_layernorm, post_feedforward_layernorm
      self.post_attn_norm = norm()
      self.post_mlp_norm = norm()

  @overload
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: None = None, *, sliding: bool | None = None,
               ctx: adapters_lib.Context | None = None) -> jax.Array: ...
  @overload
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache, *, sliding: bool | None = None,
               ctx: adapters_lib.Context | None = None) -> tuple[jax.Array, LayerCache]: ...

  def __call__(self, x, positions, segment_ids, cache=None, *, sliding=None, ctx=None):
    ctx = ctx or adapters_lib.Context()
    attn = self.attn(self.attn_norm(x), positions, segment_ids, cache, sliding=sliding,
                     ctx=ctx.fold(0))
    if cache is not None:
      attn, cache = attn
    if self.post_norms:
      attn = self.post_attn_norm(attn)
    x = x + attn
    mlp = self.mlp(self.mlp_norm(x), ctx.fold(1))
    if self.post_norms:
      mlp = self.post_mlp_norm(mlp)
    x = x + mlp
    x = constrain(x, ("batch", "length", "act_embed"))
    return x if cache is None else (x, cache)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block backward
    # save the projections' outputs (matmuls without batch dims), recompute attention and the rest
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # save every matmul's output: recompute only elementwise work (cheap to redo)
    "minimal": jax.checkpoint_policies.dots_saveable,
}


def _stacked_blocks(spec: ModelSpec, rngs: nnx.Rngs) -> Block:
  """num_layers Blocks as ONE Block whose parameters have a leading layer axis (scanned).

  nnx.vmap stacks them; mtjax's own `logical_axes` metadata gets "layers" prepended here (vmap's
  transform_metadata only knows flax's own sharding names)."""

  @nnx.split_rngs(splits=spec.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs: nnx.Rngs) -> Block:
    return Block(spec, rngs)

  blocks = make(rngs)
  for _, variable in nnx.iter_graph(blocks):
    if isinstance(variable, nnx.Param):
      variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))
  return blocks


def _leaves_map(fn, tree):
  """fn on every array of a tree of arrays or of nnx Variables (their values), keeping metadata."""
  def one(x):
    return x.replace(fn(x.get_value())) if isinstance(x, nnx.Variable) else fn(x)
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _group(tree, groups: int, period: int):
  """[num_layers, ...] -> [groups, period, ...] (a free reshape: consecutive layers)."""
  return _leaves_map(lambda x: x.reshape(groups, period, *x.shape[1:]), tree)


def _index(tree, i: int):
  """Layer i of a [period, ...] group."""
  return _leaves_map(lambda x: x[i], tree)


def _constrain_layer(layer: nnx.State) -> nnx.State:
  """One layer's parameters inside the scan, constrained to their per-layer sharding (the logical
  axes without "layers"): without it the partitioner guesses shardings for the loop's slices
  (and, on CPU with 8 devices, a cached executable of such a guess deadlocked in a collective)."""

  def one(variable):
    axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
    if not axes:
      return variable
    return variable.replace(constrain(variable.get_value(), axes[1:]))

  return jax.tree.map(one, layer, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Decoder(nnx.Module):
  """tokens [B, L] (+ positions, segment_ids) -> logits [B, L, vocab] in float32.

  The layers are one stacked Block (parameters [num_layers, ...], paths `layers/attn/q`, ...)
  run under `jax.lax.scan`, so compile time does not grow with depth; `remat` wraps each
  layer. The KV cache is stacked the same way (init_cache). With layers of different kinds
  (sliding and full, ModelSpec.kinds), a scan step runs one repeat of their pattern (the
  parameters viewed as [num_layers / period, period, ...], each layer's window static), or, when
  num_layers is not a multiple of the pattern, one layer that picks its attention by lax.cond on
  its kind."""

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    self.spec = spec
    embed_std = 1 / math.sqrt(spec.d_model) if spec.tie_embeddings else 1.0
    pd = spec.param_dtype
    self.token_embed = _param(rngs, (spec.vocab_size, spec.d_model), ("vocab", "embed"),
                              embed_std, pd, embedding=True)
    self.layers = _stacked_blocks(spec, rngs)
    self.final_norm = RMSNorm(spec.d_model, spec.norm_eps, pd, spec.norm_plus_one)
    if not spec.tie_embeddings:
      self.lm_head = _param(rngs, (spec.d_model, spec.vocab_size), ("embed", "vocab"),
                            1 / math.sqrt(spec.d_model), pd)
    # The tree transform: the spec's adapters beside the sites they target (none: the base).
    adapters_lib.attach(self, spec.adapters, rngs)

  @overload
  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: None = None, *, adapter_ids: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array: ...
  @overload
  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache, *, adapter_ids: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, LayerCache]: ...

  def __call__(self, tokens, positions, segment_ids, cache=None, *, adapter_ids=None,
               dropout_key=None):
    """With `cache` (see init_cache), also returns the updated cache: (logits, cache)."""
    if cache is None:
      return self.logits(self.features(tokens, positions, segment_ids, adapter_ids=adapter_ids,
                                       dropout_key=dropout_key))
    x, cache = self.features(tokens, positions, segment_ids, cache, adapter_ids=adapter_ids)
    return self.logits(x), cache

  @overload
  def features(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: None = None, *, adapter_ids: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array: ...
  @overload
  def features(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache, *, adapter_ids: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, LayerCache]: ...

  def features(self, tokens, positions, segment_ids, cache=None, *, adapter_ids=None,
               dropout_key=None):
    """The final-normed hidden states [B, L, d_model] in the compute dtype (the head's input).

    adapter_ids [B, L] int: each token's task id (< 0, as padding: none), for the adapters that
    route by task (per-task adapters, soft prompts; ignored otherwise). dropout_key: the model's
    dropout in training (an adapter's); None: none."""
    dt = jnp.dtype(self.spec.dtype)
    x = adapters_lib.embed(self, "token_embed", tokens, dt,
                           adapters_lib.Context(task_ids=adapter_ids))
    if self.spec.embed_scale:  # in the compute dtype, as transformers (sqrt(d) rounded to it)
      x = x * jnp.asarray(math.sqrt(self.spec.d_model), dt)
    x = constrain(x, ("batch", "length", "act_embed"))
    graphdef, stacked = nnx.split(self.layers)
    kinds = self.spec.kinds()
    period = self.spec.period()
    grouped = period > 1 and self.spec.num_layers % period == 0

    layer_keys = None
    if dropout_key is not None and self.spec.dropout:
      layer_keys = jax.random.split(dropout_key, self.spec.num_layers)

    def run(layer, y, layer_cache, sliding, key=None):
      block = nnx.merge(graphdef, _constrain_layer(layer))
      return block(y, positions, segment_ids, layer_cache, sliding=sliding,
                   ctx=adapters_lib.Context(task_ids=adapter_ids, key=key))
    if cache is None and self.spec.remat != "none":  # per layer, also inside a pattern repeat
      run = jax.checkpoint(run, policy=_REMAT_POLICIES[self.spec.remat], prevent_cse=False,
                           static_argnums=(3,))

    def step(y, xs):
      """One scan step: one layer (kind static, or chosen by lax.cond), or one pattern repeat."""
      layer, layer_cache, is_sliding, key = xs
      if grouped:  # layer, layer_cache: [period, ...]
        caches = []
        for i in range(period):
          out = run(_index(layer, i), y, None if layer_cache is None else _index(layer_cache, i),
                    kinds[i], None if key is None else key[i])
          y, c = (out, None) if layer_cache is None else out
          caches.append(c)
        return y, None if layer_cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
      if period == 1:
        out = run(layer, y, layer_cache, kinds[0], key)
      else:
        out = jax.lax.cond(is_sliding, lambda: run(layer, y, layer_cache, True, key),
                           lambda: run(layer, y, layer_cache, False, key))
      return (out, None) if layer_cache is None else out

    sliding_flags = jnp.asarray(kinds, jnp.bool_)
    if grouped:
      groups = self.spec.num_layers // period
      stacked = _group(stacked, groups, period)
      cache = None if cache is None else _group(cache, groups, period)
      sliding_flags = sliding_flags.reshape(groups, period)
      layer_keys = None if layer_keys is None else layer_keys.reshape(groups, period)
    if cache is None:
      x, _ = jax.lax.scan(lambda y, xs: step(y, (xs[0], None, xs[1], xs[2])), x,
                          (stacked, sliding_flags, layer_keys))
      return self.final_norm(x)
    x, cache = jax.lax.scan(step, x, (stacked, cache, sliding_flags, layer_keys))
    if grouped:
      cache = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), cache)
    return self.final_norm(x), cache

  def head(self) -> tuple[jax.Array, bool]:
    """(the output projection, tied): lm_head [d, V], or the embedding [V, d] when tied."""
    if self.spec.tie_embeddings:
      return self.token_embed[...], True
    return self.lm_head[...], False

  def logits(self, x: jax.Array) -> jax.Array:
    """Hidden states [B, L, d] -> logits [B, L, V] float32 (the matmul accumulates in float32)."""
    w, tied = self.head()
    w = w.astype(x.dtype)
    spec = "bld,vd->blv" if tied else "bld,dv->blv"
    logits = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))


def init_cache(spec: ModelSpec, batch: int, length: int) -> LayerCache:
  """An empty KV cache, stacked over layers like the parameters: k, v [layers, B, S, K, H], which
  slots hold a real token [layers, B, S], and the next write index [layers] (the same for every
  row: prompts are left-padded to a common length)."""
  n = spec.num_layers
  shape = (n, batch, length, spec.num_kv_heads, spec.head_dim)
  dt = jnp.dtype(spec.dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
          "valid": jnp.zeros((n, batch, length), jnp.bool_), "index": jnp.zeros((n,), jnp.int32)}
