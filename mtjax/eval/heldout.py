"""The held-out examples evaluation scores: one definition for the evaluator, the start-of-run
budget check, the studies' floors and the instruction study's ambiguity."""

from __future__ import annotations

from typing import Any

from mtjax.config import Config


def heldout_examples(config: Config, name: str, count: int, *, ablation: bool = True) -> list[Any]:
  """Task `name`'s first `count` validation examples after the first eval.skip (fewer if the
  split is shorter) whose prompt is not among the skipped ones: a study's tuning split (the
  skipped examples) and its report split are disjoint by prompt, not only by position. After
  Task.preprocess and, for a task of the run when `ablation`, the run's instruction rewrite
  (data.instructions), as in training."""
  from mtjax import tasks as task_registry
  task = task_registry.get(name)
  examples = task.source.load("validation", config.seed).examples
  skip = min(config.eval.skip, len(examples))
  tuning = {examples[i].prompt for i in range(skip)}
  chosen = []
  for i in range(skip, len(examples)):
    if len(chosen) == count:
      break
    if examples[i].prompt not in tuning:
      chosen.append(examples[i])
  if task.preprocess is not None:  # as in training (pipeline.task_dataset)
    chosen = [task.preprocess(ex) for ex in chosen]
  if ablation and name in config.data.tasks:  # the same instruction ablation as in training
    rewrite = task_registry.instruction_rewrite(
        name, config.data.instructions.get(name, "keep"), tuple(config.data.tasks), config.seed)
    if rewrite is not None:
      chosen = [rewrite(ex) for ex in chosen]
  return chosen
