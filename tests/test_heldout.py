"""Held-out splits come from a disjoint part of the prompt space, for every built-in task.

Validation prompts never occur in train (exact strings after Task.preprocess, as the loader and
eval see them), and partitioning before drawing does not carve whole regions out of validation
(the old unseen-prompt filter removed every 1-digit addition problem from it).
"""

import collections

import pytest

from mtjax import tasks
from mtjax.tasks import Example, synthetic


def _splittable():
  """Built-in tasks with a train and a validation split (BFCL and eval-only tasks need a
  download and have no train split)."""
  return [n for n in tasks.names()
          if n in tasks.BUILTIN_TASKS and not tasks.get(n).eval_only and not n.startswith("bfcl_")]


def _prompts(name, split, seed=0):
  task = tasks.get(name)
  examples = task.source.load(split, seed).examples
  pre = task.preprocess or (lambda ex: ex)
  return [pre(examples[i]).prompt for i in range(len(examples))]


def test_every_builtin_task_is_checked():
  names = set(_splittable())
  assert {"reverse", "addition", "grammar", "structured_addition", "open_ended_sum_pair",
          "open_ended_template", "open_ended_grammar", "fc_umbrella"} <= names
  assert len(names) >= 20


@pytest.mark.parametrize("name", _splittable())
def test_no_validation_prompt_occurs_in_train(name):
  val, train = _prompts(name, "validation"), set(_prompts(name, "train"))
  assert len(val) > 0 and len(train) > 0
  overlap = [p for p in val if p in train]
  assert not overlap, f"{name}: {len(overlap)} of {len(val)} validation prompts occur in train, " \
                      f"e.g. {overlap[0]!r}"


@pytest.mark.parametrize("name", ["reverse", "addition", "grammar"])
def test_in_memory_partition_does_not_depend_on_the_seed(name):
  assert not set(_prompts(name, "validation", seed=0)) & set(_prompts(name, "train", seed=3))


def _operands(prompt):
  a, b = prompt.removeprefix("add: ").removesuffix("=").split("+")
  return int(a), int(b)


def test_structured_addition_keeps_one_digit_problems_in_proportion():
  val = [_operands(p) for p in _prompts("structured_addition", "validation")]
  train = [_operands(p) for p in _prompts("structured_addition", "train")]
  one = [ab for ab in val if max(ab) < 10]
  assert len(one) >= 25 and len(set(one)) >= 5  # the old filter left none
  # Digit counts (of the larger operand) in alike proportions in both splits.
  val_share = collections.Counter(len(str(max(ab))) for ab in val)
  train_share = collections.Counter(len(str(max(ab))) for ab in train)
  for digits in range(1, 6):
    assert abs(val_share[digits] / len(val) - train_share[digits] / len(train)) < 0.08, digits


def test_addition_holds_out_one_digit_problems():
  one_digit = [Example("add: ", f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
  held = [ex for ex in one_digit if synthetic.held_out_by_input(ex)]
  assert 5 <= len(held) <= 35  # in both parts, in proportion
  val = [_operands(p) for p in _prompts("addition", "validation")]
  assert any(min(ab) < 10 for ab in val)  # 1-digit operands (both < 10 is a 1e-4 draw here)


def test_grammar_prompts_name_nouns_and_the_verifier_checks_them():
  task = tasks.get("grammar")
  ex = Example("sentence: ", "fox, tree\n", "the fox sees a tree")
  assert task.is_correct(ex, "every quick fox likes the old tree")
  assert not task.is_correct(ex, "the tree sees a fox")  # nouns swapped
  assert not task.is_correct(ex, "the fox sees tree")  # not grammatical
  for name in ("grammar", "open_ended_grammar"):
    examples = tasks.get(name).source.load("validation", 0).examples
    assert all(tasks.get(name).is_correct(examples[i], examples[i].target) for i in range(50))
    prompts = {examples[i].prompt for i in range(len(examples))}
    # The held-out pairs: 9 Latin-square diagonals of 45 nouns, counted directly (405 in all;
    # 1,500 or 3,000 draws find nearly all of them).
    nouns = sorted({n for p in prompts for n in p.split(": ")[1].strip().split(", ")})
    assert len(nouns) == 45
    held = {(a, b) for a in range(45) for b in range(45) if (b - a) % 45 in range(2, 45, 5)}
    assert len(held) == 405
    from mtjax.tasks.synthetic import _NOUN
    pairs = {tuple(_NOUN.index(n) for n in p.split(": ")[1].strip().split(", ")) for p in prompts}
    assert pairs <= held and len(pairs) > 350
