"""Held-out prompts that also occur in training: a user task's "validation" prompts found among
its "train" prompts (exact prompt string, instruction + input, after the task's preprocess).

Only tasks read from the user's files (JsonlSource, ArrayRecordSource) are checked: the built-in
suites are held out by construction, and a task without both splits has nothing to compare. The
train prompts are hashed once (8-byte BLAKE2b digests, in one pass over the split), then each
validation prompt is looked up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from mtjax import tasks as task_registry

EXAMPLES = 3  # overlapping prompts shown per task
SHOWN_CHARS = 60  # of each shown prompt


def _digest(text: str) -> bytes:
  return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def checked(task_name: str) -> bool:
  """Whether a task is a user task with both a train and a validation split."""
  from mtjax.tasks.sources import ArrayRecordSource, JsonlSource
  source = task_registry.get(task_name).source
  if not isinstance(source, (JsonlSource, ArrayRecordSource)):
    return False
  return "train" in source.files and "validation" in source.files


def _prompts(task: Any, split: str, seed: int) -> Any:
  """The split's prompts after the task's preprocess, one at a time."""
  examples = task.source.load(split, seed, "skip").examples  # bad records are the loader's to report
  for i in range(len(examples)):
    example = examples[i]
    yield (example if task.preprocess is None else task.preprocess(example)).prompt


def count(task_name: str, seed: int = 0) -> tuple[int, int, list[str]]:
  """(validation prompts also in train, validation prompts, up to EXAMPLES of them); (0, 0, [])
  for a task that is not checked."""
  if not checked(task_name):
    return 0, 0, []
  task = task_registry.get(task_name)
  train = {_digest(p) for p in _prompts(task, "train", seed)}
  found, total, examples = 0, 0, []
  for prompt in _prompts(task, "validation", seed):
    total += 1
    if _digest(prompt) in train:
      found += 1
      if len(examples) < EXAMPLES:
        examples.append(prompt)
  return found, total, examples


def overlap(task_name: str, seed: int = 0) -> tuple[int, list[str]]:
  """How many of a user task's validation prompts also occur among its train prompts, with up
  to 3 of them; (0, []) for built-in suites and tasks without both splits."""
  found, _, examples = count(task_name, seed)
  return found, examples


def _shown(prompt: str) -> str:
  return repr(prompt if len(prompt) <= SHOWN_CHARS else prompt[:SHOWN_CHARS] + "…")


def line(task_name: str, seed: int = 0) -> str | None:
  """The warning line for a task whose validation prompts occur in train, else None."""
  found, total, examples = count(task_name, seed)
  if not found:
    return None
  return (f"warning: task {task_name!r}: {found} of its {total} validation prompts also occur in "
          f"its train split, so its eval scores are not held out (e.g. "
          f"{', '.join(_shown(p) for p in examples)})")


def lines(task_names: Sequence[str], seed: int = 0) -> list[str]:
  return [w for w in (line(n, seed) for n in task_names) if w is not None]


def warn(config: Any) -> list[str]:
  """Warning lines (one per task of data.tasks whose validation prompts occur in its train
  split) for the start of training; [] when there is none. Resolves the config (registers its
  data.jsonl_tasks), reads each checked task's two splits once."""
  from mtjax.data.resolve import resolve_data
  config = resolve_data(config)
  return lines(config.data.tasks, config.seed)
