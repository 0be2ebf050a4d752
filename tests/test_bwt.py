"""Real backward transfer and Omni-Thinker's order, against hand computations: B from hand-built
scores (a alone, a then b), the normalization and its guard, the additive prediction and the chosen
order (every order enumerated by hand for 3 tasks), greedy beyond 6 tasks, and the study's wiring
on a hand-built additive world (measured = predicted there)."""

import itertools
import json
import warnings

import numpy as np
import pytest

from conftest import REPO
from mtjax import config as config_lib
from mtjax.errors import BadInputError
from mtjax.experiments import transfer

INIT = [0.1, 0.0, 0.2]   # each task's score at step 0
ALONE = [0.6, 0.5, 0.7]  # after training it alone: the reference; gains 0.5, 0.5, 0.5
# AFTER[a][b]: a's score after training a, then b.
AFTER = [[np.nan, 0.35, 0.60],
         [0.25, np.nan, 0.55],
         [0.45, 0.20, np.nan]]


def test_backward_transfer_from_hand_built_scores():
  B, excluded = transfer.backward_transfer(ALONE, AFTER, INIT)
  # B[a, b] = (after - init) / (alone - init) - 1:
  #   (0.35 - 0.1) / 0.5 - 1 = -0.5    (0.60 - 0.1) / 0.5 - 1 = 0.0
  #   (0.25 - 0.0) / 0.5 - 1 = -0.5    (0.55 - 0.0) / 0.5 - 1 = +0.1
  #   (0.45 - 0.2) / 0.5 - 1 = -0.5    (0.20 - 0.2) / 0.5 - 1 = -1.0
  expected = [[np.nan, -0.5, 0.0], [-0.5, np.nan, 0.1], [-0.5, -1.0, np.nan]]
  np.testing.assert_allclose(B, expected, atol=1e-12)
  assert not excluded.any()


def test_normalization_init_to_reference():
  scores = [[0.1, 0.25, 0.7], [0.35, 0.5, 0.45]]
  n, excluded = transfer.normalize_scores(scores, INIT, ALONE)
  # (0.1-0.1)/0.5, (0.25-0)/0.5, (0.7-0.2)/0.5 ; (0.35-0.1)/0.5, (0.5-0)/0.5, (0.45-0.2)/0.5
  np.testing.assert_allclose(n, [[0.0, 0.5, 1.0], [0.5, 1.0, 0.5]])
  assert excluded.tolist() == [False, False, False]


@pytest.mark.parametrize("reference, min_gain, excluded", [
    ([0.6, 0.0, 0.7], 0.0, [False, True, False]),    # reference == init
    ([0.6, 0.0, 0.1], 0.0, [False, True, True]),     # reference < init
    ([0.6, 0.01, 0.7], 0.02, [False, True, False]),  # a gain under min_gain: near the floor
    ([0.6, 0.02, 0.7], 0.02, [False, True, False]),  # exactly min_gain: excluded (<=)
    ([0.6, 0.03, 0.7], 0.02, [False, False, False]),
])
def test_normalization_guard_excludes_and_never_divides(reference, min_gain, excluded):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no division by zero, no invalid value
    n, ex = transfer.normalize_scores([[0.3, 0.3, 0.3]], INIT, reference, min_gain)
    B, ex_b = transfer.backward_transfer(reference, AFTER, INIT, min_gain)
  assert ex.tolist() == excluded and ex_b.tolist() == excluded
  for a, e in enumerate(excluded):
    assert np.isnan(n[0, a]) == e
    assert np.isnan(B[a]).all() == e  # an excluded task's row of B is NaN
  with pytest.raises(ValueError, match="min_gain"):
    transfer.normalize_scores([0.3, 0.3, 0.3], INIT, ALONE, -0.1)


# A hand-made B: row a = the task learned first, column x = the task trained after it.
HAND_B = np.array([[np.nan, -0.6, -0.1],
                   [-0.2, np.nan, -0.3],
                   [-0.5, -0.4, np.nan]])
