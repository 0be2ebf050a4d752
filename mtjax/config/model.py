"""The model's config group (model.*): the decoder's shape and family switches, a pretrained
directory, and the adapters (model.lora, model.svf, model.soft_prompt); its checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mtjax.errors import BadInputError

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the projections named in `targets` (none: LoRA off). With LoRA on the
  base parameters are frozen (no optimizer state); only the adapters train. Every adapter has a
  leading task axis: [num_tasks, ...] with per_task (a token uses its task's adapter), else [1, ...]."""

  rank: int = 8
  alpha: float = 16.0  # the update is scaled by alpha / rank
  targets: tuple[str, ...] = ()  # any of q, k, v, o, gate, up, down; () : LoRA off
  dropout: float = 0.0  # on the adapter's input, in training
  per_task: bool = False
  # The low-rank adapter kind (mtjax.model.adapters.KINDS, those reading model.lora): lora | dora
  # (weight-decomposed LoRA: a trained magnitude per output row over the normalized W + BA).
  kind: str = "lora"


SVF_TARGETS = LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class SvfConfig:
  """Singular-value fine-tuning experts (Transformer-squared, Sun et al. 2025): each target matrix
  W = U S V^T (its SVD, computed once from the base and stored with the checkpoint) is adapted by
  an expert vector z = sigmoid(p) per task: W' = U diag(S z) V^T sum(S) / sum(S z). The base is
  frozen; only p trains, at `lr` (on optimizer.schedule's shape). With per_task a token uses its
  task's expert (tokens of tasks without one see the base); else one shared expert.
  Not with model.lora (one adapter kind per run)."""

  enabled: bool = False
  targets: tuple[str, ...] = ("gate", "up", "down")  # any of q, k, v, o, gate, up, down
  per_task: bool = True
  lr: float = 2e-3  # the paper's; replaces optimizer.lr for the run (p is all that trains)


@dataclasses.dataclass(frozen=True)
class SoftPromptConfig:
  """Soft prompts (Lester et al. 2021), the fast context of fast/slow training: `length` learned
  embeddings per task, [num_tasks, length, d_model]. The data writes `length` slot tokens (a spare
  token id past the tokenizer's vocabulary) at the end of every prompt, right before the target;
  the model replaces a slot's embedding by its task's row, so a task's soft prompt reaches only
  its own examples. They train at optimizer.lr; the rest at optimizer.lr * slow_lr_ratio."""

  length: int = 0  # 0: none


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 512
  head_dim: int = 0  # 0: d_model // num_heads
  vocab_size: int = 0  # 0: the tokenizer's, rounded up to a multiple of 128
  dtype: str = "auto"  # compute dtype: auto (float32 on CPU, bfloat16 elsewhere) | float32 | bfloat16
  # Rematerialization of the scanned layer body: none | full (save nothing) | dots (save the
  # projections' outputs) | minimal (save every matmul's output, recompute only elementwise work)
  remat: str = "none"
  # reference (jax.nn.dot_product_attention, segment-aware causal mask) | splash (TPU) |
  # cudnn | triton (NVIDIA GPU) | auto (the platform's kernel; reference where none fits)
  attention: str = "reference"
  tie_embeddings: bool = False
  z_loss: float = 0.0
  rope_theta: float = 10_000.0
  rope_type: str = "default"  # default | linear | llama3 (Llama 3.1+ long-context scaling)
  rope_scaling: Mapping[str, float] = dataclasses.field(default_factory=dict)  # its parameters
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  out_bias: bool = False  # a bias on the attention output projection (Llama attention_bias)
  qk_norm: bool = False  # RMSNorm of every query and key head before RoPE (Qwen3)
  sliding_window: int = 0  # 0: full causal attention; W: a token sees the last W tokens (Mistral)
  # Per layer, "sliding_attention" (the window above) or "full_attention" (Gemma 3); (): every
  # layer is windowed when sliding_window > 0.
  layer_types: tuple[str, ...] = ()
  rope_local_theta: float = 0.0  # the sliding layers' RoPE base (default type); 0: as every layer
  activation: str = "silu"  # the gated MLP's: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w initialized to 0 (Gemma)
  post_norms: bool = False  # RMSNorm of the attention and MLP outputs too: four per block (Gemma 3)
  embed_scale: bool = False  # the embedding times sqrt(d_model), in the compute dtype (Gemma)
  query_pre_attn_scalar: float = 0.0  # scores scaled by its ** -0.5 (Gemma); 0: head_dim ** -0.5
  param_dtype: str = "float32"  # float32 | bfloat16: how parameters are stored and updated
  # An HF directory (local or gs://): config.json, *.safetensors, tokenizer files. The fields
  # above then come from its config.json, the initial weights from its safetensors and, unless
  # data.tokenizer is given on the command line, the tokenizer from its tokenizer.json.
  pretrained: str = ""
  # Dotted keys given on the command line (filled by config.load): with model.pretrained, these
  # may not differ from the directory's values (a conflict is exit 2 naming both).
  pinned: tuple[str, ...] = ()
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  svf: SvfConfig = dataclasses.field(default_factory=SvfConfig)
  soft_prompt: SoftPromptConfig = dataclasses.field(default_factory=SoftPromptConfig)


