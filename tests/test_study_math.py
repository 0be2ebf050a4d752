"""Study arithmetic against hand computations: interpolated crossings and their intervals, the
efficiency ratio's interval, the verdict rule, equal LR at equal steps across arms of different
lengths, log-spaced eval steps, and decomposition arms matched on loss tokens."""

import math

import numpy as np
import pytest

from conftest import REPO, tiny_config
from mtjax import config as config_lib
from mtjax.errors import BadInputError
from mtjax.experiments import arms, decomposition, efficiency
from mtjax.experiments.efficiency import Crossing
from mtjax.train import optimizer

# ------------------------------------------------------------------ crossings

CURVE = [(0, 0.0), (100, 0.2), (200, 0.6), (300, 0.5), (400, 0.9)]


def test_crossing_interpolates_between_the_bracketing_evals():
  # 0.5 lies 0.3 / 0.4 of the way from 0.2 (x=100) to 0.6 (x=200): 175, in [100, 200].
  c = efficiency.crossing(CURVE, 0.5)
  assert c is not None and (c.at, c.low, c.high) == pytest.approx((175.0, 100.0, 200.0))
  # Exactly on an eval: the crossing is that eval; its interval still starts at the last below.
  assert efficiency.crossing(CURVE, 0.6) == Crossing(200.0, 100.0, 200.0)
  # The FIRST crossing counts (the dip to 0.5 at x=300 does not move it).
  c = efficiency.crossing(CURVE, 0.55)
  assert c is not None and c.at == pytest.approx(187.5)
  # 0.7 is first reached at x=400, after the last eval below it (x=300, 0.5): 300 + 0.2/0.4*100.
  c = efficiency.crossing(CURVE, 0.7)
  assert c is not None and (c.at, c.low, c.high) == pytest.approx((350.0, 300.0, 400.0))
  # Already at target at the first eval: a point interval; never reached: None.
  assert efficiency.crossing(CURVE, 0.0) == Crossing(0.0, 0.0, 0.0)
  assert efficiency.crossing(CURVE, 0.95) is None
  # NaN evals are skipped, a repeated step keeps its last value, order does not matter.
  messy = [(200, 0.6), (0, 0.0), (100, math.nan), (50, 0.9), (50, 0.1)]
  c = efficiency.crossing(messy, 0.5)
  assert c is not None and (c.at, c.low, c.high) == pytest.approx((50 + 0.8 * 150, 50.0, 200.0))


def test_ratio_interval_by_hand():
  single = {"a": Crossing(150, 100, 200), "b": Crossing(350, 300, 400)}
  multi = {"a": Crossing(120, 100, 200), "b": Crossing(250, 200, 300)}
  point, low, high = efficiency.efficiency_ratio(single, multi)
  assert point == pytest.approx((150 + 350) / 250)  # 2.0
  assert low == pytest.approx((100 + 300) / 300)  # single at interval starts, multi at the end
  assert high == pytest.approx((200 + 400) / 200)  # the other way round
  assert low <= point <= high
  assert all(math.isnan(x) for x in efficiency.efficiency_ratio({**single, "b": None}, multi))
  assert all(math.isnan(x) for x in efficiency.efficiency_ratio(single, {**multi, "a": None}))
  # Both arms at target before training: 1; the joint run's crossing interval starting at 0: inf.
  zero = {"a": Crossing(0, 0, 0)}
  assert efficiency.efficiency_ratio(zero, zero) == (1.0, 1.0, 1.0)
  assert efficiency.efficiency_ratio({"a": Crossing(10, 5, 20)}, {"a": Crossing(1, 0, 2)})[2] == math.inf


