"""Study targets lie strictly between a floor (trivial baselines on the evaluated held-out
examples) and a ceiling (the best achievable score): a target under the floor or at/above the
ceiling is refused before any arm trains, naming study.targets.<task>; the shipped efficiency
configs pass.

References: a hand-made task's floor counted by hand; sum_pair's Bayes-optimal token accuracy by
brute force over every first number the generator could draw (on strings: the byte tokenizer
gives one token per character)."""

import collections
import math

import numpy as np
import pytest

from conftest import REPO
from mtjax import config as config_lib
from mtjax import tasks as task_registry
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError
from mtjax.experiments import floors
from mtjax.tasks import Example, Task, exact_match
from mtjax.tasks.sources import GeneratorSource

CONFIG = str(REPO / "configs" / "efficiency.py")
TRAIN = ("ab", "ac", "ab", "xb")  # position 0: a; position 1: b; EOS the likeliest token overall
HELD = ("ab", "zz", "abc")


def _load(variant: str = "", **dotted: object):
  cfg = config_lib.load(CONFIG + (f":{variant}" if variant else ""), [])
  return cfg.replace(**dotted) if dotted else cfg


def _hand_task() -> str:
  data = {"train": tuple(Example("q: ", "x\n", t) for t in TRAIN),
          "validation": tuple(Example("q: ", f"y{i}\n", t) for i, t in enumerate(HELD))}
  task_registry.register(Task("hand", GeneratorSource(lambda split, seed: data[split]), exact_match))
  return "hand"


def test_floor_of_a_hand_made_task():
  name = _hand_task()
  cfg = _load("tiny", **{"data.tasks": (name,), "data.mixture": {name: 1.0},
                         "eval.num_examples": 3, "eval.num_generate": 3, "eval.skip": 0})
  # Positional (oracle length): ab+EOS 3 of 3; zz+EOS only EOS; abc+EOS a, b and EOS (position 2
  # was never seen in training). 7 of 10 tokens; the unigram (EOS everywhere) gets 3 of 10.
  assert floors.floor(name, "token_accuracy", cfg) == pytest.approx(7 / 10)
  # Always answering "ab" (the most frequent training target): right on 1 of 3.
  assert floors.floor(name, "accuracy", cfg) == pytest.approx(1 / 3)
  assert floors.floor(name, "pass@1", cfg.replace(**{"eval.num_samples": 2, "eval.sample_prompts": 3})) \
      == pytest.approx(1 / 3)
  assert floors.floor(name, "loss", cfg) is None
  assert floors.ceiling(name, "token_accuracy", cfg) == 1.0  # deterministic: target from prompt
  # eval.skip: the evaluated examples come after the skipped ones ("zz", "abc": 4 of 7 tokens).
  assert floors.floor(name, "token_accuracy", cfg.replace(**{"eval.skip": 1})) == pytest.approx(4 / 7)


def _brute_force_sum_pair(ns) -> float:
  """E[right tokens] / E[tokens] of the Bayes predictor, enumerating every a in 0..n per prompt:
  at each position a random one of the likeliest next characters (EOS as "$")."""
  right = total = 0.0
  for n in ns:
    strings = [f"{a}+{n - a}$" for a in range(n + 1)]
    for s in strings:
      total += len(s) / len(strings)
      for j in range(len(s)):
        nxt = collections.Counter(o[j] for o in strings if o[:j] == s[:j] and len(o) > j)
        best = max(nxt.values())
        tied = [c for c, k in nxt.items() if k == best]
        right += (s[j] in tied) / len(tied) / len(strings)
  return right / total


def test_sum_pair_token_accuracy_ceiling_against_brute_force():
  cfg = _load("", **{"study.task_metrics": {}})
  name = "open_ended_sum_pair"
  held = floors.heldout(cfg, name, cfg.eval.num_examples)
  # Brute force is quadratic in N (up to 1,999): the held-out prompts with N <= 300, through the
  # same helper the ceiling uses; the ceiling itself is that helper over every scored prompt.
  small = [ex for ex in held if int(ex.input) <= 300]
  assert len(small) >= 10
  tok = tokenizer_lib.get("byte")
  dist = task_registry.get(name).target_distribution
  assert dist is not None
  assert floors.bayes_token_accuracy(small, tok, dist) == pytest.approx(
      _brute_force_sum_pair([int(ex.input) for ex in small]), rel=1e-9)
  got = floors.ceiling(name, "token_accuracy", cfg)
  assert got is not None and got == pytest.approx(floors.bayes_token_accuracy(held, tok, dist))
  assert 0.6 < got < 0.75  # the first number is a guess: 0.8 was out of reach
  assert floors.ceiling(name, "accuracy", cfg) == 1.0  # the verifier: a right answer exists
  # The same computation on hand-made prompts, through the generic helper.
  examples = [Example("s: ", f"{n}\n", "0+0") for n in (2, 9, 10, 57)]
  assert floors.bayes_token_accuracy(examples, tok, dist) == pytest.approx(
      _brute_force_sum_pair([2, 9, 10, 57]), rel=1e-9)