DTYPES = ("auto", "float32", "bfloat16")
REMAT = ("none", "full", "dots", "minimal")
ATTENTION = ("auto", "reference", "cudnn", "splash", "triton")
PARAM_DTYPES = ("float32", "bfloat16")
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings")}
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = ("silu", "gelu_tanh")


def check(m: ModelConfig) -> None:
  for field, value in (("d_model", m.d_model), ("num_layers", m.num_layers),
                       ("num_heads", m.num_heads), ("num_kv_heads", m.num_kv_heads),
                       ("mlp_dim", m.mlp_dim)):
    if value <= 0:
      raise BadInputError(f"model.{field}", f"expected a positive integer, got {value}")
  for field, value in (("head_dim", m.head_dim), ("vocab_size", m.vocab_size), ("z_loss", m.z_loss)):
    if value < 0:
      raise BadInputError(f"model.{field}", f"expected a value >= 0, got {value}")
  for field, value, allowed in (("dtype", m.dtype, DTYPES), ("remat", m.remat, REMAT),
                                ("attention", m.attention, ATTENTION),
                                ("param_dtype", m.param_dtype, PARAM_DTYPES),
                                ("rope_type", m.rope_type, tuple(ROPE_SCALING_KEYS))):
    if value not in allowed:
      raise BadInputError(f"model.{field}", f"expected one of {', '.join(allowed)}, got {value!r}")
  needed = ROPE_SCALING_KEYS[m.rope_type]
  if sorted(m.rope_scaling) != sorted(needed):
    raise BadInputError("model.rope_scaling", f"rope_type {m.rope_type!r} takes "
                        f"{list(needed) or 'no parameters'}, got {dict(m.rope_scaling)}")
  if m.sliding_window < 0:
    raise BadInputError("model.sliding_window", f"expected 0 (off) or a window >= 1, got "
                        f"{m.sliding_window}")
  if m.layer_types and len(m.layer_types) != m.num_layers:
    raise BadInputError("model.layer_types", f"expected one per layer ({m.num_layers}), got "
                        f"{len(m.layer_types)}")
  for kind in m.layer_types:
    if kind not in LAYER_TYPES:
      raise BadInputError("model.layer_types", f"expected each one of {', '.join(LAYER_TYPES)}, "
                          f"got {kind!r}")
  if m.activation not in ACTIVATIONS:
    raise BadInputError("model.activation", f"expected one of {', '.join(ACTIVATIONS)}, got "
                        f"{m.activation!r}")
  if m.rope_local_theta < 0 or m.query_pre_attn_scalar < 0:
    raise BadInputError("model.rope_local_theta" if m.rope_local_theta < 0
                        else "model.query_pre_attn_scalar", "expected a value >= 0 (0: off)")
  if m.num_heads % m.num_kv_heads:
    raise BadInputError("model.num_kv_heads",
                        f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise BadInputError("model.num_heads",
                        f"must divide model.d_model={m.d_model} (or set model.head_dim)")
  if (m.head_dim or m.d_model // m.num_heads) % 2:
    raise BadInputError("model.head_dim", "RoPE needs an even head dimension")
  for field, value in (("norm_eps", m.norm_eps), ("rope_theta", m.rope_theta)):
    if value <= 0:
      raise BadInputError(f"model.{field}", f"expected a value > 0, got {value}")
  _check_lora(m.lora, 0 if m.pretrained else m.d_model)  # pretrained: at resolve
  _check_svf(m.svf)
  if m.soft_prompt.length < 0:
    raise BadInputError("model.soft_prompt.length", f"expected a count of virtual tokens >= 0, "
                        f"got {m.soft_prompt.length}")


def _check_lora(lora: LoraConfig, d_model: int) -> None:
  if lora.rank <= 0:
    raise BadInputError("model.lora.rank", f"expected a positive integer, got {lora.rank}")
  if lora.targets and d_model and lora.rank > d_model:  # above full rank: nothing low-rank
    raise BadInputError("model.lora.rank", f"{lora.rank} is more than model.d_model "
                        f"{d_model} (a rank above the projections' smaller side adds nothing)")
  if lora.alpha <= 0:
    raise BadInputError("model.lora.alpha", f"expected a value > 0, got {lora.alpha}")
  _check_targets("model.lora.targets", lora.targets, LORA_TARGETS)
  if not 0 <= lora.dropout < 1:
    raise BadInputError("model.lora.dropout", f"expected 0 <= dropout < 1, got {lora.dropout}")
  if not lora.kind:  # which kinds exist is the model's registry's to say (at setup)
    raise BadInputError("model.lora.kind", "expected an adapter kind, e.g. lora or dora")


def _check_svf(svf: SvfConfig) -> None:
  if not svf.enabled:
    return
  if not svf.targets:
    raise BadInputError("model.svf.targets", "expected at least one projection")
  _check_targets("model.svf.targets", svf.targets, SVF_TARGETS)
  if not svf.lr > 0:
    raise BadInputError("model.svf.lr", f"expected a learning rate > 0, got {svf.lr}")


def _check_targets(field: str, targets: tuple[str, ...], allowed: tuple[str, ...]) -> None:
  for target in targets:
    if target not in allowed:
      raise BadInputError(field, f"expected each one of {', '.join(allowed)}, got {target!r}")
  if len(set(targets)) != len(targets):
    raise BadInputError(field, f"expected each target once, got {list(targets)}")
