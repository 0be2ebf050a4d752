"""The settings that do not go together, declared once: each rule names the field its error
names, when it applies, and why. `check` runs them after every group passed its own checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mtjax.config.optimizer import fast_slow
from mtjax.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class Refusal:
  field: str | Callable[[Any], str]  # the field the error names (or a function of the config)
  when: Callable[[Any], bool]  # config -> whether the combination is present
  why: str | Callable[[Any], str]  # what was expected


def _adapters(c: Any) -> bool:
  return bool(c.model.lora.targets or c.model.svf.enabled)


def _grpo(c: Any) -> bool:
  return c.rl.algorithm != "none"


def _fast_slow_field(c: Any) -> str:
  o = c.optimizer
  return ("optimizer.slow_lr_ratio" if o.slow_lr_ratio != 1.0 else
          "optimizer.fast_every" if o.fast_every != 1 else "optimizer.slow_every")


REFUSALS: tuple[Refusal, ...] = (
    # batch shape and budgets
    Refusal("data.batch_size", lambda c: c.data.batch_size % c.optimizer.grad_accum,
            lambda c: f"must be divisible by optimizer.grad_accum={c.optimizer.grad_accum}"),
    Refusal("eval.max_new_tokens",
            lambda c: isinstance(c.eval.max_new_tokens, int)
            and c.eval.max_new_tokens >= c.data.seq_len,
            lambda c: f"{c.eval.max_new_tokens} new tokens leave no room for a prompt in the "
            f"model's {c.data.seq_len} tokens (data.seq_len): expected 'auto' or a number below "
            f"{c.data.seq_len}"),
    Refusal("data.format", lambda c: c.data.format == "chat" and c.data.tokenizer == "byte"
            and not c.model.pretrained,
            "chat needs a tokenizer with a chat template (hf:<model directory>); the byte "
            "tokenizer has none"),
    # adapters
    Refusal("model.svf.enabled", lambda c: c.model.svf.enabled and c.model.lora.targets,
            lambda c: "one adapter kind per run: expected model.lora.targets empty with SVF "
            f"experts, got {list(c.model.lora.targets)}"),
    Refusal("model.soft_prompt.length", lambda c: c.model.soft_prompt.length and _adapters(c),
            "soft prompts train beside the full model (fast and slow weights); expected 0 with "
            "model.lora or model.svf"),
    Refusal("model.soft_prompt.length",
            lambda c: c.model.soft_prompt.length and c.model.soft_prompt.length + 2 > c.data.seq_len,
            lambda c: f"{c.model.soft_prompt.length} slots leave no room for an example in "
            f"data.seq_len={c.data.seq_len}"),
    Refusal(_fast_slow_field, lambda c: fast_slow(c.optimizer) and not c.model.soft_prompt.length,
            "fast/slow training needs fast weights: set model.soft_prompt.length > 0"),
    Refusal("optimizer.param_groups", lambda c: fast_slow(c.optimizer) and c.optimizer.param_groups,
            "expected {} with fast/slow training (optimizer.slow_lr_ratio, fast_every, "
            "slow_every make the two groups)"),
    Refusal("optimizer.ema", lambda c: c.model.soft_prompt.length and c.optimizer.ema,
            "expected 0 with model.soft_prompt"),
    Refusal("eval.drift", lambda c: c.eval.drift and _adapters(c),
            "expected false with model.lora or model.svf (the frozen base is the start; drift is "
            "not measured for adapters yet)"),
    Refusal("optimizer.ema", lambda c: _adapters(c) and c.optimizer.ema,
            "an EMA of the weights is not supported with model.lora or model.svf (it would keep "
            "a copy of the frozen base)"),
    # the instruction search
    Refusal("data.instructions",
            lambda c: c.train.instruction_search.every
            and any(m != "keep" for m in c.data.instructions.values()),
            lambda c: "the instruction search writes the instructions: expected 'keep' for every "
            f"task with it, got { {t: m for t, m in c.data.instructions.items() if m != 'keep'} }"),
    Refusal("train.instruction_search.every",
            lambda c: c.train.instruction_search.every and _grpo(c),
            "expected 0 with rl.algorithm=grpo (the search feeds the supervised loader)"),
    # reinforcement learning
    Refusal("train.weighting.method", lambda c: _grpo(c) and c.train.weighting.method != "static",
            "adaptive loss weighting works on supervised losses; with rl.algorithm=grpo expected "
            "static (train.loss_weights scale each task's advantages)"),
    Refusal("data.mixing.method", lambda c: _grpo(c) and c.data.mixing.method != "none",
            "online data mixing rewards supervised losses; with rl.algorithm=grpo expected none"),
    Refusal("optimizer.grad_accum", lambda c: _grpo(c) and c.optimizer.grad_accum != 1,
            lambda c: "expected 1 with rl.algorithm=grpo (the update takes the whole rollout), "
            f"got {c.optimizer.grad_accum}"),
    Refusal("train.entropy_coefs", lambda c: _grpo(c) and c.train.entropy_coefs,
            "GRPO has no entropy term (entropy is logged per task); expected {} with "
            "rl.algorithm=grpo"),
    Refusal("optimizer.ema", lambda c: _grpo(c) and c.optimizer.ema,
            "expected 0 with rl.algorithm=grpo"),
    Refusal("model.soft_prompt.length", lambda c: _grpo(c) and c.model.soft_prompt.length,
            "fast/slow training with GRPO as the slow learner is not built yet; expected 0 with "
            "rl.algorithm=grpo"),
    Refusal("model.svf.enabled", lambda c: _grpo(c) and c.model.svf.enabled,
            "GRPO's KL reference is not built for SVF experts yet; expected false with "
            "rl.algorithm=grpo (LoRA works)"),
)


def check(config: Any) -> None:
  for rule in REFUSALS:
    if rule.when(config):
      field = rule.field(config) if callable(rule.field) else rule.field
      why = rule.why(config) if callable(rule.why) else rule.why
      raise BadInputError(field, why)
