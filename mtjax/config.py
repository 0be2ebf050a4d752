"""Typed run configuration: load a `get_config()` file, apply overrides, validate once.

Config files are Python (ml_collections), as in Flax examples and big_vision:

    def get_config(arg=None) -> ml_collections.ConfigDict

`load("configs/demo.py:tiny", ["--config.model.d_model=64"])` imports the file, calls
`get_config("tiny")`, writes it over the defaults (a file sets only what differs), applies the
dotted overrides, and validates types and values into the frozen dataclasses below. Every problem
is a `BadInputError` naming the field, raised at start-up, never at step 5,000.

This module is a leaf: checks that need the task registry or files (task names, tokenizer files,
mixtures) run once at run start in `mtjax.resolve.resolve(config)`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from mtjax.errors import BadInputError

FLOAT32_MAX = 3.4028234663852886e38

# An entropy coefficient is a constant, or (start, end) interpolated linearly over train.steps.
EntropyCoef = float | tuple[float, float]


def _frozen_mapping(d: Mapping[str, Any]) -> Mapping[str, Any]:
  return types.MappingProxyType(dict(d))


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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  dcn: int = 1  # slices (multi-slice TPU pods): the outer data-parallel axis over the DCN network
  data: int = 1
  fsdp: int = -1  # -1: the rest of the devices
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class JsonlTaskConfig:
  """A task from JSONL files, registered by the config alone (no Python): one object per line;
  the prompt is instruction + prompt field, the target the target field, and every other field of
  a record is the example's metadata (its scorer reads it: alternative answers, function docs)."""

  train: str | tuple[str, ...] = ()  # a path or a list of paths (local or gs://)
  validation: str | tuple[str, ...] = ()
  prompt_field: str = "input"
  target_field: str = "target"
  instruction_field: str = "instruction"  # read when a record has it ...
  instruction: str = ""  # ... else this text starts every prompt
  scorer: str = "exact_match"  # a registered scorer (mtjax.tasks.scoring)
  eval_only: bool = False  # held out from training (a benchmark): see data.allow_eval_only


MIXING_METHODS = ("none", "odm")


@dataclasses.dataclass(frozen=True)
class MixingConfig:
  """Online data mixing: sampling rates fed back to the loader (mtjax.train.mixing). Static
  temperature-scaled rates are data.rates=examples_proportional with data.rate_temperature."""

  method: str = "none"  # none | odm (Albalak et al. 2023: an EXP3 bandit over tasks)
  every: int = 10  # steps between decisions; the reward is each task's loss over those steps
  smoothing: float = 0.9  # ODM's alpha: R_t <- alpha R_t + (1 - alpha) L_t / rate_t


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture_name: str = ""  # a registered Mixture: fills data.tasks and data.mixture when given
  tasks: tuple[str, ...] = ()
  mixture: Mapping[str, float] = dataclasses.field(default_factory=dict)  # sampling weights
  rates: str = "explicit"  # explicit (data.mixture) | examples_proportional
  rate_temperature: float = 1.0  # examples_proportional: min(n * scale, cap) ** (1 / temperature)
  rate_cap: int = 0  # 0: no cap
  rate_scale: float = 1.0
  schedule: str = "constant"  # constant | stages | linear (interpolates between stages)
  stages: tuple[tuple[int, Mapping[str, float]], ...] = ()  # ((start_step, {task: weight}), ...)
  batch_size: int = 32  # global, in packed rows
  seq_len: int = 128
  tokenizer: str = "byte"
  # plain: [BOS] prompt target [EOS]; chat: the prompt as a user turn through the tokenizer's chat
  # template (with the generation prompt), then target + the template's end-of-turn text.
  format: str = "plain"
  prefetch: int = 2
  # Processes that materialize the rows the main process planned (0: in the main process);
  # batches and the loader state are the same for any count.
  workers: int = 0
  on_bad_record: str = "stop"  # stop | skip (and count in data/<task>/skipped)
  # Rates and weights a hook decides once s steps are done apply from step s + feedback_lag, so
  # prefetched batches never disagree with them and a resumed run replays the same stream.
  feedback_lag: int = 3
  # Instruction ablation, per task, in training and eval: keep | empty | misleading (per example,
  # another task's instruction drawn from a pool) | wrong (the next task's, one-to-one).
  instructions: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # An example longer than seq_len: prompt_left keeps the target whole and cuts the prompt from
  # the left; right keeps the first seq_len tokens; skip drops it. An example that would keep no
  # target token is skipped and counted (data/<task>/too_long), never trained with zero loss.
  truncate: str = "prompt_left"
  # Tasks defined by the config alone: {name: JsonlTaskConfig fields}; registered at run start.
  jsonl_tasks: Mapping[str, JsonlTaskConfig] = dataclasses.field(default_factory=dict)
  # Train on eval-only tasks (benchmarks such as BFCL): refused unless set (contamination).
  allow_eval_only: bool = False
  mixing: MixingConfig = dataclasses.field(default_factory=MixingConfig)


