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
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtjax.config import ModelConfig
from mtjax.model import attention as attention_lib
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
  # LoRA (see LoraParam): adapters on the projections in lora_targets (empty: none); every
  # adapter has a leading axis of lora_tasks (the number of tasks with per-task adapters, else 1).
  lora_targets: tuple[str, ...] = ()
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_tasks: int = 1
  lora_dropout: float = 0.0
  # SVF experts (see SvfParam): on the projections in svf_targets (empty: none), svf_tasks expert
  # vectors each (the number of tasks with per-task experts, else 1).
  svf_targets: tuple[str, ...] = ()
  svf_tasks: int = 1
  # Soft prompts (model.soft_prompt): soft_prompt_len learned embeddings per task (the parameter
  # `soft_prompt` [soft_prompt_tasks, len, d_model]) that replace the embeddings of the slot tokens
  # (id soft_prompt_token) the data writes at the end of every prompt.
  soft_prompt_len: int = 0
  soft_prompt_tasks: int = 1
  soft_prompt_token: int = -1

  @classmethod
  def from_config(cls, cfg: ModelConfig, tokenizer_vocab: int, platform: str,
                  num_tasks: int = 1) -> ModelSpec:
    """num_tasks: the adapters' task axis when model.lora.per_task (else it is 1)."""
    vocab = cfg.vocab_size or -(-tokenizer_vocab // 128) * 128
    dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
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
               **lora_fields(cfg, num_tasks), **svf_fields(cfg, num_tasks),
               **soft_prompt_fields(cfg, tokenizer_vocab, num_tasks))

  @property
  def lora(self) -> bool:
    return bool(self.lora_targets)

  @property
  def svf(self) -> bool:
    return bool(self.svf_targets)

  @property
  def adapters(self) -> bool:
    """Whether only adapters train (LoRA or SVF): the base is frozen."""
    return self.lora or self.svf

  @property
  def adapter_tasks(self) -> int:
    """The adapters' task axis (1: one shared adapter)."""
    return self.svf_tasks if self.svf else self.lora_tasks

  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def without_lora(self) -> ModelSpec:
    """The base model's spec (a merged export's)."""
    return dataclasses.replace(self, lora_targets=(), lora_rank=0, lora_alpha=0.0, lora_tasks=1,
                               lora_dropout=0.0, svf_targets=(), svf_tasks=1)

  without_adapters = without_lora

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


def lora_fields(cfg: ModelConfig, num_tasks: int = 1) -> dict:
  lora = cfg.lora
  if not lora.targets:
    return {}
  return {"lora_targets": tuple(lora.targets), "lora_rank": lora.rank, "lora_alpha": lora.alpha,
          "lora_tasks": max(1, num_tasks) if lora.per_task else 1, "lora_dropout": lora.dropout}


def svf_fields(cfg: ModelConfig, num_tasks: int = 1) -> dict:
  svf = cfg.svf
  if not svf.enabled:
    return {}
  return {"svf_targets": tuple(svf.targets),
          "svf_tasks": max(1, num_tasks) if svf.per_task else 1}


def soft_prompt_fields(cfg: ModelConfig, tokenizer_vocab: int, num_tasks: int = 1) -> dict:
  """The slot token is the first id past the tokenizer's vocabulary (data.tokenizer.with_soft_prompt)."""
  if not cfg.soft_prompt.length:
    return {}
  return {"soft_prompt_len": cfg.soft_prompt.length, "soft_prompt_tasks": max(1, num_tasks),
          "soft_prompt_token": tokenizer_vocab}


def is_soft_prompt_path(path: str) -> bool:
  return path.split("/")[-1] == "soft_prompt"


