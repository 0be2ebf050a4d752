"""Reinforcement learning's config group (rl.*): GRPO's sampling and update; its checks."""

from __future__ import annotations

import dataclasses

from mtjax.errors import BadInputError

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


def check(r: RLConfig) -> None:
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