# The weighting methods, once: name -> "module:Class" of its implementation (mtjax.train.weighting
# imports it when a run uses it; this module stays free of JAX). A new method: its module there
# and one line here.
WEIGHTING_METHODS: Mapping[str, str] = _frozen_mapping({
    "static": "mtjax.train.weighting.static:Static",
    "uncertainty": "mtjax.train.weighting.uncertainty:Uncertainty",
    "dwa": "mtjax.train.weighting.dwa:DWA",
    "famo": "mtjax.train.weighting.famo:FAMO",
    "pcgrad": "mtjax.train.weighting.pcgrad:PCGrad",
    "mgda": "mtjax.train.weighting.mgda:MGDA",
    "dbmtl": "mtjax.train.weighting.dbmtl:DBMTL",
    "imtl_l": "mtjax.train.weighting.imtl_l:IMTLL",
})


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
  """Adaptive per-task loss weighting inside the step (mtjax.train.weighting); its state lives in
  TrainState.extra["weighting"]. Adaptive weights multiply train.loss_weights."""

  # a key of WEIGHTING_METHODS: static | uncertainty | dwa | famo (loss-based, O(T)) | pcgrad |
  # mgda | dbmtl (per-task gradients: T backward passes, memory grows with T; research mode)
  method: str = "static"
  lr: float = 0.025  # uncertainty's log-variances and FAMO's logits: their own Adam
  weight_decay: float = 0.001  # FAMO's logits
  temperature: float = 2.0  # DWA's tau
  ema: float = 0.9  # DWA: the loss EMA's decay; DB-MTL: the gradient EMA's beta
  beta_sigma: float = 0.5  # DB-MTL: the EMA decay at its k-th update is ema / k ** beta_sigma
  min_loss: float = 0.0  # FAMO's lower bound m_t on every task's loss
  solver_iters: int = 250  # MGDA: Frank-Wolfe iterations (more than two tasks; MinNormSolver's cap)