def soft_prompt_embeddings(table: jax.Array, tokens: jax.Array, task_ids: jax.Array,
                           slot_token: int) -> tuple[jax.Array, jax.Array]:
  """(is_slot [B, L], each token's soft-prompt row [B, L, d]) for soft prompts `table` [T, P, d].
  A run of slot tokens ends right before its example's target, so a slot's row is P minus its
  distance to the run's end: the last slot always reads row P - 1, also when a prompt_left cut
  removed the first slots. Tokens of a task without a row (padding: < 0) read row 0 of task 0,
  and are never slots."""
  tasks, length, _ = table.shape
  is_slot = tokens == slot_token
  idx = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
  run_end = jax.lax.cummin(jnp.where(is_slot, tokens.shape[-1], idx), axis=tokens.ndim - 1,
                           reverse=True)
  row = jnp.clip(length - (run_end - idx), 0, length - 1)
  task = jnp.clip(task_ids, 0, tasks - 1)
  is_slot = is_slot & (task_ids >= 0) & (task_ids < tasks)
  return is_slot, table[task, row]


LORA_TARGET_IDS = {t: i for i, t in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}


class LoraParam(nnx.Param):
  """A LoRA adapter matrix: `<target>_lora_a` [T, *in, r] and `<target>_lora_b` [T, r, *out] beside
  the projection `<target>` [*in, *out] (T: lora_tasks). The projection becomes
  W + (alpha / r) A[t] B[t] for a token of adapter t; B starts at zero, so the model starts equal
  to its base. Optimizers and exports find adapters by the `_lora_a` / `_lora_b` path suffix."""


def is_lora_path(path: str) -> bool:
  return path.endswith(("_lora_a", "_lora_b"))


class SvfParam(nnx.Param):
  """An SVF expert (Sun et al. 2025; mtjax.model.svf) on the projection `<target>` [*in, *out]:
  its thin SVD, frozen, `<target>_svf_u` [*in, r], `<target>_svf_s` [r], `<target>_svf_vt`
  [r, *out] (r = min(prod(in), prod(out)); computed from the base weights once, stored with the
  checkpoint), and the trained logits `<target>_svf_p` [T, r]. A token of expert t sees
  W'_t = U diag(S z_t) V^T sum(S) / sum(S z_t), z_t = sigmoid(p_t), computed as
  W + U diag(S z_t k_t - S) V^T so tokens without an expert see W itself."""


SVF_BASIS = ("_svf_u", "_svf_s", "_svf_vt")


def is_svf_basis_path(path: str) -> bool:
  return path.endswith(SVF_BASIS)


def is_adapter_path(path: str) -> bool:
  """The trained parameters of an adapter run (LoRA's A and B, SVF's p); the rest is frozen."""
  return path.endswith(("_lora_a", "_lora_b", "_svf_p"))


def svf_basis(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(U [*in, r], S [r], V^T [r, *out]) of one projection [*in, *out], in float32."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  u, s, vt = jnp.linalg.svd(w.astype(jnp.float32).reshape(math.prod(in_shape), -1),
                            full_matrices=False)
  r = s.shape[0]
  return u.reshape(*in_shape, r), s, vt.reshape(r, *out_shape)


def _svf_experts(module: nnx.Module, rngs: nnx.Rngs, spec: ModelSpec, target: str,
                 in_axes: tuple[str, ...], out_axes: tuple[str, ...]) -> None:
  """Adds target's SVF basis and expert logits to `module` when spec targets it (the basis from
  the projection's current value: a fresh init's; a loaded base's is recomputed at load)."""
  if target not in spec.svf_targets:
    return
  w = getattr(module, target)[...]
  u, s, vt = svf_basis(w, len(in_axes))
  r = s.shape[0]
  setattr(module, f"{target}_svf_u", SvfParam(u, logical_axes=(*in_axes, "svf_rank")))
  setattr(module, f"{target}_svf_s", SvfParam(s, logical_axes=("svf_rank",)))
  setattr(module, f"{target}_svf_vt", SvfParam(vt, logical_axes=("svf_rank", *out_axes)))
  p = 0.1 + 0.01 * jax.random.normal(rngs.params(), (spec.svf_tasks, r), jnp.float32)
  setattr(module, f"{target}_svf_p", SvfParam(p, logical_axes=("lora_task", "svf_rank")))


def svf_coefficients(s: jax.Array, p: jax.Array) -> jax.Array:
  """S z k - S per expert [..., T, r]: W'_t - W = U diag(this) V^T (z = sigmoid(p), k = sum(S) /
  sum(S z), batched over leading axes)."""
  return svf_coefficients_of_z(s, jax.nn.sigmoid(p.astype(jnp.float32)))


