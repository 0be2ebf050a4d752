"""The optimizer's config group (optimizer.*): AdamW, its LR schedule, clipping, accumulation,
parameter groups, the EMA of the weights, fast/slow groups; its checks."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

from mtjax.errors import BadInputError

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


LR_SCHEDULES = ("cosine", "constant", "wsd")


def check(o: OptimizerConfig) -> None:
  if o.grad_accum <= 0:
    raise BadInputError("optimizer.grad_accum", f"expected a positive integer, got {o.grad_accum}")
  for field, value in (("lr", o.lr), ("warmup_steps", o.warmup_steps),
                       ("decay_steps", o.decay_steps), ("weight_decay", o.weight_decay),
                       ("clip_norm", o.clip_norm), ("min_lr_ratio", o.min_lr_ratio)):
    if value < 0:
      raise BadInputError(f"optimizer.{field}", f"expected a value >= 0, got {value}")
  if o.schedule not in LR_SCHEDULES:
    raise BadInputError("optimizer.schedule", f"expected one of {', '.join(LR_SCHEDULES)}, got "
                        f"{o.schedule!r}")
  if not 0 < o.decay_fraction <= 1:
    raise BadInputError("optimizer.decay_fraction", f"expected 0 < value <= 1, got {o.decay_fraction}")
  for field, value in (("optimizer.b1", o.b1), ("optimizer.b2", o.b2)):
    if not 0 <= value < 1:
      raise BadInputError(field, f"expected a decay rate in [0, 1), got {value}")
  if o.eps < 0:
    raise BadInputError("optimizer.eps", f"expected a value >= 0, got {o.eps}")
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


def fast_slow(o: OptimizerConfig) -> bool:
  """Whether the settings ask for two parameter groups, fast (soft prompts) and slow."""
  return o.slow_lr_ratio != 1.0 or o.fast_every != 1 or o.slow_every != 1