def test_target_under_the_floor_is_refused():
  # sort's floor is ~0.281 on the tiny variant's 8 examples
  cfg = _load("tiny", **{"study.targets": {"structured_sort": 0.1, "open_ended_template": 0.37}})
  with pytest.raises(BadInputError) as e:
    floors.check_targets(cfg)
  assert e.value.field == "study.targets.structured_sort"
  message = str(e.value)
  assert "token_accuracy" in message and "floor 0.2807" in message and "ceiling 1.0000" in message
  assert "\n" not in message


def test_target_at_or_above_the_ceiling_is_refused():
  cfg = _load("tiny", **{"study.targets": {"structured_sort": 1.0, "open_ended_template": 0.395}})
  with pytest.raises(BadInputError, match="ceiling 1.0000") as e:
    floors.check_targets(cfg)
  assert e.value.field == "study.targets.structured_sort"
  # sum_pair under token accuracy: 0.8 is above its Bayes ceiling (~0.72).
  cfg = _load("", **{"data.tasks": ("open_ended_sum_pair",),
                     "data.mixture": {"open_ended_sum_pair": 1.0}, "study.task_metrics": {},
                     "study.targets": {"open_ended_sum_pair": 0.8}})
  with pytest.raises(BadInputError) as e:
    floors.check_targets(cfg)
  assert e.value.field == "study.targets.open_ended_sum_pair"


def test_accuracy_without_generation_is_refused_and_zero_targets_skip():
  cfg = _load("tiny", **{"study.task_metrics": {"structured_sort": "accuracy"}})
  with pytest.raises(BadInputError) as e:
    floors.check_targets(cfg)
  assert e.value.field == "eval.num_generate"
  # A study without targets is never refused, yet states the floors of what it scores.
  table = floors.check_targets(_load("tiny", **{"study.target": 0.0, "study.targets": {}}))
  assert all(r["floor"] is not None and r["target"] == 0.0 for r in table.values())
  table = floors.check_targets(_load("tiny", **{"study.target": 0.0, "study.targets": {},
                                                "study.task_metrics": {"structured_sort": "accuracy"}}))
  assert table["structured_sort"]["floor"] is None  # accuracy is not computed (no generation)


@pytest.mark.parametrize("variant", ["", "demo", "tiny"])
def test_shipped_efficiency_configs_pass(variant):
  table = floors.check_targets(_load(variant))
  for task, r in table.items():
    assert r["floor"] is not None and r["ceiling"] is not None, task
    assert r["floor"] < r["target"] < r["ceiling"], task
    if task.startswith("open_ended_") and variant != "tiny":  # tiny: the machinery only
      assert r["metric"] == "accuracy", task  # judged by the verifier


def _task(name: str, train, held, is_correct=exact_match) -> str:
  data = {"train": tuple(Example("r: ", i + "\n", t) for i, t in train),
          "validation": tuple(Example("r: ", i + "\n", t) for i, t in held)}
  task_registry.register(Task(name, GeneratorSource(lambda split, seed: data[split]), is_correct),
                          replace=True)
  return name


def _hand_config(name: str, count: int):
  return _load("tiny", **{"data.tasks": (name,), "data.mixture": {name: 1.0}, "study.floors": "all",
                          "eval.num_examples": count, "eval.num_generate": count, "eval.skip": 0})