def test_verdict_tests_the_ratio_against_its_no_transfer_value():
  # By hand: 10 seeds whose ratio exceeds its null: log(ratio / null) > 0 on all of them, so the
  # exact two-sided sign-flip p is 2 / 1024.
  ratios, nulls = [(1.3, 1.2, 1.4)] * 10, [1.1] * 10
  decided, why = efficiency.verdict(ratios, nulls)
  assert decided == "more efficient" and "p = 0.00195" in why
  assert efficiency.verdict([(0.7, 0.6, 0.8)] * 10, [0.75] * 10)[0] == "less efficient"
  # 9 of 10 up, the tenth down by more than all the others together: no direction.
  mixed = [(1.2, 1.1, 1.3)] * 9 + [(0.01, 0.005, 0.02)]
  assert efficiency.verdict(mixed, [1.0] * 10)[0] == "inconclusive"
  assert efficiency.verdict([(1.3, 1.2, 1.4)] * 3, [1.1] * 3)[0] == "inconclusive"  # p >= 0.25
  # The ratio's null, not 1: a ratio of 0.8 above a null of 0.6 is more efficient than no transfer.
  assert efficiency.verdict([(0.8, 0.75, 0.85)] * 10, [0.6] * 10)[0] == "more efficient"


# ------------------------------------------------------------------ eval schedule

def test_log_eval_steps():
  assert arms.eval_steps(16, 4) == [0, 4, 8, 12, 16]
  assert arms.eval_steps(16, 4, "log") == [0, 1, 2, 4, 8, 12, 16]
  assert arms.eval_steps(100, 20, "log") == [0, 1, 2, 4, 8, 16, 20, 32, 40, 60, 64, 80, 100]
  cfg = arms.configure(tiny_config(**{"study.eval_schedule": "log"}), seed=0, steps=16, eval_every=4)
  assert cfg.eval.steps == (1, 2)  # what eval.every does not give
  plain = arms.configure(tiny_config(**{"study.eval_schedule": "every"}), seed=0, steps=16, eval_every=4)
  assert plain.eval.steps == ()


def test_eval_hook_runs_at_its_cadence_and_its_extra_steps():
  from mtjax.train.hooks import EvalHook
  hook = EvalHook(4, make_evaluator=None, steps=(1, 2))
  assert [s for s in range(17) if hook.due(s)] == [0, 1, 2, 4, 8, 12, 16]
  only_steps = EvalHook(0, make_evaluator=None, steps=(3,))
  assert [s for s in range(17) if only_steps.due(s)] == [3]


# ------------------------------------------------------------------ equal LR across arms

def _lrs(cfg, steps):
  schedule = optimizer.lr_schedule(cfg.optimizer, cfg.train.steps)
  return np.array([float(schedule(s)) for s in steps])


def test_arms_of_different_lengths_have_the_same_lr_at_the_same_step():
  # The base config decays with a cosine over train.steps: arms must not inherit it.
  base = tiny_config(**{"optimizer.schedule": "cosine", "optimizer.warmup_steps": 5,
                        "optimizer.lr": 1e-2, "optimizer.min_lr_ratio": 0.1})
  short, long = 20, 80
  s = arms.configure(base, tasks=["reverse"], seed=0, steps=short, eval_every=5)
  l = arms.configure(base, seed=0, steps=long, eval_every=5)
  assert s.optimizer.schedule == l.optimizer.schedule == "constant"
  steps = range(short + 1)
  np.testing.assert_allclose(_lrs(s, steps), _lrs(l, steps), rtol=0, atol=0)
  assert _lrs(s, [0, 5, 20])[1:] == pytest.approx([1e-2, 1e-2])  # warmup, then constant
  # What the base's cosine would have done: a different LR at the same step (the confound).
  assert not np.allclose(_lrs(base.replace(**{"train.steps": short}), steps),
                         _lrs(base.replace(**{"train.steps": long}), steps))


