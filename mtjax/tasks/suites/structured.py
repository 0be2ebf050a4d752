"""The `structured` suite: one right answer each (copy, reverse, sort, addition, modular)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mtjax.tasks import Example, exact_match
from mtjax.tasks.suites import SuiteBuilder, register_suite
from mtjax.tasks.synthetic import held_out_by_input

_LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def _word(rng: np.random.Generator, lo: int = 3, hi: int = 12) -> str:
  return "".join(rng.choice(_LETTERS, size=int(rng.integers(lo, hi + 1))))


def copy(rng):
  s = _word(rng)
  return Example("copy: ", s + "\n", s)


def reverse(rng):
  s = _word(rng)
  return Example("reverse: ", s + "\n", s[::-1])


def sort(rng):
  s = _word(rng)
  return Example("sort: ", s + "\n", "".join(sorted(s)))


def addition(rng):
  digits = int(rng.integers(1, 6))
  a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
  return Example("add: ", f"{a}+{b}=", str(a + b))


def modular(rng):
  m = int(rng.integers(2, 30))
  a, b = (int(x) for x in rng.integers(0, 1000, size=2))
  return Example("mod: ", f"({a}*{b}) mod {m}=", str((a * b) % m))


class MtjaxStructured(SuiteBuilder):
  """mtjax structured tasks: one right answer each."""

  SUITE = "structured"
  # 2.0.0: held-out splits from a disjoint part of the prompt space (train changes too).
  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {"3.0.0": "3,000 validation examples (train and the first 500 unchanged)",
                   "2.0.0": "train and validation drawn from disjoint parts of the prompt space",
                   "1.0.0": "validation re-drawn until unseen in train"}
  # Every task is partitioned by a hash of its input: the word (copy, reverse, sort: the same
  # words are held out in all three), the operand pair (addition: 1-digit problems fall in both
  # parts), the operands and modulus (modular).
  TASKS = {"copy": (copy, held_out_by_input), "reverse": (reverse, held_out_by_input),
           "sort": (sort, held_out_by_input), "addition": (addition, held_out_by_input),
           "modular": (modular, held_out_by_input)}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TASKS]


register_suite(MtjaxStructured, {n: exact_match for n in MtjaxStructured.TASKS})