def test_string_rules_bigram_and_ngram_floors_by_hand():
  # A reverse task: the reverse rule is its own (left out); copy, sort and sort_desc are others'.
  name = _task("hand_reverse", [("ab", "ba"), ("ca", "ac"), ("bd", "db"), ("bc", "cb")],
               [("cab", "bac"), ("dd", "dd")])
  got = floors.baselines(name, "token_accuracy", _hand_config(name, 2))
  assert "reverse rule" not in got and "reverse rule, order-free" not in got
  # Scored: b a c END (4) and d d END (3); END below means the end token.
  expected = {
      # sorted "abc", remaining letters in that order: a (b) x, a v, c v, END v; d d END: 3.
      "sort rule, order-free": 6 / 7,
      "sort rule": 5 / 7,  # a b c END against b a c END: c, END; dd: 3
      "copy rule": 5 / 7,  # c a b END: a, END; dd: 3
      "copy rule, order-free": 5 / 7,  # c x, c x (a), c v, END v; dd: 3
      # start -> b (first of four tied), b -> a, a -> c, END at the true length: 4 of 4; dd: only END.
      "bigram (true length)": 5 / 7,
      # modes b, b; position 2 never seen (END): b v, b x, END x, END v; dd: END only.
      "positional (oracle length)": 3 / 7,
      "unigram": 2 / 7,  # END is the likeliest target token (4 of 12): the two ENDs
      # The previous token only, prompt included: after "\n" b; after b END (2 of 3); after a END
      # (tied with c, seen first); after c END; after d b: b v, END x, END x, END v; dd: 0.
      "2-gram": 2 / 7,
  }
  for baseline, value in expected.items():
    assert got[baseline] == pytest.approx(value), baseline
  assert floors.floor(name, "token_accuracy", _hand_config(name, 2)) == pytest.approx(6 / 7)
  # The frequency family: only the positional and unigram predictors.
  assert set(floors.baselines(name, "token_accuracy", _hand_config(name, 2).replace(
      **{"study.floors": "frequency"}))) == {"positional (oracle length)", "unigram"}


def test_sentence_frame_floor_by_hand():
  train = [("cat, dog", "the cat sees the dog")] * 2 + [("fox, cat", "a fox sees the cat")]
  held = [("dog, fox", "the dog sees the fox"), ("cat, fox", "a cat likes a fox")]
  name = _task("hand_frame", train, held)
  cfg = _hand_config(name, 2)
  # The frame "the {0} sees the {1}" (2 of 3 training answers) filled with the held-out nouns.
  filled = ["the dog sees the fox", "the cat sees the fox"]
  assert floors.baselines(name, "accuracy", cfg)["frame (prompt words substituted)"] == 0.5
  assert floors.baselines(name, "accuracy", cfg)["most frequent answer"] == 0.0
  # Teacher-forced, position by position (one token per character), END after the frame.
  right = total = 0
  for guess, (_, target) in zip(filled, held):
    g, t = guess + "$", target + "$"
    right += sum(j < len(g) and g[j] == t[j] for j in range(len(t)))
    total += len(t)
  assert floors.baselines(name, "token_accuracy", cfg)["frame (prompt words substituted)"] == \
      pytest.approx(right / total)


@pytest.mark.slow  # about 5 s per config on 2 cores (the floors of every task)
@pytest.mark.parametrize("spec", [f"{f}.py{v}" for f in (
    "efficiency", "entropy", "expert_composition", "fast_slow", "instructions", "rl_diversity",
    "task_experts", "transfer", "weighting", "decomposition") for v in ("", ":tiny")]
    + ["efficiency.py:demo"])
def test_no_shipped_study_target_at_or_below_its_floor(spec):
  from mtjax.experiments import arms
  cfg = config_lib.load(str(REPO / "configs" / spec), [])
  table = floors.check_targets(cfg.replace(**arms.split_settings(cfg)))  # raises if not
  for task, r in table.items():
    if r["target"] > 0:
      assert r["floor"] is not None and r["floor"] < r["target"], task
      if not spec.endswith(":tiny"):  # tiny configs test machinery (study.floors=frequency)
        assert r["floor_family"] == "all", task


def test_true_entropy_by_hand():
  """sum_pair with N: N + 1 equally likely answers 'a+(N-a)' (byte tokens): H = log(N + 1) nats,
  over the expected answer length in bytes + EOS; pooled over prompts."""
  tok = tokenizer_lib.get("byte")
  dist = task_registry.get("open_ended_sum_pair").target_distribution
  assert dist is not None
  examples = [Example("s: ", f"{n}\n", "0+0") for n in (2, 9, 10)]
  nats = sum(math.log(n + 1) for n in (2, 9, 10))
  tokens = sum(np.mean([len(f"{a}+{n - a}") + 1 for a in range(n + 1)]) for n in (2, 9, 10))
  assert floors.true_entropy(examples, tok, dist) == pytest.approx(nats / tokens, rel=1e-12)
  # One answer per prompt (a structured task): 0.
  assert floors.entropy_truth("structured_copy", _load("")) == 0.0
