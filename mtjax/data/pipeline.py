"""Per-task Grain pipelines: source -> shuffle -> repeat -> tokenize, read by index.

Each task is shuffled and repeated on its own, with its own seed (derived from the run seed and
the task name). Random access keeps the loader state small: a task's next example is its
cursor. Mixing across tasks (with rates that may change every step) is data/mixture.py's job.

`TaskIndex` is the same order without Grain's per-element calls: cursor -> source index in
numpy, and a per-split length index (prompt and target token counts by source index, computed
once per split, tokenizer, preprocessing and rewrite, kept in memory) so the loader plans packing,
and truncation under data.truncate (`fit`), without tokenizing.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import grain
import numpy as np

from mtjax import tasks as task_registry
from mtjax.data.tokenizer import (ByteTokenizer, ChatTokenizer, SlotTokenizer, Tokenizer,
                                   encode_example, prompt_count, target_count)
from mtjax.tasks import Example


def task_seed(seed: int, task_name: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(task_name.encode())) % (2**31)


class Tokenize(grain.transforms.Map):
  """Example -> {tokens: [BOS] prompt target [EOS], target_start, task_id}. Under data.format=chat
  (a ChatTokenizer) the tokens are the rendered user turn with the generation prompt, then the
  target and the template's end-of-turn text (tokenizer.encode_example): the counts below then
  treat the first token as the BOS and the last as the EOS, so every length rule holds as is."""

  def __init__(self, tokenizer: Tokenizer, task_id: int):
    self.tokenizer = tokenizer
    self.task_id = task_id

  def map(self, example: Example) -> dict[str, Any]:
    prompt, target = encode_example(self.tokenizer, example.prompt, example.target)
    tokens = np.concatenate([prompt, target]).astype(np.int32)
    return {"tokens": tokens, "target_start": len(prompt), "task_id": self.task_id}


class Length(grain.transforms.Map):
  """Example -> its token count as Tokenize would make it, without building the array."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, example: Example) -> int:
    tok = self.tokenizer
    return 2 + prompt_count(tok, example.prompt) + target_count(tok, example.target)


def fit(prompt: int, target: int, seq_len: int, policy: str) -> tuple[int, int] | None:
  """How an example of `prompt` prompt tokens and `target` target tokens (BOS and EOS not
  counted) goes into seq_len (input, target) pairs under data.truncate: (prompt tokens cut from
  the left, pairs written), or None when it is skipped. Its tokens are [BOS] prompt target [EOS]:
  prompt + target + 1 pairs.

  prompt_left: cut the prompt's first tokens (BOS stays) so the target stays whole; skipped when
    the target alone does not fit (target + 1 > seq_len).
  right: keep the first seq_len pairs; skipped when no target token would remain.
  skip: skipped whenever it does not fit whole.
  """
  pairs = prompt + target + 1
  if pairs <= seq_len:
    return 0, pairs
  if policy == "prompt_left":
    return (pairs - seq_len, seq_len) if target + 1 <= seq_len else None
  if policy == "right":
    return (0, seq_len) if prompt < seq_len else None
  if policy == "skip":
    return None
  raise ValueError(f"unknown truncation policy {policy!r}")


def fit_arrays(prompt: np.ndarray, target: np.ndarray, seq_len: int,
               policy: str) -> tuple[np.ndarray, np.ndarray]:
  """`fit` of many examples at once: (prompt tokens cut, pairs written) per example, pairs 0
  where the example is skipped (a kept example writes at least one pair)."""
  prompt = np.asarray(prompt, np.int64)
  target = np.asarray(target, np.int64)
  pairs = prompt + target + 1
  over = pairs > seq_len
  if policy == "prompt_left":
    keep = ~over | (target + 1 <= seq_len)
    cut = np.where(over & keep, pairs - seq_len, 0)
  elif policy == "right":
    keep = ~over | (prompt < seq_len)
    cut = np.zeros_like(pairs)
  elif policy == "skip":
    keep = ~over
    cut = np.zeros_like(pairs)
  else:
    raise ValueError(f"unknown truncation policy {policy!r}")
  return cut, np.where(keep, np.minimum(pairs, seq_len), 0)