# Every order's predicted sum over pairs (a before x) of B[a, x]:
#   0,1,2: B01+B02+B12 = -0.6-0.1-0.3 = -1.0     0,2,1: B02+B01+B21 = -0.1-0.6-0.4 = -1.1
#   1,0,2: B10+B12+B02 = -0.2-0.3-0.1 = -0.6     1,2,0: B12+B10+B20 = -0.3-0.2-0.5 = -1.0
#   2,0,1: B20+B21+B01 = -0.5-0.4-0.6 = -1.5     2,1,0: B21+B20+B10 = -0.4-0.5-0.2 = -1.1
# Best 1,0,2: task 2 (row sum -0.9, damaged most) last, task 1 (-0.5, least) first. Worst 2,0,1.
HAND_TOTALS: dict[tuple[int, ...], float] = {(0, 1, 2): -1.0, (0, 2, 1): -1.1, (1, 0, 2): -0.6, (1, 2, 0): -1.0,
               (2, 0, 1): -1.5, (2, 1, 0): -1.1}


def test_predicted_curriculum_scores_by_hand():
  # Order 1, 0, 2: task 1 first gets B10 + B12; task 0 gets B02; task 2 (last) nothing.
  np.testing.assert_allclose(transfer.predicted_scores(HAND_B, [1, 0, 2]),
                             [1 - 0.1, 1 - 0.2 - 0.3, 1.0])
  # Own scores other than 1 are added as they are.
  np.testing.assert_allclose(transfer.predicted_scores(HAND_B, [2, 0, 1], own=[0.9, 1.0, 1.1]),
                             [0.9 - 0.6, 1.0, 1.1 - 0.5 - 0.4])
  for order, total in HAND_TOTALS.items():
    assert transfer.predicted_scores(HAND_B, order).mean() == pytest.approx(1 + total / 3)
  with pytest.raises(ValueError, match="permutation"):
    transfer.predicted_scores(HAND_B, [0, 0, 1])


def test_chosen_order_is_the_hand_enumerated_best():
  assert transfer.choose_order(HAND_B) == ([1, 0, 2], "enumerated")
  assert transfer.choose_order(HAND_B, worst=True) == ([2, 0, 1], "enumerated")
  assert transfer.predicted_scores(HAND_B, [1, 0, 2]).mean() == pytest.approx(0.8)  # 1 - 0.6/3
  # Greedy agrees here: row sums -0.7, -0.5, -0.9 -> 1; then B02=-0.1 vs B20=-0.5 -> 0; then 2.
  assert transfer.choose_order(HAND_B, max_exhaustive=0) == ([1, 0, 2], "greedy")


def test_excluded_rows_count_zero_in_the_choice():
  B = HAND_B.copy()
  B[1] = np.nan  # task 1 excluded: its placement only matters through its column
  # Totals without row 1: 0,1,2: -0.6-0.1 = -0.7; 0,2,1: -0.1-0.6-0.4 = -1.1; 1,0,2: -0.1;
  # 1,2,0: -0.5; 2,0,1: -0.5-0.4-0.6 = -1.5; 2,1,0: -0.4-0.5 = -0.9 -> 1,0,2.
  assert transfer.choose_order(B)[0] == [1, 0, 2]
  assert np.isnan(transfer.predicted_scores(B, [1, 0, 2])[1])


def _trap(n_neutral=4):
  """Tasks 0, 1, 2 and neutral tasks (B = 0): 0 is helped slightly by both others (placing it
  first is greedy's best first move, +0.1), but 1 and 2 are each helped by 0 (+1) and damage each
  other (-1), so the best orders put 1 and 2 before 0 (total +1); greedy ends at 0.1 - 1 = -0.9."""
  T = 3 + n_neutral
  B = np.zeros((T, T))
  B[0, 1] = B[0, 2] = 0.05
  B[1, 2] = B[2, 1] = -1.0
  B[1, 0] = B[2, 0] = 1.0
  B[np.eye(T, dtype=bool)] = np.nan
  return B


def test_greedy_beyond_six_tasks_on_a_constructed_case():
  B = _trap()  # 7 tasks
  order, method = transfer.choose_order(B)
  # Greedy: row sums over all: task 0: +0.1, tasks 1, 2: 1 - 1 = 0, neutrals 0 -> 0. Then 1 and 2
  # have -1 (each other), the neutrals 0 -> 3, 4, 5, 6 (ties: lowest index); then 1 (tie), 2.
  assert (order, method) == ([0, 3, 4, 5, 6, 1, 2], "greedy")
  assert transfer.predicted_scores(B, order).mean() == pytest.approx(1 + (0.1 - 1.0) / 7)
  # Greedy is not optimal here: enumerating all 5,040 orders finds +1 (1 and 2 before 0).
  best, how = transfer.choose_order(B, max_exhaustive=7)
  assert how == "enumerated"
  assert transfer.predicted_scores(B, best).mean() == pytest.approx(1 + 1.0 / 7)
  assert best.index(0) > best.index(1) and best.index(0) > best.index(2)
  # Six tasks are still enumerated.
  assert transfer.choose_order(_trap(3))[1] == "enumerated"