def svf_coefficients_of_z(s: jax.Array, z: jax.Array) -> jax.Array:
  s = s.astype(jnp.float32)[..., None, :]
  scaled = s * z
  return scaled * (jnp.sum(s, -1, keepdims=True) / jnp.sum(scaled, -1, keepdims=True)) - s


def _svf_delta(module: nnx.Module, target: str, x: jax.Array, n_in: int,
               mix: jax.Array | None) -> jax.Array | None:
  """x U diag(c) V^T of `target`'s SVF experts, c = each token's expert's coefficients (a
  one-hot `mix` [B, L, T] of them; none: zeros; None: the one shared expert); None without SVF."""
  p_var = getattr(module, f"{target}_svf_p", None)
  if p_var is None:
    return None
  dt = x.dtype
  u, vt = getattr(module, f"{target}_svf_u")[...].astype(dt), getattr(module, f"{target}_svf_vt")[...].astype(dt)
  coef = svf_coefficients(getattr(module, f"{target}_svf_s")[...], p_var[...]).astype(dt)  # [T, r]
  i, o = "defg"[:n_in], "uvwz"[:vt.ndim - 1]
  xu = jnp.einsum(f"bl{i},{i}r->blr", x, u)
  c = coef[0] if mix is None or coef.shape[0] == 1 else jnp.einsum("blt,tr->blr", mix.astype(dt), coef)
  return jnp.einsum(f"blr,r{o}->bl{o}", xu * c, vt)


def _lora_pair(module: nnx.Module, rngs: nnx.Rngs, spec: ModelSpec, target: str,
               in_shape: tuple[int, ...], in_axes: tuple[str, ...], out_shape: tuple[int, ...],
               out_axes: tuple[str, ...]) -> None:
  """Adds target's adapters to `module` when spec targets it (sharded like the base: its in and
  out axes; the task and rank axes replicated)."""
  if target not in spec.lora_targets:
    return
  t, r, pd = spec.lora_tasks, spec.lora_rank, spec.param_dtype
  a = jax.random.normal(rngs.params(), (t, *in_shape, r), jnp.float32) / math.sqrt(math.prod(in_shape))
  setattr(module, f"{target}_lora_a", LoraParam(a.astype(pd), logical_axes=("lora_task", *in_axes, "lora_rank")))
  setattr(module, f"{target}_lora_b", LoraParam(jnp.zeros((t, r, *out_shape), pd),
                                                logical_axes=("lora_task", "lora_rank", *out_axes)))


def _lora_delta(module: nnx.Module, target: str, x: jax.Array, n_in: int,
                mix: jax.Array | None, scale: float, key: jax.Array | None = None,
                rate: float = 0.0) -> jax.Array | None:
  """(alpha / r) x A B of `target`'s adapters (None when it has none). x [B, L, *in]; mix
  [B, L, T] one-hot of each token's adapter (None: the one shared adapter, T = 1); key: dropout
  of the adapter's input at `rate` (training)."""
  a_var = getattr(module, f"{target}_lora_a", None)
  if a_var is None:  # SVF experts instead (never both), or no adapter
    return _svf_delta(module, target, x, n_in, mix)
  dt = x.dtype
  if key is not None and rate > 0:
    key = jax.random.fold_in(key, LORA_TARGET_IDS[target])
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - rate, dt), jnp.zeros((), dt))
  a, b = a_var[...].astype(dt), getattr(module, f"{target}_lora_b")[...].astype(dt)
  i, o = "defg"[:n_in], "uvwz"[:b.ndim - 2]
  if mix is None or a.shape[0] == 1:
    xa = jnp.einsum(f"bl{i},{i}r->blr", x, a[0])
    out = jnp.einsum(f"blr,r{o}->bl{o}", xa, b[0])
  else:
    xa = jnp.einsum(f"bl{i},t{i}r->bltr", x, a) * mix.astype(dt)[..., None]
    out = jnp.einsum(f"bltr,tr{o}->bl{o}", xa, b)
  return out * jnp.asarray(scale, dt)


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
  return y if delta is None else y + delta