def apply_fit(example: dict[str, Any], cut: int) -> dict[str, Any]:
  """A tokenized example ({tokens: [BOS] prompt target [EOS], target_start, ...}) with its
  prompt's first `cut` tokens removed (BOS stays), as `fit` plans it under prompt_left; the other
  keys are kept. Place its first n pairs (rows.place) with n from `fit`."""
  if not cut:
    return example
  tokens, start = example["tokens"], int(example["target_start"])
  if not 0 < cut <= start - 1:
    raise ValueError(f"cut {cut} outside the prompt's {start - 1} tokens")
  return {**example, "tokens": np.concatenate([tokens[:1], tokens[1 + cut:]]),
          "target_start": start - cut}


def fit_example(example: dict[str, Any], seq_len: int,
                policy: str) -> tuple[dict[str, Any], int] | None:
  """A tokenized example as the loader places it under data.truncate: (the example after
  `apply_fit`, pairs to write), or None when the loader skips it (counted in too_long)."""
  start = int(example["target_start"])
  planned = fit(start - 1, len(example["tokens"]) - start - 1, seq_len, policy)
  if planned is None:
    return None
  cut, pairs = planned
  return apply_fit(example, cut), pairs


@dataclasses.dataclass(frozen=True)
class Effect:
  """What one truncation policy does to some examples at one seq_len."""

  examples: int
  truncated: int  # cut and kept
  too_long: int  # skipped
  loss_tokens: int  # loss tokens (target + EOS) of the examples whole
  loss_lost: int  # of which are not trained (cut off, or in a skipped example)


def effect(prompt: Sequence[int] | np.ndarray, target: Sequence[int] | np.ndarray, seq_len: int,
           policy: str) -> Effect:
  """Examples truncated, skipped and loss tokens lost under `policy` at seq_len."""
  p = np.asarray(prompt, np.int64)
  t = np.asarray(target, np.int64)
  cut, pairs = fit_arrays(p, t, seq_len, policy)
  kept = pairs > 0
  loss = t + 1
  # A kept example's loss pairs: pairs written minus the prompt pairs left (the prompt after its
  # cut; pair t predicts token t + 1).
  trained = np.where(kept, np.clip(pairs - (p - cut), 0, None), 0)
  return Effect(len(p), int((kept & (p + t + 1 > seq_len)).sum()), int((~kept).sum()),
                int(loss.sum()), int((loss - trained).sum()))


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
  loss: tuple[int, ...]  # loss tokens per example at seq_len under `truncate`
  seq_len: int = 0
  truncate: str = "right"

  @property
  def min_seq_len(self) -> int:
    """The smallest seq_len at which some sampled example keeps a loss token (BOS + prompt + 1)."""
    return min(self.prompt) + 1

  @property
  def full_seq_len(self) -> int:
    """The seq_len at which every sampled example fits whole (BOS + prompt + target + EOS - 1)."""
    return max(p + t + 1 for p, t in zip(self.prompt, self.target))

  @property
  def full_seq_len_min(self) -> int:
    """The seq_len at which some sampled example fits whole."""
    return min(p + t + 1 for p, t in zip(self.prompt, self.target))

  def effect(self, policy: str, seq_len: int | None = None) -> Effect:
    """What `policy` does to the sampled examples at seq_len (default: the sample's)."""
    return effect(self.prompt, self.target, self.seq_len if seq_len is None else seq_len, policy)


def token_sample(task_name: str, tokenizer: Tokenizer, seed: int, seq_len: int, count: int = 64,
                 split: str = "train", on_bad_record: str = "stop",
                 rewrite: Callable[[Example], Example] | None = None,
                 truncate: str = "right") -> TokenSample:
  """The first `count` examples of a task's split (source order, preprocessed, rewritten and
  counted as the loader tokenizes them): their prompt and target token counts, and their loss
  tokens at seq_len under the truncation policy `truncate` ("right": the first seq_len pairs,
  what `loss_tokens` counts)."""
  task = task_registry.get(task_name)
  examples = task.source.load(split, seed, on_bad_record).examples
  transform = _compose(task.preprocess, rewrite)
  sample = [examples[i] for i in range(min(count, len(examples)))]
  if transform is not None:
    sample = [transform(e) for e in sample]
  prompt = _count_all(tokenizer, [e.prompt for e in sample])
  target = _count_all(tokenizer, [e.target for e in sample], target=True)
  cut, pairs = fit_arrays(prompt, target, seq_len, truncate)
  loss = np.where(pairs > 0, np.clip(pairs - (prompt - cut), 0, None), 0)
  return TokenSample(task_name, tuple(prompt.tolist()), tuple(target.tolist()),
                     tuple(loss.tolist()), seq_len, truncate)