@dataclasses.dataclass(frozen=True)
class InstructionSearchConfig:
  """The discrete fast channel (mtjax.recipes.fast_context): every `every` steps one round of an
  evolutionary search over each task's instruction, scored with the current params on the task's
  first `examples` held-out examples; the best is fed to training and eval. 0: off."""

  every: int = 0
  examples: int = 16  # per task: the validation split's first (a study's tuning split)
  population: int = 8  # texts kept per task
  elite: int = 2  # parents of a round's mutations
  mutations: int = 4  # new texts scored per task per round


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  log_every: int = 10
  loss_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # default 1.0
  entropy_coefs: Mapping[str, EntropyCoef] = dataclasses.field(default_factory=dict)  # default 0
  max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops
  # Multi-process runs agree on a stop signal every this many steps (an all-gather of the flags,
  # which waits for the step in flight; JAX's preemption sync point is asked every step).
  preemption_every: int = 10
  progress: bool = True
  # The loss is computed over chunks of this many tokens (of the whole batch) against the output
  # head, so [batch, length, vocab] float32 logits never exist at once; 0: all at once (dense).
  loss_chunk: int = 1024
  weighting: WeightingConfig = dataclasses.field(default_factory=WeightingConfig)
  instruction_search: InstructionSearchConfig = dataclasses.field(default_factory=InstructionSearchConfig)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-3
  schedule: str = "cosine"  # after linear warmup: cosine | constant | wsd (warmup-stable-decay)
  warmup_steps: int = 20
  decay_steps: int = 0  # 0: train.steps (the schedule's length, fixed at a run's first start)
  decay_fraction: float = 0.1  # wsd: the last fraction of decay_steps decays linearly to min_lr
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  grad_accum: int = 1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  # Parameter groups: regex on the parameter path ("layers/attn/q") -> LR multiplier; the first
  # match wins, unmatched parameters use 1.0, and 0.0 freezes (no optimizer state is kept).
  param_groups: Mapping[str, float] = dataclasses.field(default_factory=dict)
  ema: float = 0.0  # decay of an exponential moving average of the weights (0: none)
  # Fast/slow training (with model.soft_prompt): the fast weights (the soft prompts) train at lr,
  # the slow ones (every other parameter) at lr * slow_lr_ratio; the fast weights update on steps
  # s with s % fast_every == 0, the slow ones on steps with s % slow_every == 0 (each group's
  # Adam moments only move on its own steps). slow_lr_ratio 0 freezes the slow weights (fast
  # only); fast_every 0 freezes the fast ones (slow only, beside fixed soft prompts).
  slow_lr_ratio: float = 1.0
  fast_every: int = 1
  slow_every: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # 0: only at the end
  keep: int = 3  # the latest K are kept ...
  best_metric: str = ""  # ... and also the best by this logged metric (e.g. "train/loss")
  best_mode: str = "min"  # min | max
  keep_best: int = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 0  # 0: never during training (mtjax eval still works on checkpoints)
  steps: tuple[int, ...] = ()  # more eval steps besides every eval.every (e.g. log-spaced, early)
  tasks: tuple[str, ...] = ()  # default: every task of the run
  num_examples: int = 64  # held-out examples per task for teacher-forced loss/entropy/accuracy
  num_generate: int = 32  # held-out prompts per task decoded greedily (accuracy by its scorer)
  sample_prompts: int = 8  # prompts per task sampled num_samples times (pass@k, distinct, entropy)
  num_samples: int = 4  # 0: no sampling metrics
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # Tokens generated per prompt: "auto" (each task's longest held-out target, in tokens, plus
  # EOS, capped by the room left after the prompt) or a number for every task.
  max_new_tokens: int | str = "auto"
  batch_size: int = 16  # rows per eval/generation batch
  # Held-out examples skipped before the evaluated ones: a study's tuning split is the first
  # study.tuning_examples of each task's validation split, its reported numbers come after them.
  skip: int = 0
  # eval/<task>/kl_drift: KL(model || the run's starting model) per held-out teacher-forced token
  # (the fixed probe set). Keeps a copy of the starting params (TrainState.extra["reference"],
  # checkpointed, so a resumed run measures against the same start). Not with model.lora/svf.
  drift: bool = False


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Settings of `mtjax experiment ...` studies."""

  steps_per_task: int = 100  # efficiency: each single-task run; the joint run gets K times this
  seeds: tuple[int, ...] = (0, 1, 2)
  eval_every: int = 25
  target: float = 0.5  # the score each task must reach (eval metric below) ...
  targets: Mapping[str, float] = dataclasses.field(default_factory=dict)  # ... or per task
  metric: str = "accuracy"
  entropy_coef: float = 0.05  # entropy study: the coefficient of its regularized arm
  # Eval steps of every arm: every (eval_every) | log (also steps 1, 2, 4, 8, ...: dense early).
  eval_schedule: str = "every"
  # The LR schedule of every arm, whose value at a step does not depend on the arm's length:
  # constant (after warmup) | wsd (constant, then a linear decay over the last lr_decay_steps
  # steps of each arm: the same absolute decay length in every arm).
  lr_schedule: str = "constant"
  lr_decay_steps: int = 0  # wsd: the decay length in steps (1 <= it <= steps_per_task - warmup)
  # Per-task metric, overriding `metric` (e.g. open-ended tasks judged by their verifier:
  # {"open_ended_grammar": "accuracy"}).
  task_metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # The first tuning_examples of each task's validation split are the tuning split (targets and
  # knobs are chosen there); reported numbers come from the examples after them (eval.skip).
  tuning_examples: int = 0
  split: str = "report"  # report (examples after the tuning split) | tuning (the tuning split)
  # expert_composition (issue 20, study ii): the held-out task the experts are composed on, the
  # few-shot examples (of its train split) that choose the mixture, and the CEM's size.
  new_task: str = ""
  shots: int = 16
  cem_population: int = 32
  cem_iterations: int = 50
  # fast_slow (issue 21): the soft prompts' LR (the fast weights) and the model's (the slow ones).
  fast_lr: float = 3e-2
  slow_lr: float = 1e-3


RL_ALGORITHMS = ("none", "grpo")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """On-policy RL (mtjax.rl): GRPO on the mixture's prompts, rewards from the tasks' verifiers.
  Each step samples rl.prompts prompts (drawn from data.tasks at the mixture's rates) x
  rl.samples completions from the current policy (temperature 1), then takes rl.epochs PPO-clip
  updates on them with a k3 KL to the starting model."""

  algorithm: str = "none"  # none (supervised) | grpo
  prompts: int = 8  # B prompts per step
  samples: int = 8  # n completions per prompt (a group)
  epochs: int = 1  # mu optimizer updates per sampled batch (> 1: the clip can bind)
  clip_eps: float = 0.2
  kl_coef: float = 0.04  # beta, on the k3 estimate of KL(policy || reference)
  diversity: str = "none"  # none | darling (DARLING: reward x diversity within the group)
  normalize_std: bool = True  # divide group advantages by the group's std (not with darling)
  max_new_tokens: int | str = "auto"  # auto: the longest training target of the tasks + EOS
  buckets: tuple[int, ...] = (32, 64, 128, 256)  # prompt buckets (one sampler compile each)


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  study: StudyConfig = dataclasses.field(default_factory=StudyConfig)
  rl: RLConfig = dataclasses.field(default_factory=RLConfig)

  @property
  def num_tasks(self) -> int:
    return len(self.data.tasks)

  def to_dict(self) -> dict[str, Any]:
    return _to_plain(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def replace(self, **dotted: Any) -> Config:
    """A copy with dotted fields replaced, re-validated: `cfg.replace(**{"mesh.fsdp": 2})`."""
    tree = self.to_dict()
    for key, value in dotted.items():
      *parents, leaf = key.split(".")
      node = tree
      for p in parents:
        node = node[p]
      node[leaf] = value
    return from_dict(tree)


def _to_plain(x: Any) -> Any:
  if dataclasses.is_dataclass(x):
    return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {k: _to_plain(v) for k, v in x.items()}
  if isinstance(x, tuple):
    return [_to_plain(v) for v in x]
  return x


# ----------------------------------------------------------------------------- typed conversion


def _type_name(t: Any) -> str:
  return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(t, str(t))


def _convert(value: Any, hint: Any, field: str) -> Any:
  """Converts one raw config value to the annotated type, or raises BadInputError."""
  origin = typing.get_origin(hint)
  if hint is bool:
    if isinstance(value, bool):
      return value
    raise BadInputError(field, f"expected true/false, got {value!r}")
  if hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      if not -2**63 <= value < 2**63:  # values reach numpy and JAX as int64 at most
        raise BadInputError(field, f"expected an integer that fits in 64 bits, got {value}")
      return value
    raise BadInputError(field, f"expected an integer, got {value!r}")
  if hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      if not math.isfinite(value):
        raise BadInputError(field, f"expected a finite number, got {value!r}")
      if abs(value) > FLOAT32_MAX:  # the step computes in float32 (or bfloat16): it would overflow
        raise BadInputError(field, f"expected a number within float32 range (|x| <= 3.4e38), got {value!r}")
      return float(value)
    raise BadInputError(field, f"expected a number, got {value!r}")
  if hint is str:
    if isinstance(value, str):
      return value
    raise BadInputError(field, f"expected a string, got {value!r}")
  if origin is tuple:
    args = typing.get_args(hint)
    if isinstance(value, str) or not isinstance(value, Sequence):
      raise BadInputError(field, f"expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise BadInputError(field, f"expected {len(args)} values, got {value!r}")
    return tuple(_convert(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if origin in (types.UnionType, typing.Union):
    if int in typing.get_args(hint) and isinstance(value, str) and re.fullmatch(r"-?\d+", value):
      value = int(value)  # "--config.eval.max_new_tokens=8" over the default "auto"
    for option in typing.get_args(hint):
      try:
        return _convert(value, option, field)
      except BadInputError:
        pass
    if hint == EntropyCoef:
      raise BadInputError(field, f"expected a number or a (start, end) pair, got {value!r}")
    options = " or ".join(_type_name(o) if o in (int, float, bool, str) else "a list"
                          for o in typing.get_args(hint))
    raise BadInputError(field, f"expected {options}, got {value!r}")
  if origin in (Mapping, dict) or hint is Mapping:
    _, value_type = typing.get_args(hint)
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
      raise BadInputError(field, f"expected a mapping of task name to value, got {value!r}")
    items = value.items()
    return _frozen_mapping({str(k): _convert(v, value_type, f"{field}.{k}") for k, v in items})
  if isinstance(hint, type) and dataclasses.is_dataclass(hint):
    return _build(hint, value, field)
  raise TypeError(f"unsupported config annotation {hint!r} at {field}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
  if not isinstance(raw, (Mapping, ml_collections.ConfigDict)):
    raise BadInputError(prefix or "config", f"expected a group of settings, got {raw!r}")
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  for key in raw.keys():
    if key not in names:
      where = f"{prefix}.{key}" if prefix else key
      raise BadInputError(where, f"unknown key (known here: {', '.join(names)})")
  kwargs = {}
  for name in names:
    if name in raw.keys():
      kwargs[name] = _convert(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
  return cls(**kwargs)


# ----------------------------------------------------------------------------- schema checks
# Only what the values alone decide. Checks that need the task registry or files (task names,
# tokenizer files, mixtures) run once at run start: mtjax.resolve.resolve(config).

DTYPES = ("auto", "float32", "bfloat16")
REMAT = ("none", "full", "dots", "minimal")
ATTENTION = ("auto", "reference", "cudnn", "splash", "triton")
PARAM_DTYPES = ("float32", "bfloat16")
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings")}
SCHEDULES = ("constant", "stages", "linear")
RATES = ("explicit", "examples_proportional")
LR_SCHEDULES = ("cosine", "constant", "wsd")
TRUNCATE = ("prompt_left", "right", "skip")
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = ("silu", "gelu_tanh")


def _check(config: Config) -> None:
  m, d, t, o = config.model, config.data, config.train, config.optimizer
  if not 0 <= config.seed < 2**31:
    raise BadInputError("seed", f"expected an integer in [0, 2**31), got {config.seed}")
  positive = {
      "model.d_model": m.d_model, "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
      "model.num_kv_heads": m.num_kv_heads, "model.mlp_dim": m.mlp_dim,
      "data.batch_size": d.batch_size, "data.seq_len": d.seq_len, "train.steps": t.steps,
      "train.log_every": t.log_every, "optimizer.grad_accum": o.grad_accum,
      "checkpoint.keep": config.checkpoint.keep, "checkpoint.keep_best": config.checkpoint.keep_best,
      "train.max_consecutive_skips": t.max_consecutive_skips,
      "train.preemption_every": t.preemption_every,
  }
  for field, value in positive.items():
    if value <= 0:
      raise BadInputError(field, f"expected a positive integer, got {value}")
  non_negative = {
      "model.head_dim": m.head_dim, "model.vocab_size": m.vocab_size, "model.z_loss": m.z_loss,
      "optimizer.lr": o.lr, "optimizer.warmup_steps": o.warmup_steps,
      "optimizer.decay_steps": o.decay_steps, "optimizer.weight_decay": o.weight_decay,
      "optimizer.clip_norm": o.clip_norm, "optimizer.min_lr_ratio": o.min_lr_ratio,
      "checkpoint.every": config.checkpoint.every, "eval.every": config.eval.every,
      "data.prefetch": d.prefetch, "data.workers": d.workers, "train.loss_chunk": t.loss_chunk,
  }
  for field, value in non_negative.items():
    if value < 0:
      raise BadInputError(field, f"expected a value >= 0, got {value}")
  for field, value, allowed in (("model.dtype", m.dtype, DTYPES), ("model.remat", m.remat, REMAT),
                                ("model.attention", m.attention, ATTENTION),
                                ("model.param_dtype", m.param_dtype, PARAM_DTYPES),
                                ("model.rope_type", m.rope_type, tuple(ROPE_SCALING_KEYS)),
                                ("data.schedule", d.schedule, SCHEDULES),
                                ("data.rates", d.rates, RATES),
                                ("data.on_bad_record", d.on_bad_record, ("stop", "skip")),
                                ("data.format", d.format, ("plain", "chat")),
                                ("optimizer.schedule", o.schedule, LR_SCHEDULES),
                                ("checkpoint.best_mode", config.checkpoint.best_mode, ("min", "max"))):
    if value not in allowed:
      raise BadInputError(field, f"expected one of {', '.join(allowed)}, got {value!r}")
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

  if config.mesh.dcn < 1:
    raise BadInputError("mesh.dcn", f"expected the number of slices (>= 1), got {config.mesh.dcn}")
  for name in ("data", "fsdp", "tensor"):
    size = getattr(config.mesh, name)
    if size == 0 or size < -1:
      raise BadInputError(f"mesh.{name}", f"expected a positive size or -1, got {size}")
  if [config.mesh.data, config.mesh.fsdp, config.mesh.tensor].count(-1) > 1:
    raise BadInputError("mesh", "at most one axis may be -1 (the rest of the devices)")

  if len(set(d.tasks)) != len(d.tasks):
    raise BadInputError("data.tasks", f"task names must be unique, got {list(d.tasks)}")
  for name in d.tasks:
    if "/" in name:
      raise BadInputError("data.tasks", f"task names may not contain '/', got {name!r}")
  for name, w in d.mixture.items():
    if w < 0:
      raise BadInputError(f"data.mixture.{name}", f"expected a finite weight >= 0, got {w}")
  if d.schedule == "constant" and d.stages:
    raise BadInputError("data.stages", "given, but data.schedule is 'constant' (use stages or linear)")
  if d.schedule != "constant":
    if not d.stages:
      raise BadInputError("data.stages", f"data.schedule={d.schedule!r} needs at least one stage")
    if d.rates != "explicit":
      raise BadInputError("data.rates", "examples_proportional applies to a constant schedule only")
    starts = [s for s, _ in d.stages]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
      raise BadInputError("data.stages", f"start steps must begin at 0 and increase, got {starts}")
    for i, (start, weights) in enumerate(d.stages):
      for name, w in weights.items():
        if w < 0:
          raise BadInputError(f"data.stages[{i}].{name}", f"expected a finite weight >= 0, got {w}")
      if sum(weights.values()) <= 0:
        raise BadInputError(f"data.stages[{i}]", f"all weights are zero at step {start}")
  if d.rate_temperature <= 0:
    raise BadInputError("data.rate_temperature", f"expected > 0, got {d.rate_temperature}")
  if d.rate_cap < 0 or d.rate_scale <= 0:
    raise BadInputError("data.rate_cap", "expected rate_cap >= 0 and rate_scale > 0")
  min_lag = d.prefetch + 1 if d.prefetch else 0
  if d.feedback_lag < min_lag:
    raise BadInputError("data.feedback_lag", f"expected >= {min_lag} (data.prefetch + 1: batches "
                        f"already prefetched keep their rates), got {d.feedback_lag}")
  for name, w in t.loss_weights.items():
    if w < 0:
      raise BadInputError(f"train.loss_weights.{name}", f"expected a finite weight >= 0, got {w}")
  if d.batch_size % o.grad_accum:
    raise BadInputError("data.batch_size", f"must be divisible by optimizer.grad_accum={o.grad_accum}")
  if not 0 < o.decay_fraction <= 1:
    raise BadInputError("optimizer.decay_fraction", f"expected 0 < value <= 1, got {o.decay_fraction}")
  for field, value in (("optimizer.b1", o.b1), ("optimizer.b2", o.b2)):
    if not 0 <= value < 1:
      raise BadInputError(field, f"expected a decay rate in [0, 1), got {value}")
  if o.eps < 0:
    raise BadInputError("optimizer.eps", f"expected a value >= 0, got {o.eps}")
  for field, value in (("model.norm_eps", m.norm_eps), ("model.rope_theta", m.rope_theta)):
    if value <= 0:
      raise BadInputError(field, f"expected a value > 0, got {value}")
  _check_lora(m.lora)
  _check_svf(m)
  _check_fast_slow(m, o, d)
  _check_instruction_search(config)
  if config.eval.drift and (m.lora.targets or m.svf.enabled):
    raise BadInputError("eval.drift", "expected false with model.lora or model.svf (the frozen base "
                        "is the start; drift is not measured for adapters yet)")
  if (m.lora.targets or m.svf.enabled) and o.ema:
    raise BadInputError("optimizer.ema", "an EMA of the weights is not supported with model.lora "
                        "or model.svf (it would keep a copy of the frozen base)")
  if not 0 <= o.ema < 1:
    raise BadInputError("optimizer.ema", f"expected a decay in [0, 1) (0: no EMA), got {o.ema}")
  for pattern, scale in o.param_groups.items():
    try:
      re.compile(pattern)
    except re.error as e:
      raise BadInputError(f"optimizer.param_groups.{pattern}", f"not a regular expression ({e})") from None
    if scale < 0:
      raise BadInputError(f"optimizer.param_groups.{pattern}",
                          f"expected an LR multiplier >= 0 (0 freezes), got {scale}")
  e = config.eval
  for field, value in (("eval.num_examples", e.num_examples), ("eval.num_generate", e.num_generate),
                       ("eval.sample_prompts", e.sample_prompts), ("eval.num_samples", e.num_samples),
                       ("eval.top_k", e.top_k), ("eval.temperature", e.temperature),
                       ("eval.skip", e.skip)):
    if value < 0:
      raise BadInputError(field, f"expected a value >= 0, got {value}")
  if any(step < 0 for step in e.steps):
    raise BadInputError("eval.steps", f"expected steps >= 0, got {list(e.steps)}")
  if e.batch_size <= 0:
    raise BadInputError("eval.batch_size", f"expected a positive integer, got {e.batch_size}")
  if isinstance(e.max_new_tokens, str) and e.max_new_tokens != "auto" or \
      isinstance(e.max_new_tokens, int) and e.max_new_tokens <= 0:
    raise BadInputError("eval.max_new_tokens", f"expected 'auto' or a positive integer, got "
                        f"{e.max_new_tokens!r}")
  if isinstance(e.max_new_tokens, int) and e.max_new_tokens >= d.seq_len:
    raise BadInputError("eval.max_new_tokens", f"{e.max_new_tokens} new tokens leave no room for "
                        f"a prompt in the model's {d.seq_len} tokens (data.seq_len): expected "
                        f"'auto' or a number below {d.seq_len}")
  if d.format == "chat" and d.tokenizer == "byte" and not config.model.pretrained:
    raise BadInputError("data.format", "chat needs a tokenizer with a chat template (hf:<model "
                        "directory>); the byte tokenizer has none")
  if d.truncate not in TRUNCATE:
    raise BadInputError("data.truncate", f"expected one of {', '.join(TRUNCATE)}, got {d.truncate!r}")
  for name, spec in d.jsonl_tasks.items():
    if not name or "/" in name or "." in name:
      raise BadInputError(f"data.jsonl_tasks.{name}", "a task name is non-empty, without '/' or '.'")
    if not spec.train and not spec.validation:
      raise BadInputError(f"data.jsonl_tasks.{name}", "expected train and/or validation files")
    for field in ("prompt_field", "target_field"):
      if not getattr(spec, field):
        raise BadInputError(f"data.jsonl_tasks.{name}.{field}", "expected a field name")
  if not 0 < e.top_p <= 1:
    raise BadInputError("eval.top_p", f"expected 0 < top_p <= 1, got {e.top_p}")
  _check_weighting(t.weighting)
  _check_mixing(d.mixing)
  _check_rl(config)


def _check_rl(config: Config) -> None:
  r = config.rl
  if r.algorithm not in RL_ALGORITHMS:
    raise BadInputError("rl.algorithm", f"expected one of {', '.join(RL_ALGORITHMS)}, got "
                        f"{r.algorithm!r}")
  if r.diversity not in ("none", "darling"):
    raise BadInputError("rl.diversity", f"expected none or darling, got {r.diversity!r}")
  for field, value in (("prompts", r.prompts), ("samples", r.samples), ("epochs", r.epochs)):
    if value <= 0:
      raise BadInputError(f"rl.{field}", f"expected a positive integer, got {value}")
  if r.samples < 2:
    raise BadInputError("rl.samples", f"a group needs at least 2 samples (advantages are "
                        f"relative to the group), got {r.samples}")
  if not 0 < r.clip_eps < 1:
    raise BadInputError("rl.clip_eps", f"expected 0 < clip_eps < 1, got {r.clip_eps}")
  if r.kl_coef < 0:
    raise BadInputError("rl.kl_coef", f"expected a value >= 0, got {r.kl_coef}")
  if isinstance(r.max_new_tokens, str) and r.max_new_tokens != "auto" or \
      isinstance(r.max_new_tokens, int) and r.max_new_tokens <= 0:
    raise BadInputError("rl.max_new_tokens", f"expected 'auto' or a positive integer, got "
                        f"{r.max_new_tokens!r}")
  if not r.buckets or any(b <= 0 for b in r.buckets) or list(r.buckets) != sorted(set(r.buckets)):
    raise BadInputError("rl.buckets", f"expected increasing positive prompt lengths, got "
                        f"{list(r.buckets)}")
  if r.algorithm == "none":
    return
  if config.train.weighting.method != "static":
    raise BadInputError("train.weighting.method", "adaptive loss weighting works on supervised "
                        "losses; with rl.algorithm=grpo expected static (train.loss_weights "
                        "scale each task's advantages)")
  if config.data.mixing.method != "none":
    raise BadInputError("data.mixing.method", "online data mixing rewards supervised losses; "
                        "with rl.algorithm=grpo expected none")
  if config.optimizer.grad_accum != 1:
    raise BadInputError("optimizer.grad_accum", "expected 1 with rl.algorithm=grpo (the update "
                        f"takes the whole rollout), got {config.optimizer.grad_accum}")
  if config.train.entropy_coefs:
    raise BadInputError("train.entropy_coefs", "GRPO has no entropy term (entropy is logged per "
                        "task); expected {} with rl.algorithm=grpo")
  if config.optimizer.ema:
    raise BadInputError("optimizer.ema", "expected 0 with rl.algorithm=grpo")
  if config.model.soft_prompt.length:
    raise BadInputError("model.soft_prompt.length", "fast/slow training with GRPO as the slow "
                        "learner is not built yet; expected 0 with rl.algorithm=grpo")
  if config.model.svf.enabled:
    raise BadInputError("model.svf.enabled", "GRPO's KL reference is not built for SVF experts "
                        "yet; expected false with rl.algorithm=grpo (LoRA works)")


def _check_weighting(w: WeightingConfig) -> None:
  """Values and the method's name; what the method itself needs (a whole batch's losses, so
  grad_accum 1) is checked by the method at setup (mtjax.train.weighting.Method.check)."""
  if w.method not in WEIGHTING_METHODS:
    raise BadInputError("train.weighting.method", f"expected one of {', '.join(WEIGHTING_METHODS)}, "
                        f"got {w.method!r}")
  for field, value in (("lr", w.lr), ("temperature", w.temperature)):
    if value <= 0:
      raise BadInputError(f"train.weighting.{field}", f"expected a value > 0, got {value}")
  for field, value in (("weight_decay", w.weight_decay), ("beta_sigma", w.beta_sigma),
                       ("min_loss", w.min_loss)):
    if value < 0:
      raise BadInputError(f"train.weighting.{field}", f"expected a value >= 0, got {value}")
  if not 0 <= w.ema < 1:
    raise BadInputError("train.weighting.ema", f"expected a decay in [0, 1), got {w.ema}")
  if w.solver_iters <= 0:
    raise BadInputError("train.weighting.solver_iters", f"expected a positive integer, got "
                        f"{w.solver_iters}")


def _check_mixing(m: MixingConfig) -> None:
  if m.method not in MIXING_METHODS:
    raise BadInputError("data.mixing.method", f"expected one of {', '.join(MIXING_METHODS)}, got "
                        f"{m.method!r}")
  if m.every <= 0:
    raise BadInputError("data.mixing.every", f"expected a positive integer, got {m.every}")
  if not 0 <= m.smoothing < 1:
    raise BadInputError("data.mixing.smoothing", f"expected a value in [0, 1), got {m.smoothing}")


def _check_fast_slow(m: ModelConfig, o: OptimizerConfig, d: DataConfig) -> None:
  length = m.soft_prompt.length
  if length < 0:
    raise BadInputError("model.soft_prompt.length", f"expected a count of virtual tokens >= 0, got {length}")
  if length and (m.lora.targets or m.svf.enabled):
    raise BadInputError("model.soft_prompt.length", "soft prompts train beside the full model (fast "
                        "and slow weights); expected 0 with model.lora or model.svf")
  if length and length + 2 > d.seq_len:
    raise BadInputError("model.soft_prompt.length", f"{length} slots leave no room for an example "
                        f"in data.seq_len={d.seq_len}")
  if not (math.isfinite(o.slow_lr_ratio) and o.slow_lr_ratio >= 0):
    raise BadInputError("optimizer.slow_lr_ratio", f"expected a multiplier >= 0, got {o.slow_lr_ratio}")
  if o.fast_every < 0:
    raise BadInputError("optimizer.fast_every", f"expected a step interval >= 1 (0 freezes the "
                        f"soft prompts), got {o.fast_every}")
  if o.slow_every < 1:
    raise BadInputError("optimizer.slow_every", f"expected a step interval >= 1, got {o.slow_every}")
  if o.fast_every == 0 and o.slow_lr_ratio == 0:
    raise BadInputError("optimizer.fast_every", "0 freezes the soft prompts and slow_lr_ratio=0 the "
                        "rest: nothing would train")
  fast_slow = o.slow_lr_ratio != 1.0 or o.fast_every != 1 or o.slow_every != 1
  if fast_slow and not length:
    raise BadInputError("optimizer.slow_lr_ratio" if o.slow_lr_ratio != 1.0 else
                        "optimizer.fast_every" if o.fast_every != 1 else "optimizer.slow_every",
                        "fast/slow training needs fast weights: set model.soft_prompt.length > 0")
  if fast_slow and o.param_groups:
    raise BadInputError("optimizer.param_groups", "expected {} with fast/slow training "
                        "(optimizer.slow_lr_ratio, fast_every, slow_every make the two groups)")
  if length and o.ema:
    raise BadInputError("optimizer.ema", "expected 0 with model.soft_prompt")


def _check_instruction_search(config: Config) -> None:
  s = config.train.instruction_search
  if s.every < 0:
    raise BadInputError("train.instruction_search.every", f"expected a step interval >= 0 (0: "
                        f"off), got {s.every}")
  if not s.every:
    return
  for field, value in (("examples", s.examples), ("elite", s.elite), ("mutations", s.mutations)):
    if value < 1:
      raise BadInputError(f"train.instruction_search.{field}", f"expected a count >= 1, got {value}")
  if s.population < s.elite:
    raise BadInputError("train.instruction_search.population", f"expected >= elite "
                        f"({s.elite}): the elite are drawn from the population, got {s.population}")
  if s.mutations > 64:
    raise BadInputError("train.instruction_search.mutations", f"expected at most 64, got {s.mutations}")
  changed = {t: m for t, m in config.data.instructions.items() if m != "keep"}
  if changed:
    raise BadInputError("data.instructions", f"the instruction search writes the instructions: "
                        f"expected 'keep' for every task with it, got {changed}")
  if config.rl.algorithm != "none":
    raise BadInputError("train.instruction_search.every", "expected 0 with rl.algorithm=grpo "
                        "(the search feeds the supervised loader)")


def _check_svf(m: ModelConfig) -> None:
  svf = m.svf
  if not svf.enabled:
    return
  if m.lora.targets:
    raise BadInputError("model.svf.enabled", "one adapter kind per run: expected model.lora.targets "
                        f"empty with SVF experts, got {list(m.lora.targets)}")
  if not svf.targets:
    raise BadInputError("model.svf.targets", "expected at least one projection")
  for target in svf.targets:
    if target not in SVF_TARGETS:
      raise BadInputError("model.svf.targets", f"expected each one of {', '.join(SVF_TARGETS)}, "
                          f"got {target!r}")
  if len(set(svf.targets)) != len(svf.targets):
    raise BadInputError("model.svf.targets", f"expected each target once, got {list(svf.targets)}")
  if not svf.lr > 0:
    raise BadInputError("model.svf.lr", f"expected a learning rate > 0, got {svf.lr}")


def _check_lora(lora: LoraConfig) -> None:
  if lora.rank <= 0:
    raise BadInputError("model.lora.rank", f"expected a positive integer, got {lora.rank}")
  if lora.alpha <= 0:
    raise BadInputError("model.lora.alpha", f"expected a value > 0, got {lora.alpha}")
  for target in lora.targets:
    if target not in LORA_TARGETS:
      raise BadInputError("model.lora.targets", f"expected each one of {', '.join(LORA_TARGETS)}, "
                          f"got {target!r}")
  if len(set(lora.targets)) != len(lora.targets):
    raise BadInputError("model.lora.targets", f"expected each target once, got {list(lora.targets)}")
  if not 0 <= lora.dropout < 1:
    raise BadInputError("model.lora.dropout", f"expected 0 <= dropout < 1, got {lora.dropout}")
  if not lora.kind:  # which kinds exist is the model's registry's to say (at setup)
    raise BadInputError("model.lora.kind", "expected an adapter kind, e.g. lora or dora")


def from_dict(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> Config:
  """Validates a raw (possibly nested) mapping into a frozen Config (schema and values only)."""
  config = _build(Config, raw, "")
  _check(config)
  return config


# ----------------------------------------------------------------------------- loading


_MAPPING_FIELDS = ("rope_scaling", "mixture", "loss_weights", "entropy_coefs", "instructions", "param_groups",
                   "targets", "jsonl_tasks")


def parse_override(arg: str) -> tuple[str, str]:
  """'--config.a.b=v' -> ('a.b', 'v')."""
  body = arg[2:] if arg.startswith("--") else arg
  if not body.startswith("config.") or "=" not in body:
    raise BadInputError(arg, "expected an override of the form --config.a.b=value")
  key, value = body[len("config."):].split("=", 1)
  if not all(part.strip() for part in key.split(".")):
    raise BadInputError(arg, "expected an override of the form --config.a.b=value (a dotted "
                        "name without empty parts)")
  return key, value


def _parse_item(text: str) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text
  return value if isinstance(value, (int, float)) else text


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)) and not text.strip().startswith(("[", "(")):
    # a,b,c: names stay strings; numbers (--config.study.seeds=0,1,2) become numbers
    return tuple(_parse_item(p.strip()) for p in text.split(",") if p.strip())
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if isinstance(current, float) and not isinstance(current, bool):
    with contextlib.suppress(ValueError):
      return float(text)  # also nan, inf, -inf: the schema then names them as not finite
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    pass
  if current is None and lowered in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
    return float(lowered)  # a new per-task entry: the schema then names it as not finite
  return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for arg in overrides:
    key, text = parse_override(arg)
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict):  # --config.seed.x=1: below a value
        raise BadInputError(key, f"{'.'.join(parents[:i])} is a value, not a group of settings")
      if p not in node:
        raise BadInputError(".".join(parents[: i + 1]), "unknown key")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict):
      raise BadInputError(key, f"{'.'.join(parents)} is a value, not a group of settings")
    # New keys are allowed only inside per-task mappings (their keys are task names).
    per_task = parents and parents[-1] in _MAPPING_FIELDS
    if leaf not in node and not per_task:
      known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
      raise BadInputError(key, f"unknown key (known here: {known})")
    current = node[leaf] if leaf in node else None
    value = _parse_value(text, current)
    try:
      with node.unlocked() if per_task and leaf not in node else contextlib.nullcontext():
        node[leaf] = value
    except (TypeError, ValueError, KeyError):
      expected = ("a mapping of task name to value ({'name': value, ...})"
                  if leaf in _MAPPING_FIELDS else _describe(current))
      raise BadInputError(key, f"expected {expected}, got {text!r}") from None


def _describe(current: Any) -> str:
  """What an override must give to replace `current` (for the error message)."""
  if isinstance(current, ml_collections.ConfigDict):
    return f"a group of settings ({', '.join(sorted(current.keys()))}), not one value"
  if isinstance(current, (tuple, list)):
    return "a list (a,b,c or [...])"
  if isinstance(current, bool):
    return "true/false"
  return _type_name(type(current)) if current is not None else "a value"


_IMPORTING: list[str] = []  # config files being imported (innermost last)


def defining_file() -> str:
  """The config file being imported right now ("" if none): task and scorer registrations record
  it, so a run can re-import the file that defined its tasks (tasks/specs.py)."""
  return _IMPORTING[-1] if _IMPORTING else ""


def import_config_module(path: str) -> tuple[types.ModuleType, str]:
  """Imports the file of `path[:arg]`; returns (module, arg)."""
  file, _, arg = str(path).partition(":")
  file_path = pathlib.Path(file)
  if file_path.is_dir():
    raise BadInputError("--config", f"{file} is a directory, expected a Python config file")
  if not file_path.is_file():
    raise BadInputError("--config", f"config file not found: {file}")
  spec = importlib.util.spec_from_file_location(f"mtjax_config_{file_path.stem}", file_path)
  if spec is None or spec.loader is None:
    raise BadInputError(file, "cannot be imported as a Python file")
  module = importlib.util.module_from_spec(spec)
  _IMPORTING.append(str(file_path.resolve()))
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a user's file: report, do not dump a traceback
    raise BadInputError(file, f"could not import config file ({type(e).__name__}: {e})") from None
  finally:
    _IMPORTING.pop()
  return module, arg


def sibling_config(here: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
  """get_config(variant) of the config file `name` beside `here`: configs build on each other
  (`c = sibling_config(__file__, "demo.py")`)."""
  module, _ = import_config_module(str(pathlib.Path(here).with_name(name)))
  return module.get_config(variant)


# Fields of a union type ("auto" or a number): a ConfigDict would fix their type from the first
# value, so a config file could not set 16 over "auto". They hold any value; the schema checks it.
_UNION_FIELDS = (("eval", "max_new_tokens"), ("rl", "max_new_tokens"))


def _untyped(tree: dict[str, Any]) -> dict[str, Any]:
  for group, name in _UNION_FIELDS:
    if isinstance(tree.get(group), dict) and name in tree[group]:
      tree[group][name] = ml_collections.FieldReference(tree[group][name], field_type=object)
  return tree


def defaults() -> ml_collections.ConfigDict:
  """Every setting at its default, as a ConfigDict: a config file may start from it and set only
  what differs (`c = mtjax.config.defaults(); c.train.steps = 400`)."""
  return ml_collections.ConfigDict(_untyped(Config().to_dict()))


def _merge(into: dict[str, Any], raw: Mapping[str, Any], cls: type) -> None:
  """Writes `raw` over the defaults `into`, group by group; mappings and lists replace whole."""
  hints = typing.get_type_hints(cls)
  for key, value in raw.items():
    hint = hints.get(key)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
      _merge(into[key], value, hint)
    else:
      into[key] = value  # an unknown key stays, so from_dict names it


def load_raw(path: str) -> ml_collections.ConfigDict:
  """Imports `path[:arg]` and returns `get_config(arg)` over the defaults, as a ConfigDict."""
  module, arg = import_config_module(path)
  file = str(path).partition(":")[0]
  if not hasattr(module, "get_config"):
    raise BadInputError(file, "expected a function get_config()")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # a user's function: report it in one line, whatever it raised
    raise BadInputError(path, f"get_config({arg!r}) failed ({type(e).__name__}: {e})") from None
  try:
    if isinstance(cfg, Mapping):
      cfg = ml_collections.ConfigDict(cfg)
    if not isinstance(cfg, ml_collections.ConfigDict):
      raise BadInputError(file, "get_config() must return an ml_collections.ConfigDict, got "
                          f"{type(cfg).__name__}")
    merged = Config().to_dict()
    _merge(merged, cfg.to_dict(), Config)
    return ml_collections.ConfigDict(_untyped(merged))
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    if isinstance(e, BadInputError):
      raise
    raise BadInputError(file, f"get_config() returned settings that are not a config tree "
                        f"({type(e).__name__}: {e})") from None


def load(path: str, overrides: Sequence[str] = ()) -> Config:
  """Loads, overrides and validates a config: `load("configs/demo.py:tiny", ["--config.seed=1"])`."""
  cfg = load_raw(path)
  apply_overrides(cfg, overrides)
  keys = tuple(dict.fromkeys(parse_override(a)[0] for a in overrides))
  cfg.model.pinned = tuple(k for k in keys if k.startswith("model.") or k == "data.tokenizer")
  return from_dict(cfg)
