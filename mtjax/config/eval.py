"""The held-out evaluation's config group (eval.*): cadence, examples, decoding, budgets; its
checks."""

from __future__ import annotations

import dataclasses

from mtjax.errors import BadInputError

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


def check(e: EvalConfig) -> None:
  for field, value in (("eval.every", e.every), ("eval.num_examples", e.num_examples),
                       ("eval.num_generate", e.num_generate),
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
  if not 0 < e.top_p <= 1:
    raise BadInputError("eval.top_p", f"expected 0 < top_p <= 1, got {e.top_p}")