def test_wsd_arms_share_the_stable_phase_and_the_absolute_decay_length():
  base = tiny_config(**{"optimizer.warmup_steps": 5, "optimizer.lr": 1e-2,
                        "optimizer.min_lr_ratio": 0.1, "study.lr_schedule": "wsd",
                        "study.lr_decay_steps": 6, "study.steps_per_task": 20})
  short, long, decay = 20, 80, 6
  s = arms.configure(base, seed=0, steps=short, eval_every=5)
  l = arms.configure(base, seed=0, steps=long, eval_every=5)
  assert s.optimizer.schedule == l.optimizer.schedule == "wsd"
  stable = range(short - decay + 1)  # equal up to the step the short arm's decay starts
  np.testing.assert_allclose(_lrs(s, stable), _lrs(l, stable), rtol=0, atol=0)
  # Both decay over the same number of steps, along the same line, to the same end.
  np.testing.assert_allclose(_lrs(s, range(short - decay, short + 1)),
                             _lrs(l, range(long - decay, long + 1)), rtol=1e-6)
  assert _lrs(s, [short - decay, short]) == pytest.approx([1e-2, 1e-3])
  assert arms.lr_note(s.to_dict()["optimizer"], short) == arms.lr_note(l.to_dict()["optimizer"], long)
  with pytest.raises(BadInputError, match="study.lr_decay_steps"):
    arms.configure(base, seed=0, steps=10, eval_every=5)  # 6 decay steps > 10 - 5 warmup
  with pytest.raises(BadInputError, match="study.lr_decay_steps"):
    arms.validate_study_config(base.replace(**{"study.lr_decay_steps": 0}))


def test_schedule_note_says_when_arms_differ():
  same = arms.schedule_note({"a": "linear warmup over 5 steps to 0.01, then constant"} | {
      "b": "linear warmup over 5 steps to 0.01, then constant"})
  assert same.startswith("LR schedule of every arm: linear warmup") and "same LR" in same
  cosine = {"single": arms.lr_note({"schedule": "cosine", "warmup_steps": 5, "lr": 0.01,
                                    "decay_steps": 0, "decay_fraction": 0.1, "min_lr_ratio": 0.1}, 20),
            "multi": arms.lr_note({"schedule": "cosine", "warmup_steps": 5, "lr": 0.01,
                                   "decay_steps": 0, "decay_fraction": 0.1, "min_lr_ratio": 0.1}, 80)}
  assert "differ" in arms.schedule_note(cosine) and "at step 80" in arms.schedule_note(cosine)


# ------------------------------------------------------------------ decomposition: loss tokens

def test_decomposition_arms_match_on_loss_tokens():
  """Granular examples carry fewer target tokens per packed row than umbrella ones (about 1,500
  vs 1,900 per step here), so equal steps would give the umbrella arm about 25% more supervised
  tokens (what the old arms did). Matched arms: total loss tokens (counted over every batch each arm trains on) within
  TOLERANCE of each other."""
  TOLERANCE = 0.05  # rounding to whole steps: under 1.5% here; the rest is sampling
  base = config_lib.load(f"{REPO}/configs/decomposition.py:tiny").replace(
      **{"study.steps_per_task": 4})  # 32 umbrella steps: fine enough to match to a few percent
  configs, per_step = decomposition.arm_configs(base, seed=0)
  u, g = configs["umbrella"], configs["granular"]
  assert u.train.steps == base.study.steps_per_task * len(base.data.tasks)
  assert dict(g.data.mixture) == {t: 1.0 for t in base.data.tasks}
  total = {n: arms.loss_tokens_per_step(c, c.train.steps) * c.train.steps for n, c in configs.items()}
  assert abs(total["granular"] - total["umbrella"]) <= TOLERANCE * total["umbrella"], (total, per_step)
  # Equal steps (the old design) miss that tolerance.
  equal = g.replace(**{"train.steps": u.train.steps})
  unmatched = arms.loss_tokens_per_step(equal, u.train.steps) * u.train.steps
  assert abs(unmatched - total["umbrella"]) > TOLERANCE * total["umbrella"]
  assert g.train.steps > u.train.steps


