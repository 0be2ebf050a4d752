"""The training loop's config group (train.*): steps, logging, per-task loss weights and entropy
coefficients, the adaptive weighting method, the instruction search, the compilation cache; its
checks."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

from mtjax.errors import BadInputError

# An entropy coefficient is a constant, or (start, end) interpolated linearly over train.steps.
EntropyCoef = float | tuple[float, float]

# The weighting methods, once: name -> "module:Class" of its implementation (mtjax.train.weighting
# imports it when a run uses it; this module stays free of JAX). A new method: its module there
# and one line here.
WEIGHTING_METHODS: Mapping[str, str] = types.MappingProxyType({
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


PLATFORMS = ("auto", "cpu", "gpu", "tpu")


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
  # JAX's persistent compilation cache (mtjax.train.compile_cache): auto (on for GPU, TPU and one
  # CPU device; off for several CPU devices) | on | off; where, unless JAX_COMPILATION_CACHE_DIR is set.
  compilation_cache: str = "auto"
  compilation_cache_dir: str = "~/.cache/mtjax/jax_cache"
  # The devices the run expects (auto | cpu | gpu | tpu; launchers set it): a run that finds
  # others stops at start (exit 2) instead of training on the CPU of a GPU node for hours.
  platform: str = "auto"


def check(t: TrainConfig) -> None:
  for field, value in (("steps", t.steps), ("log_every", t.log_every),
                       ("max_consecutive_skips", t.max_consecutive_skips),
                       ("preemption_every", t.preemption_every)):
    if value <= 0:
      raise BadInputError(f"train.{field}", f"expected a positive integer, got {value}")
  if t.loss_chunk < 0:
    raise BadInputError("train.loss_chunk", f"expected a value >= 0, got {t.loss_chunk}")
  for name, w in t.loss_weights.items():
    if w < 0:
      raise BadInputError(f"train.loss_weights.{name}", f"expected a finite weight >= 0, got {w}")
  if t.compilation_cache not in ("auto", "on", "off"):
    raise BadInputError("train.compilation_cache", f"expected auto, on or off, got "
                        f"{t.compilation_cache!r}")
  if t.platform not in PLATFORMS:
    raise BadInputError("train.platform", f"expected one of {', '.join(PLATFORMS)}, got "
                        f"{t.platform!r}")
  _check_weighting(t.weighting)
  s = t.instruction_search
  if s.every < 0:
    raise BadInputError("train.instruction_search.every", f"expected a step interval >= 0 (0: "
                        f"off), got {s.every}")
  if s.every:
    for field, value in (("examples", s.examples), ("elite", s.elite), ("mutations", s.mutations)):
      if value < 1:
        raise BadInputError(f"train.instruction_search.{field}", f"expected a count >= 1, got {value}")
    if s.population < s.elite:
      raise BadInputError("train.instruction_search.population", f"expected >= elite "
                          f"({s.elite}): the elite are drawn from the population, got {s.population}")
    if s.mutations > 64:
      raise BadInputError("train.instruction_search.mutations", f"expected at most 64, got {s.mutations}")


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