def _param(rngs: nnx.Rngs, shape, axes, stddev: float, dtype: str) -> nnx.Param:
  value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


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
    self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), 1 / math.sqrt(d), pd)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1 / math.sqrt(d), pd)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1 / math.sqrt(d), pd)
    out_std = 1 / math.sqrt(n * h) / math.sqrt(2 * spec.num_layers)
    self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pd)
    for x, kv in (("q", False), ("k", True), ("v", True)):
      _lora_pair(self, rngs, spec, x, (d,), ("embed",), (k if kv else n, h),
                 ("kv_heads" if kv else "heads", "head_dim"))
    _lora_pair(self, rngs, spec, "o", (n, h), ("heads", "head_dim"), (d,), ("embed",))
    for x, kv in (("q", False), ("k", True), ("v", True)):
      _svf_experts(self, rngs, spec, x, ("embed",), ("kv_heads" if kv else "heads", "head_dim"))
    _svf_experts(self, rngs, spec, "o", ("heads", "head_dim"), ("embed",))
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
               lora_mix: jax.Array | None = None,
               lora_key: jax.Array | None = None) -> jax.Array: ...
  @overload
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache, *, sliding: bool | None = None,
               lora_mix: jax.Array | None = None,
               lora_key: jax.Array | None = None) -> tuple[jax.Array, LayerCache]: ...

  def __call__(self, x, positions, segment_ids, cache=None, *, sliding=None, lora_mix=None,
               lora_key=None):
    """`sliding`: whether this layer is a sliding one (see ModelSpec.kinds); None: the first
    layer's kind (every layer alike)."""
    sliding = self.spec.kinds()[0] if sliding is None else sliding
    dt = x.dtype
    scale = self.spec.lora_scale() if self.spec.lora else 0.0
    rate = self.spec.lora_dropout
    q = jnp.einsum("bld,dnh->blnh", x, self.q[...].astype(dt))
    k = jnp.einsum("bld,dkh->blkh", x, self.k[...].astype(dt))
    v = jnp.einsum("bld,dkh->blkh", x, self.v[...].astype(dt))
    q = _plus(q, _lora_delta(self, "q", x, 1, lora_mix, scale, lora_key, rate))
    k = _plus(k, _lora_delta(self, "k", x, 1, lora_mix, scale, lora_key, rate))
    v = _plus(v, _lora_delta(self, "v", x, 1, lora_mix, scale, lora_key, rate))
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
    out = jnp.einsum("blnh,nhd->bld", y, self.o[...].astype(dt))
    out = _plus(out, _lora_delta(self, "o", y, 2, lora_mix, scale, lora_key, rate))
    if self.spec.out_bias:
      out = out + self.o_bias[...].astype(dt)
    return out if cache is None else (out, cache)


