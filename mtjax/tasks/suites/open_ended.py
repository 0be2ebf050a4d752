"""The `open_ended` suite: many right answers, each with a verifier (entropy and diversity)."""

from __future__ import annotations

import re

import tensorflow_datasets as tfds

from mtjax.tasks import Example
from mtjax.tasks.suites import SuiteBuilder, register_suite
from mtjax.tasks.synthetic import (_make_sentence, held_out_by_input, sentence_distribution,
                                   sentence_held_out, sentence_ok)

_ADJ = ("red", "small", "quick", "old", "green", "loud")
_NOUN = ("cat", "dog", "bird", "fox", "tree", "river")
_VERB = ("sees", "likes", "chases", "finds", "hears")
_SLOTS = {"ADJ": _ADJ, "NOUN": _NOUN, "VERB": _VERB}


def grammar(rng):
  return _make_sentence(rng)


def sum_pair(rng):
  """Any a, b >= 0 with a + b = N (N from 2 to 1,999: about 400 held-out N's)."""
  n = int(rng.integers(2, 2000))
  a = int(rng.integers(0, n + 1))
  return Example("two numbers that sum to: ", f"{n}\n", f"{a}+{n - a}")


def sum_pair_ok(example: Example, output: str) -> bool:
  m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", output)
  return bool(m) and int(m[1]) + int(m[2]) == int(example.input.strip())


def sum_pair_distribution(example: Example) -> list[tuple[str, float]]:
  """Every target sum_pair draws for the prompt's N, each with probability 1 / (N + 1): the first
  number is a guess, the rest follows (its token_accuracy ceiling)."""
  n = int(example.input.strip())
  return [(f"{a}+{n - a}", 1.0 / (n + 1)) for a in range(n + 1)]


def template(rng):
  """Fill the slots of a template with any word of the slot's kind."""
  parts = ["the", "ADJ", "NOUN", "VERB", "a", "NOUN"]
  keep = rng.random(len(parts)) < 0.5  # some slots are given, the rest are free
  shown = [p if (p not in _SLOTS or not k) else str(rng.choice(_SLOTS[p])) for p, k in zip(parts, keep)]
  filled = [str(rng.choice(_SLOTS[p])) if p in _SLOTS else p for p in shown]
  return Example("fill: ", " ".join(shown) + "\n", " ".join(filled))


def template_distribution(example: Example) -> list[tuple[str, float]]:
  """Every filling of the prompt's free slots, equally likely (each free word is a guess)."""
  fillings = [[]]
  for shown in example.input.split():
    options = _SLOTS.get(shown, (shown,))
    fillings = [f + [w] for f in fillings for w in options]
  return [(" ".join(f), 1.0 / len(fillings)) for f in fillings]


def template_ok(example: Example, output: str) -> bool:
  shown, words = example.input.split(), output.split()
  if len(shown) != len(words):
    return False
  return all(w in _SLOTS[s] if s in _SLOTS else w == s for s, w in zip(shown, words))


class MtjaxOpenEnded(SuiteBuilder):
  """mtjax open-ended tasks: many right answers, each with a verifier."""

  SUITE = "open_ended"
  # 2.0.0: held-out splits from a disjoint part of the prompt space (train changes too); grammar
  # prompts name the subject and object nouns (it had one prompt, "sentence: ", for every example).
  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {"3.0.0": "3,000 validation examples (template's first 500 as before); "
                            "grammar over 45 nouns (405 held-out prompts), sum_pair N up to "
                            "1,999: 100+ distinct prompts in a report split",
                   "2.0.0": "train and validation drawn from disjoint parts of the prompt space; "
                            "grammar prompts name the subject and object nouns",
                   "1.0.0": "validation drawn afresh, its prompts also in train"}
  # Held out: grammar, 405 of the 2,025 (subject, object) pairs (9 Latin-square diagonals);
  # sum_pair and template, the inputs a hash puts in the held-out part (about 20%: of the 1,998
  # sums N; 404 of the 2,058 templates, none of them the all-free one, which stays in train).
  # Template prompts repeat (few slots shown is likelier), so its report split after a
  # 100-example tuning split holds about 108 distinct prompts in its first 200 examples.
  TASKS = {"grammar": (grammar, sentence_held_out), "sum_pair": (sum_pair, held_out_by_input),
           "template": (template, held_out_by_input)}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TASKS]


register_suite(MtjaxOpenEnded, {"grammar": sentence_ok,
                                "sum_pair": sum_pair_ok, "template": template_ok},
               open_ended=True,
               distributions={"grammar": sentence_distribution, "sum_pair": sum_pair_distribution,
                              "template": template_distribution})