def shuffled_order(size: int, shuffle_seed: int, start: int, stop: int) -> np.ndarray:
  """Source indices at cursors [start, stop) of `MapDataset.source(x).shuffle(seed).repeat(None)`
  with len(x) = size: Grain's index_shuffle of the index in its epoch, reseeded every epoch."""
  from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

  shuffle = index_shuffle_module.index_shuffle
  if size == 1:  # one order only (and index_shuffle cycle-walks a large domain to find it)
    return np.zeros(stop - start, np.int64)
  out = np.empty(stop - start, np.int64)
  cursor = start
  while cursor < stop:  # one epoch's piece at a time
    epoch, first = divmod(cursor, size)
    last = min(size, first + stop - cursor)
    seed = (shuffle_seed + epoch) % 2**32
    out[cursor - start : cursor - start + last - first] = [
        shuffle(i, max_index=size - 1, seed=seed, rounds=4) for i in range(first, last)]
    cursor += last - first
  return out


def _count_all(tokenizer: Tokenizer, texts: list[str], target: bool = False) -> np.ndarray:
  """Prompt (or target) counts as Tokenize makes them (BOS and EOS not counted)."""
  if type(tokenizer) is ByteTokenizer:  # count is the UTF-8 length
    return np.fromiter((len(t.encode()) for t in texts), np.int64, len(texts))
  if isinstance(tokenizer, (ChatTokenizer, SlotTokenizer)):
    count = target_count if target else prompt_count
    return np.fromiter((count(tokenizer, t) for t in texts), np.int64, len(texts))
  return np.fromiter((tokenizer.count(t) for t in texts), np.int64, len(texts))


# Length indexes by (examples, preprocess, rewrite, tokenizer); the value pins those objects, so
# the ids in a key are never reused while it is here.
_LENGTHS: collections.OrderedDict[tuple, tuple[Any, np.ndarray]] = collections.OrderedDict()
_LENGTHS_MAX = 256
_LENGTHS_LOCK = threading.Lock()


def _length_index(examples: Sequence[Example], preprocess: Any, rewrite: Any,
                  rewrite_key: Hashable, tokenizer: Tokenizer) -> np.ndarray:
  """The shared [N, 2] array of (prompt, target) token counts (-1: not counted yet) of one split
  under one preprocessing. A rewrite without a key is keyed by its identity (pinned, so the id is
  not reused)."""
  try:
    hash(tokenizer)
    tok_key: Hashable = tokenizer  # equal tokenizers (ByteTokenizer) share
  except TypeError:
    tok_key = id(tokenizer)
  if rewrite is None:
    rewrite_key = None
  elif rewrite_key is None:
    rewrite_key = ("rewrite", id(rewrite))
  key = (id(examples), id(preprocess), rewrite_key, tok_key)
  with _LENGTHS_LOCK:
    if key in _LENGTHS:
      _LENGTHS.move_to_end(key)
      return _LENGTHS[key][1]
    lengths = np.full((len(examples), 2), -1, np.int64)
    _LENGTHS[key] = ((examples, preprocess, rewrite, tokenizer), lengths)
    while len(_LENGTHS) > _LENGTHS_MAX:
      _LENGTHS.popitem(last=False)
    return lengths