def test_greedy_puts_the_most_damaged_tasks_last():
  # B[a, x] = -d[a] for every x: a's damage per later task. Exchange argument: the optimum sorts
  # by d ascending (the task damaged most trains last); greedy finds it for 8 tasks.
  d = np.array([0.3, 0.1, 0.7, 0.2, 0.6, 0.5, 0.4, 0.05])
  B = -np.repeat(d[:, None], 8, axis=1)
  B[np.eye(8, dtype=bool)] = np.nan
  assert transfer.choose_order(B) == ([7, 1, 3, 0, 6, 5, 4, 2], "greedy")


def test_fwt_greedy_order_by_hand():
  M = np.array([[1.0, 0.2, 0.9, 0.1],   # training 0 helps 2
                [0.5, 1.0, 0.6, 0.7],   # training 1 helps everyone a bit: mean(0.5,0.6,0.7)=0.6
                [0.1, 0.3, 1.0, 0.2],
                [0.9, 0.1, 0.1, 1.0]])
  # Step 1 means over the other three: 0: (0.2+0.9+0.1)/3=0.4, 1: 0.6, 2: 0.2, 3: 0.367 -> 1.
  # Step 2 among {0,2,3}: 0: (0.9+0.1)/2=0.5, 2: (0.1+0.2)/2=0.15, 3: (0.9+0.1)/2=0.5 -> tie -> 0.
  # Step 3 among {2,3}: 2: 0.2, 3: 0.1 -> 2; then 3.
  assert transfer.fwt_greedy_order(M) == [1, 0, 2, 3]
  M[:, 0] = np.nan  # an excluded task's column is skipped
  # Step 1: 0: (0.9+0.1)/2=0.5, 1: 0.65, 2: 0.25, 3: 0.1 -> 1; then {0,2,3}: 0: 0.5, 2: 0.2,
  # 3: 0.1 -> 0; then 2: 0.2, 3: 0.1 -> 2; 3.
  assert transfer.fwt_greedy_order(M) == [1, 0, 2, 3]


def test_spearman_and_run_counts_by_hand():
  assert transfer.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6*2/(3*8)
  assert transfer.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert np.isnan(transfer.spearman([1, 2], [1, 2]))
  # T = 3, all 6 orders: 3 + 6 + 6 = 15 runs; 3 + 2*6 + 6*3 = 33 stages.
  assert transfer.run_counts(3, 6) == {"single_runs": 3, "pairwise_runs": 6, "order_runs": 6,
                                       "runs": 15, "stages": 33}
  # T = 4, three order arms: 4 + 12 + 3 = 19 runs; 4 + 24 + 12 = 40 stages.
  assert transfer.run_counts(4, 3)["runs"] == 19 and transfer.run_counts(4, 3)["stages"] == 40
  # T = 2: the two orders are the two pairwise runs.
  assert transfer.run_counts(2, 2)["runs"] == 4


def test_gem_metrics_leave_excluded_columns_out():
  R = np.array([[0.8, np.nan, 0.1], [0.6, np.nan, 0.2], [0.5, np.nan, 0.95]])
  m = transfer.metrics(R)
  assert m["acc"] == pytest.approx((0.5 + 0.95) / 2)
  assert m["bwt"] == pytest.approx(0.5 - 0.8)
  assert m["fwt"] == pytest.approx(0.2)  # R[1, 2] - 0 (column 1 left out)
  assert m["forgetting"] == pytest.approx(0.8 - 0.5)


# ------------------------------------------------------------------ the study on a hand-built world

TASKS = ("structured_sort", "open_ended_grammar", "open_ended_template")


