"""Per-task Grain pipelines and the mixture over them.

Each task is shuffled and repeated on its own, with its own seed (derived from the run seed and
the task name), then tokenized. The mixture is `grain.MapDataset.mix`, which interleaves tasks in
exact proportions and keeps random access: example i of the mixture is a pure function of
(seed, weights, i). That is what makes the loader state one integer.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from mtjax import tasks as task_registry
from mtjax.data.tokenizer import ByteTokenizer
from mtjax.tasks import Example


def task_seed(seed: int, task_name: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(task_name.encode())) % (2**31)


class Tokenize(grain.transforms.Map):
  """Example -> {tokens: [BOS] prompt target [EOS], target_start, task_id}."""

  def __init__(self, tokenizer: ByteTokenizer, task_id: int):
    self.tokenizer = tokenizer
    self.task_id = task_id

  def map(self, example: Example) -> dict:
    tok = self.tokenizer
    prompt = tok.encode(example.prompt)
    target = tok.encode(example.target)
    tokens = np.concatenate([[tok.bos_id], prompt, target, [tok.eos_id]]).astype(np.int32)
    return {"tokens": tokens, "target_start": 1 + len(prompt), "task_id": self.task_id}


def task_dataset(task_name: str, task_id: int, tokenizer: ByteTokenizer, seed: int,
                 split: str = "train") -> grain.MapDataset:
  task = task_registry.get(task_name)
  examples = task.source(split, seed)
  return (grain.MapDataset.source(examples)
          .shuffle(seed=task_seed(seed, task_name))
          .repeat(None)
          .map(Tokenize(tokenizer, task_id)))


def mixture_dataset(task_names: Sequence[str], weights: Mapping[str, float],
                    tokenizer: ByteTokenizer, seed: int) -> grain.MapDataset:
  """Infinite, random-access stream of tokenized examples from the tasks with positive weight.

  Task ids are positions in `task_names` (the run's task list), whatever the weights.
  """
  parts, rates = [], []
  for task_id, name in enumerate(task_names):
    w = float(weights.get(name, 0.0))
    if w > 0:
      parts.append(task_dataset(name, task_id, tokenizer, seed))
      rates.append(w)
  if not parts:
    raise ValueError("mixture has no task with positive weight")
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, rates)


def sampling_rates(task_names: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
  w = np.array([max(float(weights.get(n, 0.0)), 0.0) for n in task_names], dtype=np.float64)
  return w / w.sum()
