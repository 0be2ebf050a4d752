"""The `structured` suite: one right answer each (copy, reverse, sort, addition, modular)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mtjax.tasks import Example, exact_match
from mtjax.tasks.suites import SuiteBuilder, register_suite

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
  TASKS = {"copy": (copy, True), "reverse": (reverse, True), "sort": (sort, True),
           "addition": (addition, True), "modular": (modular, True)}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TASKS]


register_suite(MtjaxStructured, {n: exact_match for n in MtjaxStructured.TASKS})