class TaskIndex:
  """A task's examples in the loader's order, with their token counts.

  `order(start, stop)` gives the source indices at cursors [start, stop) (the pipeline's
  shuffle and repeat), `counts(src)` their [K, 2] (prompt, target) token counts as Tokenize makes
  them (BOS and EOS not counted; counted once, then read from the length index), `lengths(src)`
  their whole token counts, `texts(src)` their (prompt, target) after preprocessing.
  """

  def __init__(self, examples: Sequence[Example], shuffle_seed: int,
               transform: Callable[[Example], Example] | None, tokenizer: Tokenizer,
               lengths: np.ndarray):
    self.examples, self.size = examples, len(examples)
    self.shuffle_seed, self.transform, self.tokenizer = shuffle_seed, transform, tokenizer
    self._lengths = lengths

  def example(self, src: int) -> Example:
    example = self.examples[src]
    return example if self.transform is None else self.transform(example)

  def order(self, start: int, stop: int) -> np.ndarray:
    return shuffled_order(self.size, self.shuffle_seed, start, stop)

  def counts(self, src: np.ndarray) -> np.ndarray:
    src = np.asarray(src, np.int64)
    known = self._lengths[src]
    missing = np.unique(src[(known < 0).any(axis=1)])  # a row half written by another thread too
    if len(missing):  # count each example once, for every loader of this split
      examples = [self.example(int(i)) for i in missing]
      self._lengths[missing] = np.stack(
          [_count_all(self.tokenizer, [e.prompt for e in examples]),
           _count_all(self.tokenizer, [e.target for e in examples], target=True)], axis=1)
      known = self._lengths[src]
    return known

  def lengths(self, src: np.ndarray) -> np.ndarray:
    """Token counts of whole examples: BOS + prompt + target + EOS."""
    return self.counts(src).sum(axis=1) + 2

  def texts(self, src: Sequence[int]) -> tuple[list[str], list[str]]:
    examples = [self.example(int(i)) for i in src]
    return [e.prompt for e in examples], [e.target for e in examples]


@dataclasses.dataclass
class TaskData:
  tokens: grain.MapDataset[dict[str, Any]]  # infinite, shuffled: {tokens, target_start, task_id}
  lengths: grain.MapDataset[int]  # the same order: token counts only (for planning the packing)
  skipped: int  # bad records skipped when loading the source
  index: TaskIndex  # the same order and counts, read in numpy (what the loader uses)


def task_dataset(task_name: str, task_id: int, tokenizer: Tokenizer, seed: int,
                 split: str = "train", on_bad_record: str = "stop",
                 rewrite: Callable[[Example], Example] | None = None,
                 rewrite_key: Hashable = None) -> TaskData:
  """The task's pipeline. `rewrite_key` names `rewrite` for the length index (equal keys: equal
  rewrites); a rewrite without a key gets a length index of its own."""
  task = task_registry.get(task_name)
  loaded = task.source.load(split, seed, on_bad_record)
  ordered = (grain.MapDataset.source(loaded.examples)
             .shuffle(seed=task_seed(seed, task_name))
             .repeat(None))
  if task.preprocess is not None:
    ordered = ordered.map(task.preprocess)
  if rewrite is not None:  # the instruction ablation (data.instructions)
    ordered = ordered.map(rewrite)
  transform = _compose(task.preprocess, rewrite)
  lengths = _length_index(loaded.examples, task.preprocess, rewrite, rewrite_key, tokenizer)
  index = TaskIndex(loaded.examples, task_seed(seed, task_name), transform, tokenizer, lengths)
  return TaskData(ordered.map(Tokenize(tokenizer, task_id)), ordered.map(Length(tokenizer)),
                  loaded.skipped, index)


def searched_instruction(original: str, text: str) -> str:
  """An instruction text found by the instruction search (which joins words with single spaces),
  in the prompt format of the example's own instruction: its words, then the original's trailing
  whitespace (the separator before the input); "" stays "" (no instruction)."""
  words = " ".join(text.split())
  if not words:
    return ""
  return words + original[len(original.rstrip()):]


def with_instruction(index: TaskIndex, text: str) -> TaskIndex:
  """`index` with every example's instruction replaced by `text` (searched_instruction): the same
  order, its own token counts (counted when first needed)."""
  rewrite = lambda ex: dataclasses.replace(ex, instruction=searched_instruction(ex.instruction, text))
  transform = _compose(index.transform, rewrite)
  return TaskIndex(index.examples, index.shuffle_seed, transform, index.tokenizer,
                   np.full((index.size, 2), -1, np.int64))


def _compose(preprocess: Callable[[Example], Example] | None,
             rewrite: Callable[[Example], Example] | None) -> Callable[[Example], Example] | None:
  if preprocess is None or rewrite is None:
    return preprocess or rewrite
  return lambda example: rewrite(preprocess(example))