def test_decomposition_tests_granular_minus_umbrella_holm_over_the_umbrella_tasks_two_metrics():
  """By hand, 10 seeds: granular beats umbrella on the umbrella task's token accuracy in every
  seed (sign flips: 2 of 1,024 flips as extreme, p = 2/1024), both structural matches are 0 (equal
  on every seed, p = 1). Holm over the primary family's 2 keys: 4/1024 and 1. The subtask keys
  form the exploratory family (here 2 keys: name_detection's two metrics)."""
  tasks = ["fc_name_detection", "fc_umbrella"]
  per_seed = [{"granular": {"accuracy": {t: 0.0 for t in tasks},
                            "token_accuracy": {"fc_umbrella": 0.5 + 0.01 * (s + 1),
                                               "fc_name_detection": 0.3 + 0.01 * (-1) ** s}},
               "umbrella": {"accuracy": {t: 0.0 for t in tasks},
                            "token_accuracy": {"fc_umbrella": 0.5, "fc_name_detection": 0.3}}}
              for s in range(10)]
  tested = decomposition.tests({"tasks": tasks, "per_seed": per_seed, "primary": "umbrella_task"})
  primary = tested["umbrella_task"]
  assert primary["fc_umbrella token accuracy"].p == pytest.approx(2 / 1024)
  assert primary["fc_umbrella token accuracy"].p_holm == pytest.approx(4 / 1024)
  assert primary["fc_umbrella token accuracy"].sentence("granular higher", "umbrella higher") \
      .startswith("granular higher (Holm-corrected p = 0.00391")
  assert primary["fc_umbrella structural match"].p_holm == 1.0
  sub = tested["subtasks"]
  assert set(sub) == {"fc_name_detection structural match", "fc_name_detection token accuracy"}
  assert not any(c.primary for c in sub.values())
  # +0.01 and -0.01 alternating: the mean is 0, every flip is as extreme: p = 1.
  assert sub["fc_name_detection token accuracy"].p == pytest.approx(1.0)


def test_a_target_never_reached_is_censored_at_the_runs_budget():
  """By hand: single-task budget 100 tokens, joint 300. Task b's single run never reached its
  target: it would at 100 tokens at the earliest, so the ratio is at least (10 + 100) / 50 and
  unbounded above; a joint run that never reached b bounds the ratio from above instead."""
  single = {"a": Crossing(15, 10, 20), "b": None}
  multi = {"a": Crossing(40, 30, 50), "b": Crossing(45, 40, 50)}
  point, low, high = efficiency.efficiency_ratio(single, multi, single_budget=100, multi_budget=300)
  assert math.isnan(point)
  assert low == pytest.approx((10 + 100) / 50) and high == math.inf
  single = {"a": Crossing(15, 10, 20), "b": Crossing(25, 20, 30)}
  multi = {"a": Crossing(40, 30, 50), "b": None}
  point, low, high = efficiency.efficiency_ratio(single, multi, single_budget=100, multi_budget=300)
  assert math.isnan(point) and low == 0.0 and high == pytest.approx((20 + 30) / 300)
  # A censored ratio enters the test by its interval's end nearest the null when the interval lies
  # on one side of it, else as 0 (sign unknown).
  assert efficiency.log_excess(math.nan, 1.1, math.inf, 1.0) == pytest.approx(math.log(1.1))
  assert efficiency.log_excess(math.nan, 0.0, 0.5, 1.0) == pytest.approx(math.log(0.5))
  assert efficiency.log_excess(math.nan, 0.5, math.inf, 1.0) == 0.0
  assert math.isnan(efficiency.log_excess(1.2, 1.1, 1.3, math.nan))
  assert efficiency.verdict([(math.nan, 1.1, math.inf)] * 10, [1.0] * 10)[0] == "more efficient"
  assert efficiency.verdict([(math.nan, 0.0, 0.5)] * 10, [1.0] * 10)[0] == "less efficient"