class MLP(nnx.Module):

  def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
    d, f, pd = spec.d_model, spec.mlp_dim, spec.param_dtype
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), 1 / math.sqrt(d), pd)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), 1 / math.sqrt(d), pd)
    self.down = _param(rngs, (f, d), ("mlp", "embed"),
                       1 / math.sqrt(f) / math.sqrt(2 * spec.num_layers), pd)
    self.activation = spec.activation
    self.lora_scale = spec.lora_scale() if spec.lora else 0.0
    self.lora_dropout = spec.lora_dropout
    _lora_pair(self, rngs, spec, "gate", (d,), ("embed",), (f,), ("mlp",))
    _lora_pair(self, rngs, spec, "up", (d,), ("embed",), (f,), ("mlp",))
    _lora_pair(self, rngs, spec, "down", (f,), ("mlp",), (d,), ("embed",))
    _svf_experts(self, rngs, spec, "gate", ("embed",), ("mlp",))
    _svf_experts(self, rngs, spec, "up", ("embed",), ("mlp",))
    _svf_experts(self, rngs, spec, "down", ("mlp",), ("embed",))

  def __call__(self, x, lora_mix: jax.Array | None = None, lora_key: jax.Array | None = None):
    dt, s, k, p = x.dtype, self.lora_scale, lora_key, self.lora_dropout
    gate = _plus(x @ self.gate[...].astype(dt), _lora_delta(self, "gate", x, 1, lora_mix, s, k, p))
    act = (jax.nn.silu(gate) if self.activation == "silu"
           else jax.nn.gelu(gate, approximate=True))  # gelu_tanh: transformers' gelu_pytorch_tanh
    h = act * _plus(x @ self.up[...].astype(dt), _lora_delta(self, "up", x, 1, lora_mix, s, k, p))
    h = constrain(h, ("batch", "length", "act_mlp"))
    return _plus(h @ self.down[...].astype(dt), _lora_delta(self, "down", h, 1, lora_mix, s, k, p))


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
               lora_mix: jax.Array | None = None,
               lora_key: jax.Array | None = None) -> jax.Array: ...
  @overload
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache, *, sliding: bool | None = None,
               lora_mix: jax.Array | None = None,
               lora_key: jax.Array | None = None) -> tuple[jax.Array, LayerCache]: ...

  def __call__(self, x, positions, segment_ids, cache=None, *, sliding=None, lora_mix=None,
               lora_key=None):
    attn = self.attn(self.attn_norm(x), positions, segment_ids, cache, sliding=sliding,
                     lora_mix=lora_mix,
                     lora_key=None if lora_key is None else jax.random.fold_in(lora_key, 0))
    if cache is not None:
      attn, cache = attn
    if self.post_norms:
      attn = self.post_attn_norm(attn)
    x = x + attn
    mlp = self.mlp(self.mlp_norm(x), lora_mix,
                   None if lora_key is None else jax.random.fold_in(lora_key, 1))
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
                              embed_std, pd)
    if spec.soft_prompt_len:  # initialized like the embedding rows they stand in for
      self.soft_prompt = _param(rngs, (spec.soft_prompt_tasks, spec.soft_prompt_len, spec.d_model),
                                ("lora_task", "soft_prompt", "embed"), embed_std, pd)
    self.layers = _stacked_blocks(spec, rngs)
    self.final_norm = RMSNorm(spec.d_model, spec.norm_eps, pd, spec.norm_plus_one)
    if not spec.tie_embeddings:
      self.lm_head = _param(rngs, (spec.d_model, spec.vocab_size), ("embed", "vocab"),
                            1 / math.sqrt(spec.d_model), pd)

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

    adapter_ids [B, L] int: each token's LoRA adapter (its task id; < 0, as padding: none), needed
    with per-task adapters (spec.lora_tasks > 1) and ignored otherwise. dropout_key: LoRA
    dropout (spec.lora_dropout) in training; None: none."""
    dt = jnp.dtype(self.spec.dtype)
    x = jnp.take(self.token_embed[...], tokens, axis=0).astype(dt)
    if self.spec.soft_prompt_len:
      if adapter_ids is None:
        raise ValueError("soft prompts need adapter_ids (each token's task id)")
      is_slot, soft = soft_prompt_embeddings(self.soft_prompt[...], tokens, adapter_ids,
                                             self.spec.soft_prompt_token)
      x = jnp.where(is_slot[..., None], soft.astype(dt), x)
    if self.spec.embed_scale:  # in the compute dtype, as transformers (sqrt(d) rounded to it)
      x = x * jnp.asarray(math.sqrt(self.spec.d_model), dt)
    x = constrain(x, ("batch", "length", "act_embed"))
    graphdef, stacked = nnx.split(self.layers)
    kinds = self.spec.kinds()
    period = self.spec.period()
    grouped = period > 1 and self.spec.num_layers % period == 0

    lora_mix = None
    if self.spec.adapter_tasks > 1:
      if adapter_ids is None:
        raise ValueError("per-task adapters need adapter_ids (each token's task id)")
      # A token of no adapter's task (-1 padding, an id >= the adapters'): all zero, the base.
      lora_mix = jax.nn.one_hot(adapter_ids, self.spec.adapter_tasks, dtype=dt)

    layer_keys = None
    if dropout_key is not None and self.spec.lora and self.spec.lora_dropout > 0:
      layer_keys = jax.random.split(dropout_key, self.spec.num_layers)

    def run(layer, y, layer_cache, sliding, key=None):
      block = nnx.merge(graphdef, _constrain_layer(layer))
      return block(y, positions, segment_ids, layer_cache, sliding=sliding, lora_mix=lora_mix,
                   lora_key=key)
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
