"""Small in-memory tasks that need no download.

Two have one right answer (reverse a string, add two numbers); one has many (any sentence of a
small grammar with the subject and object nouns the prompt names), so joint training can be
watched for entropy collapse on the open-ended task. structured_sort_desc (sort a word descending:
structured_sort then structured_reverse) is eval-only: the held-out composite of the expert
composition study.

Held-out splits come from a disjoint part of the prompt space: every task partitions its prompts
(by their defining content: the string, the operand pair, the pair of nouns) into a train part
and a held-out part before drawing, so validation prompts never occur in train for any seed, and
the two parts have alike distributions (a hash, or for grammar a balanced Latin square).
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from collections.abc import Callable

import numpy as np

from mtjax.tasks import Example, Task, exact_match, register
from mtjax.tasks.sources import GeneratorSource

TRAIN_SIZE = 20_000
# 1,500: a study scores 1,000 teacher-forced examples after a 100-example tuning split, with
# room for the report split's examples that share a prompt with the tuning split (left out).
VALIDATION_SIZE = 1500

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# The share of a task's prompt space held out for validation (train never draws from it).
HELD_OUT_FRACTION = 0.2

HeldOut = Callable[[Example], bool]  # True: the example's prompt lies in the held-out part


def hashed(key: str, fraction: float = HELD_OUT_FRACTION) -> bool:
  """Whether `key` (a prompt's defining content) lies in the held-out part: a fixed hash
  (blake2b, not Python's salted hash), so the partition is the same on every machine."""
  h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
  return h < fraction * 2**64


def held_out_by_input(example: Example) -> bool:
  """The default partition: by the example's input (its prompt without the instruction, so a
  rewritten instruction keeps the parts disjoint). A copy, reverse or sort word, an addition pair,
  is held out in every task that shows it. The hash ignores content, so both parts are alike in
  distribution up to sampling noise, which is largest for small prompt spaces."""
  return hashed(example.input)


def _rng(task: str, split: str, seed: int) -> np.random.Generator:
  return np.random.default_rng([zlib.crc32(f"{task}/{split}".encode()), seed])


def _split(task: str, make, split: str, seed: int, held_out: HeldOut) -> tuple[Example, ...]:
  """Draws examples from the split's part of the prompt space: validation from the held-out
  part, train from the rest (the partition does not depend on the seed)."""
  size = {"train": TRAIN_SIZE, "validation": VALIDATION_SIZE}[split]
  want = split == "validation"
  rng = _rng(task, split, seed)
  out = []
  while len(out) < size:
    ex = make(rng)
    if held_out(ex) == want:
      out.append(ex)
  return tuple(out)


@functools.lru_cache(maxsize=32)
def _cached(task: str, make, split: str, seed: int, held_out: HeldOut) -> tuple[Example, ...]:
  return _split(task, make, split, seed, held_out)


def _make_reverse(rng: np.random.Generator) -> Example:
  n = int(rng.integers(3, 13))
  s = "".join(rng.choice(list(_LETTERS), size=n))
  return Example("reverse: ", s + "\n", s[::-1])


def _make_sort_desc(rng: np.random.Generator) -> Example:
  """The structured suite's word (3 to 12 letters, as structured_copy/reverse/sort draw it), sorted
  descending: structured_sort's answer reversed, a composition of sort and reverse."""
  n = int(rng.integers(3, 13))
  s = "".join(rng.choice(list(_LETTERS), size=n))
  return Example("sort desc: ", s + "\n", "".join(sorted(s, reverse=True)))


def _make_addition(rng: np.random.Generator) -> Example:
  a, b = (int(x) for x in rng.integers(0, 1000, size=2))
  return Example("add: ", f"{a}+{b}=", str(a + b))


# A small grammar: DET [ADJ] NOUN VERB DET [ADJ] NOUN. 45 nouns of at most 4 letters (so the
# longest prompt and target fit seq_len 64), so the prompt space (subject, object) holds 2,025
# prompts and its held-out part 405: enough distinct held-out prompts for a report split of 100+.
_DET = ("the", "a", "every")
_ADJ = ("red", "small", "quick", "old")
_NOUN = ("cat", "dog", "bird", "fox", "tree", "owl", "bee", "ant", "cow", "pig", "hen", "rat",
         "bat", "elk", "yak", "eel", "emu", "ram", "goat", "duck", "frog", "wolf", "bear", "lion",
         "deer", "crab", "moth", "wasp", "seal", "mole", "toad", "hawk", "crow", "swan", "lamb",
         "mule", "colt", "calf", "gnu", "ape", "boar", "hare", "cub", "pup", "kid")
_VERB = ("sees", "likes", "chases", "finds")
# The held-out (subject, object) pairs: 9 of the 45 diagonals of the Latin square (object index -
# subject index, cyclically), every fifth from 2: each noun is a held-out subject 9 times and a
# held-out object 9 times, so noun (and length) distributions match in both parts.
_HELD_OUT_DIAGONALS = frozenset(range(2, len(_NOUN), 5))


def _noun_phrase(rng: np.random.Generator) -> list[str]:
  words = [str(rng.choice(_DET))]
  if rng.random() < 0.5:
    words.append(str(rng.choice(_ADJ)))
  words.append(str(rng.choice(_NOUN)))
  return words


def _make_sentence(rng: np.random.Generator) -> Example:
  """A sentence whose subject and object nouns the prompt names, "fox, tree" (many right answers:
  900 per prompt; 2,025 prompts)."""
  subject, verb, obj = _noun_phrase(rng), str(rng.choice(_VERB)), _noun_phrase(rng)
  return Example("sentence: ", f"{subject[-1]}, {obj[-1]}\n",
                 " ".join(subject + [verb] + obj))


# "sentence: fox, tree\n" asks for a sentence with subject fox and object tree; prompt and
# longest target fit seq_len 64 with BOS and EOS (21 + 40 + 2 bytes).
_ASKS = re.compile(r"(\w+), (\w+)\s*")


def sentence_held_out(example: Example) -> bool:
  """The grammar's held-out part: the (subject, object) pairs on 9 diagonals of the 45 x 45 Latin
  square (object index - subject index in _HELD_OUT_DIAGONALS, cyclically): 405 of 2,025
  prompts, each noun 9 times as held-out subject and 9 times as held-out object."""
  m = _ASKS.fullmatch(example.input)
  if m is None:
    raise ValueError(f"not a grammar prompt: {example.input!r}")
  return (_NOUN.index(m[2]) - _NOUN.index(m[1])) % len(_NOUN) in _HELD_OUT_DIAGONALS


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


def sentence_ok(example: Example, output: str) -> bool:
  """The grammar task's verifier: a grammatical sentence with the subject and object nouns the
  prompt names (any nouns for a prompt that names none)."""
  if not is_grammatical(output):
    return False
  m = _ASKS.fullmatch(example.input)
  if m is None:
    return True
  words = output.strip().split(" ")
  verb = next(i for i, w in enumerate(words) if w in _VERB)
  return words[verb - 1] == m[1] and words[-1] == m[2]


def _phrases(noun: str) -> list[tuple[list[str], float]]:
  """Every noun phrase of _noun_phrase ending in `noun`, with its probability given the noun."""
  out = []
  for det in _DET:
    out.append(([det, noun], 0.5 / len(_DET)))
    out += [([det, adj, noun], 0.5 / len(_DET) / len(_ADJ)) for adj in _ADJ]
  return out


def sentence_distribution(example: Example) -> list[tuple[str, float]]:
  """Every sentence _make_sentence can give for the example's prompt, with its probability (the
  determiners, adjectives and verb are a guess: the grammar task's token_accuracy ceiling)."""
  m = _ASKS.fullmatch(example.input)
  if m is None:
    raise ValueError(f"not a grammar prompt: {example.input!r}")
  return [(" ".join(s + [verb] + o), ps * po / len(_VERB))
          for s, ps in _phrases(m[1]) for verb in _VERB for o, po in _phrases(m[2])]


def _source(name: str, make, held_out: HeldOut = held_out_by_input) -> GeneratorSource:
  return GeneratorSource(lambda split, seed: _cached(name, make, split, seed, held_out))


register(Task("reverse", _source("reverse", _make_reverse), exact_match))
# Partitioned by the operand pair (the input), so 1-digit problems fall in both parts.
register(Task("addition", _source("addition", _make_addition), exact_match))
# A held-out composite for the expert-composition study (issue 20, study ii): eval-only, so no
# training mixture takes it (data.allow_eval_only would be needed). Partitioned by the input word
# as the structured tasks are: its held-out words are the ones they hold out too.
register(Task("structured_sort_desc", _source("structured_sort_desc", _make_sort_desc), exact_match,
              eval_only=True))
register(Task("grammar", _source("grammar", _make_sentence, sentence_held_out), sentence_ok,
              open_ended=True, metrics=("valid", "distinct"),
              target_distribution=sentence_distribution))
