"""Per-task Grain pipelines: source -> shuffle -> repeat -> tokenize, read by index.

Each task is shuffled and repeated on its own, with its own seed (derived from the run seed and
the task name). Random access keeps the loader state small: a task's next example is its
cursor. Mixing across tasks (with rates that may change every step) is data/mixture.py's job.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from mtjax import tasks as task_registry
from mtjax.data.tokenizer import Tokenizer
from mtjax.tasks import Example


def task_seed(seed: int, task_name: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(task_name.encode())) % (2**31)


class Tokenize(grain.transforms.Map):
  """Example -> {tokens: [BOS] prompt target [EOS], target_start, task_id}."""

  def __init__(self, tokenizer: Tokenizer, task_id: int):
    self.tokenizer = tokenizer
    self.task_id = task_id

  def map(self, example: Example) -> dict[str, Any]:
    tok = self.tokenizer
    prompt = tok.encode(example.prompt)
    target = tok.encode(example.target)
    tokens = np.concatenate([[tok.bos_id], prompt, target, [tok.eos_id]]).astype(np.int32)
    return {"tokens": tokens, "target_start": 1 + len(prompt), "task_id": self.task_id}


class Length(grain.transforms.Map):
  """Example -> its token count as Tokenize would make it, without building the array."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, example: Example) -> int:
    return 2 + self.tokenizer.count(example.prompt) + self.tokenizer.count(example.target)


def loss_tokens(length: int, target_start: int, seq_len: int) -> int:
  """Loss-carrying (input, target) pairs of an example of `length` tokens whose target starts at
  token `target_start`, once the loader cuts it to seq_len pairs (loader.place: pair t predicts
  token t + 1 and counts when that token belongs to the target)."""
  pairs = min(length - 1, seq_len)
  return max(0, pairs - (target_start - 1))


@dataclasses.dataclass(frozen=True)
class TokenSample:
  """Token counts of the first examples of a task's split, tokenized as the loader does."""

  task: str
  prompt: tuple[int, ...]  # prompt tokens per example (instruction + input; BOS not counted)
  target: tuple[int, ...]  # target tokens per example (EOS not counted)
  loss: tuple[int, ...]  # loss tokens per example at seq_len

  @property
  def min_seq_len(self) -> int:
    """The smallest seq_len at which some sampled example keeps a loss token (BOS + prompt + 1)."""
    return min(self.prompt) + 1

  @property
  def full_seq_len(self) -> int:
    """The seq_len at which every sampled example fits whole (BOS + prompt + target + EOS - 1)."""
    return max(p + t + 1 for p, t in zip(self.prompt, self.target))


def token_sample(task_name: str, tokenizer: Tokenizer, seed: int, seq_len: int, count: int = 64,
                 split: str = "train", on_bad_record: str = "stop",
                 rewrite: Callable[[Example], Example] | None = None) -> TokenSample:
  """The first `count` examples of a task's split (source order, preprocessed, rewritten and
  tokenized as the loader does): their prompt, target and loss token counts at seq_len."""
  task = task_registry.get(task_name)
  examples = task.source.load(split, seed, on_bad_record).examples
  tokenize = Tokenize(tokenizer, 0)
  prompt, target, loss = [], [], []
  for i in range(min(count, len(examples))):
    example = examples[i]
    if task.preprocess is not None:
      example = task.preprocess(example)
    if rewrite is not None:
      example = rewrite(example)
    item = tokenize.map(example)
    length, start = len(item["tokens"]), item["target_start"]
    prompt.append(start - 1)
    target.append(length - start - 1)
    loss.append(loss_tokens(length, start, seq_len))
  return TokenSample(task_name, tuple(prompt), tuple(target), tuple(loss))


@dataclasses.dataclass
class TaskData:
  tokens: grain.MapDataset[dict[str, Any]]  # infinite, shuffled: {tokens, target_start, task_id}
  lengths: grain.MapDataset[int]  # the same order: token counts only (for planning the packing)
  skipped: int  # bad records skipped when loading the source


def task_dataset(task_name: str, task_id: int, tokenizer: Tokenizer, seed: int,
                 split: str = "train", on_bad_record: str = "stop",
                 rewrite: Callable[[Example], Example] | None = None) -> TaskData:
  task = task_registry.get(task_name)
  loaded = task.source.load(split, seed, on_bad_record)
  ordered = (grain.MapDataset.source(loaded.examples)
             .shuffle(seed=task_seed(seed, task_name))
             .repeat(None))
  if task.preprocess is not None:
    ordered = ordered.map(task.preprocess)
  if rewrite is not None:  # the instruction ablation (data.instructions)
    ordered = ordered.map(rewrite)
  return TaskData(ordered.map(Tokenize(tokenizer, task_id)), ordered.map(Length(tokenizer)),
                  loaded.skipped)