def _additive_world(init, alone, B):
  """A train_fn writing the eval rows of a world where damage adds up exactly: a task not yet
  trained scores init + 0.01 per stage; once trained, its normalized score is 1 + the sum of
  B[a, x] over the stages x after its last one."""
  init, alone = np.asarray(init), np.asarray(alone)

  def score(seq, t):
    a = TASKS.index(t)
    if t not in seq:
      return float(init[a] + 0.01 * len(seq))
    last = len(seq) - 1 - seq[::-1].index(t)
    norm = 1 + sum(B[a, TASKS.index(x)] for x in seq[last + 1:])
    return float(init[a] + norm * (alone[a] - init[a]))

  def train_fn(cfg, workdir):
    S = cfg.study.steps_per_task
    if cfg.data.schedule == "stages":
      stages = [next(t for t, w in weights.items() if w > 0) for _, weights in cfg.data.stages]
    else:
      stages = [next(t for t, w in cfg.data.mixture.items() if w > 0)]
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": k * S, **{f"eval/{t}/token_accuracy": score(stages[:k], t) for t in TASKS}}
            for k in range(len(stages) + 1)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  return train_fn


def _base(**dotted):
  cfg = config_lib.load(f"{REPO}/configs/transfer.py:tiny")
  return cfg.replace(**{"data.tasks": TASKS, "data.mixture": {t: 1.0 for t in TASKS},
                        "study.seeds": (0, 1), **dotted})


def test_study_on_an_additive_world_measures_what_it_predicts(tmp_path):
  B = np.nan_to_num(HAND_B)
  s = transfer.run(_base(), str(tmp_path), train_fn=_additive_world(INIT, ALONE, B))
  np.testing.assert_allclose(np.asarray(s["B_mean"], float), HAND_B, atol=1e-9)
  assert s["excluded"] == []
  assert s["omni_thinker"] == {"order": [TASKS[1], TASKS[0], TASKS[2]], "method": "enumerated"}
  assert s["predicted_worst"]["order"] == [TASKS[2], TASKS[0], TASKS[1]]
  assert len(s["order_runs"]) == 6  # T = 3: every order is measured
  for name, arm in s["order_runs"].items():
    perm = tuple(TASKS.index(t) for t in arm["order"])
    assert arm["predicted_mean"] == pytest.approx(1 + HAND_TOTALS[perm] / 3)
    assert arm["measured_mean"] == pytest.approx(arm["predicted_mean"])  # additive: exact
    np.testing.assert_allclose(arm["measured"], arm["predicted"], atol=1e-9)
    assert name == transfer.order_run_name(list(TASKS), arm["order"])
  assert "omni_thinker" in s["order_runs"]["order_1-0-2"]["labels"]
  assert s["spearman_predicted_measured"] == pytest.approx(1.0)
  assert s["stage1_max_abs_diff"] == pytest.approx(0.0)
  assert s["runs_per_seed"]["runs"] == 15
  report = (tmp_path / "report.md").read_text()
  for text in ("## Backward transfer B[a, b]", "(score - init) / (reference - init)",
               "**o:grammar → s:sort → o:template**",
               "**FWT-greedy**", "## What this does not show", "| -0.60 ± 0.00 |"):
    assert text in report
  derived = config_lib.load(str(tmp_path / s["derived_config"]))
  assert [max(w, key=lambda t: w[t]) for _, w in derived.data.stages] == s["omni_thinker"]["order"]


def test_study_excludes_a_task_that_did_not_learn(tmp_path):
  alone = [0.6, 0.0, 0.7]  # task 1's single-task run stays at init
  s = transfer.run(_base(), str(tmp_path), train_fn=_additive_world(INIT, alone, np.nan_to_num(HAND_B)))
  assert s["excluded"] == [TASKS[1]]
  B = np.asarray(s["B_mean"], float)
  assert np.isnan(B[1]).all() and B[0, 2] == pytest.approx(-0.1)
  assert all(np.isnan(arm["predicted"][1]) for arm in s["order_runs"].values())
  assert f"Excluded (reference − init ≤ {transfer.MIN_GAIN}" in (tmp_path / "report.md").read_text()


def test_study_needs_two_tasks(tmp_path):
  base = _base(**{"data.tasks": TASKS[:1], "data.mixture": {TASKS[0]: 1.0}})
  with pytest.raises(BadInputError, match="at least 2 tasks"):
    transfer.run(base, str(tmp_path), train_fn=lambda cfg, d: None)


def test_hand_totals_are_every_order():
  assert set(HAND_TOTALS) == set(itertools.permutations(range(3)))
