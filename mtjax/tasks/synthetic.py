"""Three small in-memory tasks that need no download.

Two have one right answer (reverse a string, add two numbers); one has many (any sentence of a
small grammar), so joint training can be watched for entropy collapse on the open-ended task.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from mtjax.tasks import Example, Task, exact_match, register
from mtjax.tasks.sources import GeneratorSource

TRAIN_SIZE = 20_000
VALIDATION_SIZE = 500

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _rng(task: str, split: str, seed: int) -> np.random.Generator:
  return np.random.default_rng([zlib.crc32(f"{task}/{split}".encode()), seed])


def _split(task: str, make, split: str, seed: int, held_out: bool) -> tuple[Example, ...]:
  """Draws examples; with held_out, validation keeps only prompts never seen in train."""
  size = {"train": TRAIN_SIZE, "validation": VALIDATION_SIZE}[split]
  rng = _rng(task, split, seed)
  seen = set()
  if held_out and split == "validation":
    seen = {e.prompt for e in _cached(task, make, "train", seed, held_out)}
  out = []
  while len(out) < size:
    ex = make(rng)
    if ex.prompt not in seen:
      out.append(ex)
  return tuple(out)


@functools.lru_cache(maxsize=32)
def _cached(task: str, make, split: str, seed: int, held_out: bool) -> tuple[Example, ...]:
  return _split(task, make, split, seed, held_out)


def _make_reverse(rng: np.random.Generator) -> Example:
  n = int(rng.integers(3, 13))
  s = "".join(rng.choice(list(_LETTERS), size=n))
  return Example("reverse: ", s + "\n", s[::-1])


def _make_addition(rng: np.random.Generator) -> Example:
  a, b = (int(x) for x in rng.integers(0, 1000, size=2))
  return Example("add: ", f"{a}+{b}=", str(a + b))


# A small grammar: DET [ADJ] NOUN VERB DET [ADJ] NOUN. 3*4*5*4 squared-ish: thousands of sentences.
_DET = ("the", "a", "every")
_ADJ = ("red", "small", "quick", "old")
_NOUN = ("cat", "dog", "bird", "fox", "tree")
_VERB = ("sees", "likes", "chases", "finds")


def _noun_phrase(rng: np.random.Generator) -> list[str]:
  words = [str(rng.choice(_DET))]
  if rng.random() < 0.5:
    words.append(str(rng.choice(_ADJ)))
  words.append(str(rng.choice(_NOUN)))
  return words


def _make_sentence(rng: np.random.Generator) -> Example:
  words = _noun_phrase(rng) + [str(rng.choice(_VERB))] + _noun_phrase(rng)
  return Example("sentence: ", "", " ".join(words))


def is_grammatical(text: str) -> bool:
  words = text.strip().split(" ")

  def noun_phrase(i: int) -> int:
    if i < len(words) and words[i] in _DET:
      i += 1
      if i < len(words) and words[i] in _ADJ:
        i += 1
      if i < len(words) and words[i] in _NOUN:
        return i + 1
    return -1

  i = noun_phrase(0)
  if i < 0 or i >= len(words) or words[i] not in _VERB:
    return False
  return noun_phrase(i + 1) == len(words)


def _source(name: str, make, held_out: bool = True) -> GeneratorSource:
  return GeneratorSource(lambda split, seed: _cached(name, make, split, seed, held_out))


register(Task("reverse", _source("reverse", _make_reverse), exact_match))
register(Task("addition", _source("addition", _make_addition), exact_match))
# One prompt for every example: held-out means fresh draws, judged by the grammar.
register(Task("grammar", _source("grammar", _make_sentence, held_out=False),
              lambda ex, out: is_grammatical(out), open_ended=True, metrics=("valid", "distinct")))
