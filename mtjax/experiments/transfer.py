"""Transfer and order study: real backward transfer from pairwise sequential runs, and the order
Omni-Thinker's rule picks from it, predicted against measured.

Scores. Every task's held-out score is normalized per seed against that seed's untrained model
and that task's single-task run:

  norm_a(score) = (score - init_a) / (reference_a - init_a)

init_a: a's score at step 0 (the untrained model); reference_a: a's score after training a alone
for one stage. A task whose single-task run gains no more than `min_gain` over init
(reference_a - init_a <= min_gain) is excluded from everything normalized by it (reported, never
divided by a near-zero gain).

Backward transfer. B[a, b] = norm_a(a's score after training a then b, one stage each)
                           - norm_a(a's score after training a alone)   (= norm_a(...) - 1).
B[a, b] < 0: training b after a damages a.

Omni-Thinker's rule (tasks that later training damages most come late). Under its additivity
assumption the final normalized score of task a in a curriculum is
  predicted_a = own_a + sum of B[a, x] over the tasks x trained after a
(own_a = a's single-task normalized score = 1); the order with the best predicted mean over tasks is
chosen by enumerating every order (up to 6 tasks) or greedily beyond.

Out of sample (study.estimate_seeds = n): B and the chosen order come from the first n seeds'
pairwise runs; the orders are trained and measured on the other seeds only, so the prediction is
tested on seeds it was not fitted to. Tests there, per fresh seed (sign flips, Holm): the primary
`omni_thinker-orders`, the chosen order's measured mean minus the mean over every measured order
(what a random order scores in expectation); exploratory `additivity-last_trained`, the mean
absolute error of the additivity prediction minus that of the "last-trained task wins" predictor
(the last task scores its single-task 1, every earlier one the untrained 0).

The FWT-greedy order (zero-shot forward transfer: train a alone, score b) is kept as a separate,
so-named arm. GEM's ACC/BWT/FWT/forgetting (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018)
summarize each measured order's sequential R matrix:

  ACC        = mean_j R[T-1, j]
  BWT        = mean_{j < T-1} (R[T-1, j] - R[j, j])
  FWT        = mean_{j > 0}   (R[j-1, j] - baseline[j])
  forgetting = mean_{j < T-1} (max_{l < T-1} R[l, j] - R[T-1, j])
"""

from __future__ import annotations

import itertools
import json
import pprint
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report

MIN_GAIN = 0.02  # default guard: reference - init must exceed this (study.min_gain overrides)
MAX_EXHAUSTIVE = 6  # enumerate every order up to this many tasks, greedy beyond
ALL_ORDERS_UP_TO = 3  # the study measures every order when it has at most this many tasks


# ---------------------------------------------------------------- the arithmetic

def _nanmean(values: Any) -> float:
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  return float(v.mean()) if v.size else float("nan")


def _nan_reduce(fn: Any, stack: Any) -> np.ndarray:
  """np.nanmean / np.nanstd over axis 0, NaN (without a warning) where every value is NaN."""
  a = np.asarray(stack, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return fn(a, axis=0)


def normalize_scores(scores: Any, init: Any, reference: Any,
                     min_gain: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """(normalized scores, excluded) with normalized[..., a] = (scores[..., a] - init[a]) /
  (reference[a] - init[a]) over the last axis (tasks); `excluded[a]` is True (and that column NaN)
  where reference[a] - init[a] <= min_gain: the single-task run did not rise above init."""
  s = np.asarray(scores, np.float64)
  init, ref = np.asarray(init, np.float64), np.asarray(reference, np.float64)
  if min_gain < 0:
    raise ValueError(f"min_gain must be >= 0, got {min_gain}")
  gain = ref - init
  excluded = ~(gain > min_gain)  # NaN gains are excluded too
  safe = np.where(excluded, 1.0, gain)
  out = (s - init) / safe
  out = np.where(excluded, np.nan, out)
  return out, excluded


def backward_transfer(alone: Any, after: Any, init: Any,
                      min_gain: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """(B, excluded): B[a, b] = norm_a(after[a, b]) - norm_a(alone[a]).

  Args:
    alone: alone[a], a's score after training a alone (also the reference of the normalization).
    after: after[a, b], a's score after training a then b (the diagonal is ignored: NaN in B).
    init: init[a], a's score at step 0.
    min_gain: excluded rows (reference - init <= min_gain) are NaN.
  """
  alone, after = np.asarray(alone, np.float64), np.asarray(after, np.float64)
  T = alone.shape[0]
  if after.shape != (T, T):
    raise ValueError(f"after must be {T} x {T} (task a, then task b), got {after.shape}")
  norm_after, excluded = normalize_scores(after.T, init, alone, min_gain)  # columns: task a
  norm_alone, _ = normalize_scores(alone, init, alone, min_gain)
  B = norm_after.T - norm_alone[:, None]
  B[np.eye(T, dtype=bool)] = np.nan
  return B, excluded


def predicted_scores(B: Any, order: Sequence[int], own: Any = None) -> np.ndarray:
  """Omni-Thinker's additive prediction of each task's final normalized score for a curriculum
  (`order`: task indices, first trained first): own[a] + sum of B[a, x] over x after a (own: the
  single-task normalized scores, 1 by default). A task with a NaN entry among those, or whose row
  is NaN (excluded), is NaN."""
  B = np.asarray(B, np.float64)
  T = B.shape[0]
  if sorted(order) != list(range(T)):
    raise ValueError(f"order must be a permutation of range({T}), got {list(order)}")
  own_v = np.ones(T) if own is None else np.asarray(own, np.float64)
  out = own_v.copy()
  off_diagonal = ~np.eye(T, dtype=bool)
  for pos, a in enumerate(order):
    out[a] += sum(B[a, x] for x in order[pos + 1:])
    if T > 1 and np.isnan(B[a][off_diagonal[a]]).all():
      out[a] = np.nan
  return out


def _objective(B: np.ndarray, order: Sequence[int]) -> float:
  """The predicted total damage-or-gain of an order (excluded rows count 0: they are not scored)."""
  total = 0.0
  for pos, a in enumerate(order):
    total += sum(B[a, x] for x in order[pos + 1:])
  return total


def choose_order(B: Any, *, max_exhaustive: int = MAX_EXHAUSTIVE,
                 worst: bool = False) -> tuple[list[int], str]:
  """(order, method): the order with the best (worst=True: the worst) predicted mean final score.

  With the same own score for every task, the predicted mean is own + (sum over ordered pairs
  a before x of B[a, x]) / n_scored, so the order maximizes that sum; rows of excluded tasks (NaN)
  count 0. Up to `max_exhaustive` tasks every order is enumerated (itertools.permutations order;
  ties: the first). Beyond, greedily from the front: placing a next gives it B[a, x] for every
  remaining x, whatever follows, so the next task is the one with the best row sum over the
  remaining tasks (the one later training damages least; ties: the lowest index).
  """
  Bf = np.nan_to_num(np.asarray(B, np.float64), nan=0.0)
  T = Bf.shape[0]
  sign = -1.0 if worst else 1.0
  if T <= max_exhaustive:
    best, best_value = list(range(T)), -np.inf
    for perm in itertools.permutations(range(T)):
      value = sign * _objective(Bf, perm)
      if value > best_value + 1e-12:
        best, best_value = list(perm), value
    return best, "enumerated"
  remaining, order = list(range(T)), []
  while remaining:
    gains = [sign * sum(Bf[a, x] for x in remaining if x != a) for a in remaining]
    best = remaining[int(np.argmax(gains))]
    order.append(best)
    remaining.remove(best)
  return order, "greedy"


def fwt_greedy_order(M: Any) -> list[int]:
  """FWT-greedy order from a zero-shot transfer matrix M[a, b] (normalized score on b after
  training a alone; forward transfer, not BWT): next, the remaining task whose training gives the
  best mean score over the other remaining tasks (NaN entries skipped; ties: the lowest index)."""
  M = np.asarray(M, np.float64)
  remaining, order = list(range(M.shape[0])), []
  while remaining:
    if len(remaining) == 1:
      order.append(remaining.pop())
      break
    gains = [_nanmean([M[a, b] for b in remaining if b != a]) for a in remaining]
    gains = [-np.inf if np.isnan(g) else g for g in gains]
    best = remaining[int(np.argmax(gains))]
    order.append(best)
    remaining.remove(best)
  return order


def metrics(R: np.ndarray,
            baseline: Sequence[float] | np.ndarray | None = None) -> dict[str, float]:
  """GEM's ACC/BWT/FWT and forgetting of a sequential R[stage, task] (tasks in stage order);
  NaN columns (excluded tasks) are left out of each mean."""
  R = np.asarray(R, np.float64)
  T = R.shape[0]
  if R.shape != (T, T):
    raise ValueError(f"R must be square (stages x tasks), got {R.shape}")
  b = np.zeros(T) if baseline is None else np.asarray(baseline, np.float64)
  out = {"acc": _nanmean(R[-1])}
  if T > 1:
    out["bwt"] = _nanmean([R[-1, j] - R[j, j] for j in range(T - 1)])
    out["fwt"] = _nanmean([R[j - 1, j] - b[j] for j in range(1, T)])
    out["forgetting"] = _nanmean([R[: T - 1, j].max() - R[-1, j] for j in range(T - 1)])
  return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
  """Spearman's rank correlation (average ranks for ties); NaN under 3 points or no spread."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if x.size < 3 or np.isnan(x).any() or np.isnan(y).any():
    return float("nan")

  def ranks(v):
    v = np.round(v, 9)  # values equal but for float rounding tie
    order = np.argsort(v, kind="stable")
    r = np.empty(v.size)
    r[order] = np.arange(v.size, dtype=np.float64)
    for value in np.unique(v):
      r[v == value] = r[v == value].mean()
    return r

  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


# ---------------------------------------------------------------- the study

def _metric_text(summary: Mapping[str, Any]) -> str:
  per_task = summary.get("task_metrics") or {}
  if not per_task or len(set(per_task.values())) == 1:
    return f"`{next(iter(per_task.values()), summary['metric'])}`"
  return ", ".join(f"{t} `{m}`" for t, m in per_task.items())


def min_gain(base: Config) -> float:
  return float(getattr(base.study, "min_gain", MIN_GAIN))


def pair_run_name(a: str, b: str) -> str:
  return f"{a}_then_{b}"


def order_run_name(tasks: Sequence[str], order: Sequence[str]) -> str:
  """An order run's arm name; with two tasks an order is a pairwise run (the same config), and
  shares it."""
  if len(order) == 2:
    return pair_run_name(*order)
  return "order_" + "-".join(str(list(tasks).index(t)) for t in order)


def check(base: Config) -> None:
  if len(base.data.tasks) < 2:
    raise BadInputError("data.tasks", f"the transfer study needs at least 2 tasks, got "
                        f"{list(base.data.tasks)}")
  if min_gain(base) < 0:
    raise BadInputError("study.min_gain", f"expected a value >= 0, got {min_gain(base)}")
  n = base.study.estimate_seeds
  if n < 0 or (n and n >= len(base.study.seeds)):
    raise BadInputError("study.estimate_seeds", f"expected 0 (in sample) or a number of seeds "
                        f"below the {len(base.study.seeds)} of study.seeds (the rest test the "
                        f"order), got {n}")


COMPARISONS = ("omni_thinker-orders", "additivity-last_trained")


def last_trained_prediction(T: int, order: Sequence[int]) -> np.ndarray:
  """The "last-trained task wins" predictor's normalized final scores: 1 (its single-task score)
  for the task trained last, 0 (the untrained model) for every earlier one."""
  out = np.zeros(T)
  out[order[-1]] = 1.0
  return out


def split_seeds(base: Config) -> tuple[list[int], list[int]]:
  """(estimation seeds, test seeds): the first study.estimate_seeds and the rest; every seed for
  both when estimate_seeds is 0 (in sample)."""
  seeds, n = list(base.study.seeds), int(getattr(base.study, "estimate_seeds", 0))
  if 0 < n < len(seeds):
    return seeds[:n], seeds[n:]
  return seeds, seeds


def run_counts(T: int, n_orders: int) -> dict[str, int]:
  """Arms and training steps (in stages) of one seed: T single runs, T(T-1) pairwise runs of two
  stages, and n_orders order runs of T stages (with T = 2 they are pairwise runs: no new ones)."""
  extra = 0 if T == 2 else n_orders
  return {"single_runs": T, "pairwise_runs": T * (T - 1), "order_runs": extra,
          "runs": T + T * (T - 1) + extra,
          "stages": T + 2 * T * (T - 1) + extra * T}


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """Single and pairwise runs (every seed), B and the chosen order from their seed mean, then the
  order runs (every seed): predicted vs measured."""
  from mtjax import tasks as task_registry
  st = base.study
  tasks = list(base.data.tasks)
  T, S, guard = len(tasks), st.steps_per_task, min_gain(base)
  metric = {t: arms.metric_for(base, t) for t in tasks}  # open-ended tasks: their verifier
  open_ended = [task_registry.get(t).open_ended for t in tasks]
  single_cfg = lambda seed, t: arms.configure(base, seed=seed, steps=S, eval_every=S,
                                              mixture={t: 1.0})
  staged_cfg = lambda seed, order: arms.configure(
      base, seed=seed, steps=len(order) * S, eval_every=S,
      stages=arms.sequential_stages(order, S))

  # 1. Per seed: T single runs (init, reference, zero-shot transfer); T(T-1) pairwise runs on
  # the estimation seeds.
  estimate, test = split_seeds(base)
  per_seed = []
  for seed in st.seeds:
    seed_dir = root / f"seed{seed}"
    M, init = np.zeros((T, T)), np.zeros(T)
    for a, task in enumerate(tasks):
      d = arms.run(seed_dir, f"only_{task}", single_cfg(seed, task), train_fn)
      M[a] = arms.eval_at(d, S, tasks, metric)
      init[a] = arms.eval_at(d, 0, tasks, metric)[a]
    reference = np.diag(M).copy()
    Mn, _ = normalize_scores(M, init, reference, guard)  # column b normalized by b's own run
    entry: dict[str, Any] = {
        "seed": seed, "init": init.tolist(), "reference": reference.tolist(),
        "gain": (reference - init).tolist(),
        "excluded": [t for t, g in zip(tasks, reference - init) if not g > guard],
        "M": M.tolist(), "M_normalized": Mn.tolist()}
    if seed in estimate:
      after, stage1 = np.full((T, T), np.nan), np.full((T, T), np.nan)
      for a, b in itertools.permutations(range(T), 2):
        d = arms.run(seed_dir, pair_run_name(tasks[a], tasks[b]),
                     staged_cfg(seed, (tasks[a], tasks[b])), train_fn)
        after[a, b] = arms.eval_at(d, 2 * S, tasks, metric)[a]
        stage1[a, b] = arms.eval_at(d, S, tasks, metric)[a]
      B, excluded = backward_transfer(reference, after, init, guard)
      entry.update(excluded=[t for t, e in zip(tasks, excluded) if e], after=after.tolist(),
                   stage1=stage1.tolist(), B=B.tolist())
    per_seed.append(entry)
  fitted = [s for s in per_seed if "B" in s]

  # 2. B over the estimation seeds (a task excluded in any seed is excluded), the orders to run.
  excluded = [t for t in tasks if any(t in s["excluded"] for s in per_seed)]
  keep = np.array([t not in excluded for t in tasks])
  Bs = np.array([s["B"] for s in fitted], np.float64)
  Bs[:, ~keep, :] = np.nan
  B_mean = _nan_reduce(np.nanmean, Bs)
  chosen, method = choose_order(B_mean)
  worst, _ = choose_order(B_mean, worst=True)
  M_mean = np.mean(np.array([s["M_normalized"] for s in fitted], np.float64), axis=0)
  fwt = fwt_greedy_order(M_mean)
  named = {"omni_thinker": chosen, "fwt_greedy": fwt, "predicted_worst": worst}
  if T <= ALL_ORDERS_UP_TO:
    candidates = [list(p) for p in itertools.permutations(range(T))]
  else:
    candidates = [chosen, worst, fwt]
  order_runs: dict[str, dict[str, Any]] = {}
  for perm in candidates:
    name = order_run_name(tasks, [tasks[i] for i in perm])
    if name not in order_runs:
      order_runs[name] = {"order": [tasks[i] for i in perm], "labels": [
          label for label, o in named.items() if list(o) == list(perm)]}

  # 3. Per test seed: the order runs; R after each stage; measured vs predicted.
  tested = [s for s in per_seed if s["seed"] in test]
  for s in tested:
    seed_dir = root / f"seed{s['seed']}"
    init, reference = np.asarray(s["init"]), np.asarray(s["reference"])
    B_seed = np.asarray(s["B"] if "B" in s else B_mean, np.float64)
    B_seed[~keep] = np.nan
    s["orders"] = {}
    for name, info in order_runs.items():
      order = info["order"]
      perm = [tasks.index(t) for t in order]
      d = arms.run(seed_dir, name, staged_cfg(s["seed"], order), train_fn)
      R = np.array([arms.eval_at(d, (i + 1) * S, tasks, metric) for i in range(T)])
      Rn, _ = normalize_scores(R, init, reference, guard)
      Rn[:, ~keep] = np.nan
      stage_R = Rn[:, perm]  # columns in stage order, as GEM's R
      s["orders"][name] = {
          "R": R.tolist(), "R_normalized": Rn.tolist(), "final": R[-1].tolist(),
          "final_normalized": Rn[-1].tolist(),
          "predicted_own_B": predicted_scores(B_seed, perm).tolist(),
          "predicted": predicted_scores(B_mean, perm).tolist(),
          "last_trained": last_trained_prediction(T, perm).tolist(),
          "metrics": metrics(stage_R, np.zeros(T))}

  arms_summary = {}
  for name, info in order_runs.items():
    perm = [tasks.index(t) for t in info["order"]]
    pred = predicted_scores(B_mean, perm)
    finals = np.array([s["orders"][name]["final_normalized"] for s in tested], np.float64)
    measured_means = [_nanmean(f[keep]) for f in finals]
    arms_summary[name] = {
        **info, "predicted": pred.tolist(), "predicted_mean": _nanmean(pred[keep]),
        "measured": _nan_reduce(np.nanmean, finals).tolist(),
        "measured_std": _nan_reduce(np.nanstd, finals).tolist(),
        "measured_mean": _nanmean(measured_means), "measured_mean_std": float(np.std(measured_means)),
        "measured_mean_per_seed": measured_means}
  names = list(arms_summary)
  rank = spearman([arms_summary[n]["predicted_mean"] for n in names],
                  [arms_summary[n]["measured_mean"] for n in names])
  chosen_tasks = [tasks[i] for i in chosen]
  config_path = write_schedule_config(root / "omni_thinker_schedule.py", base, chosen_tasks, S)
  return {
      "tasks": tasks, "open_ended": open_ended, "seeds": list(st.seeds), "metric": st.metric,
      "task_metrics": metric,
      "steps_per_task": S, "min_gain": guard,
      "normalization": "(score - init) / (reference - init); init: the task's score at step 0 "
                       "(untrained model), reference: its score after training it alone for one "
                       f"stage (same seed); tasks with reference - init <= {guard} are excluded",
      "lr_schedules": _lr_schedules(root, per_seed),
      "excluded": excluded, "B_mean": B_mean.tolist(),
      "B_std": _nan_reduce(np.nanstd, Bs).tolist(),
      "M_normalized_mean": M_mean.tolist(),
      "omni_thinker": {"order": chosen_tasks, "method": method},
      "predicted_worst": {"order": [tasks[i] for i in worst]},
      "fwt_greedy": {"order": [tasks[i] for i in fwt]},
      "order_runs": arms_summary, "spearman_predicted_measured": rank,
      "stage1_max_abs_diff": _nanmax([np.abs(np.asarray(s["stage1"]) - np.asarray(s["reference"])[:, None])
                                      for s in fitted]),
      "estimate_seeds": estimate, "test_seeds": test,
      "runs_per_seed": run_counts(T, len(order_runs)),
      "per_seed": per_seed, "derived_config": config_path.name}


def _nanmax(arrays: Sequence[np.ndarray]) -> float:
  v = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  v = v[~np.isnan(v)]
  return float(v.max()) if v.size else float("nan")


def _lr_schedules(root: epath.Path, per_seed: Sequence[dict[str, Any]]) -> list[str]:
  """The optimizer.schedule values the arms ran with (their config.json)."""
  found = set()
  for s in per_seed:
    for path in sorted((root / f"seed{s['seed']}").glob("*/config.json")):
      found.add(str(json.loads(path.read_text())["optimizer"]["schedule"]))
  return sorted(found)


def _docstring(text: str) -> str:
  """`text` as a triple-quoted Python literal whose value is exactly `text`: backslashes, quotes
  and characters that are not printable (but newlines) are escaped, so any task name is safe."""
  def escape(c: str) -> str:
    if c in '\\"':
      return "\\" + c
    if c == "\n" or c.isprintable():
      return c
    return c.encode("unicode_escape").decode("ascii")
  return '"""' + "".join(escape(c) for c in text) + '"""'


def write_schedule_config(path: epath.Path, base: Config, order: Sequence[str],
                          steps_per_task: int) -> epath.Path:
  """A config file others can run: the base config with the derived order as stages."""
  cfg = arms.configure(base, seed=base.seed, steps=steps_per_task * len(order),
                       eval_every=base.eval.every, stages=arms.sequential_stages(order, steps_per_task))
  cfg = cfg.replace(**{"train.progress": True, "checkpoint.every": base.checkpoint.every})
  doc = ("The order Omni-Thinker's rule picks from the backward-transfer matrix measured by\n"
         "`mtjax experiment transfer` (tasks that later training damages most come late):\n"
         f"{' -> '.join(order)}, {steps_per_task} steps per stage.\n\n"
         f"  mtjax train --config {path.name} --workdir runs/omni_thinker\n")
  path.write_text(
      f"{_docstring(doc)}\n\n"
      "import ml_collections\n\n"
      f"CONFIG = {pprint.pformat(cfg.to_dict(), indent=1, width=100)}\n\n\n"
      "def get_config(variant: str = '') -> ml_collections.ConfigDict:\n"
      "  del variant\n"
      "  return ml_collections.ConfigDict(CONFIG)\n")
  return path


# ---------------------------------------------------------------- the report

def _f(v: Any, digits: int = 2) -> str:
  return "n/a" if v is None or np.isnan(float(v)) else f"{float(v):+.{digits}f}"


def _ms(values: Sequence[Any], digits: int = 2) -> str:
  v = np.array([np.nan if x is None else x for x in values], np.float64)
  v = v[~np.isnan(v)]
  return "n/a" if not v.size else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def describe(summary: dict[str, Any], root: Any = "") -> report.Report:
  """root: the study's directory, where its generated config of Omni-Thinker's order lies."""
  tasks, per_seed = summary["tasks"], summary["per_seed"]
  measured = [s for s in per_seed if "orders" in s]  # the seeds the orders ran on
  out_of_sample = "test_seeds" in summary and summary["test_seeds"] != summary["estimate_seeds"]
  T, S = len(tasks), summary["steps_per_task"]
  short = [t.replace("structured_", "s:").replace("open_ended_", "o:") for t in tasks]
  excluded = summary["excluded"]
  B, B_std = np.asarray(summary["B_mean"]), np.asarray(summary["B_std"])
  arms_s = summary["order_runs"]
  omni = summary["omni_thinker"]
  omni_run = order_run_name(tasks, omni["order"])
  counts = summary["runs_per_seed"]
  arrow = lambda order: " → ".join(short[tasks.index(t)] for t in order)
  doc = report.Report("Transfer and order study: backward transfer and Omni-Thinker's order")
  if out_of_sample:
    doc.text(_plainly(summary, short))
  doc.text(
      f"Tasks: {', '.join(tasks)} (open-ended: "
      f"{', '.join(t for t, o in zip(tasks, summary['open_ended']) if o) or 'none'}). "
      f"Seeds: {summary['seeds']}. One stage = {S} steps. Score: held-out {_metric_text(summary)}. "
      f"LR schedule of the arms: {', '.join(summary['lr_schedules']) or 'unknown'} "
      "(optimizer.schedule; with `constant`, the LR at a step does not depend on the arm's length, "
      "and a stage started later trains at the same LR).")
  doc.text(
      f"Runs per seed: {counts['single_runs']} single-task + {counts['pairwise_runs']} pairwise "
      f"(a then b) + {counts['order_runs']} order runs"
      f"{' (with 2 tasks the two orders are the pairwise runs)' if T == 2 else ''} = "
      f"{counts['runs']} runs, "
      f"{counts['stages']} stages of {S} steps"
      + (f"; {_total_runs(summary)} runs in all." if not out_of_sample else
         f". Out of sample: B and the chosen order from seeds {summary['estimate_seeds']} "
         f"(single-task and pairwise runs), the orders trained and measured on seeds "
         f"{summary['test_seeds']} (single-task and order runs): {_total_runs(summary)} runs in "
         "all."))
  doc.text(
      f"**Normalization.** normalized score of task a = {summary['normalization']}. So a task's "
      "single-task score is 1 and the untrained model's 0, per seed.")
  doc.table(["task", "init (step 0)", "reference (alone)", "reference − init", "used"],
            [[short[a], _ms([s["init"][a] for s in per_seed], 3),
              _ms([s["reference"][a] for s in per_seed], 3),
              _ms([s["gain"][a] for s in per_seed], 3),
              "no: excluded" if tasks[a] in excluded else "yes"] for a in range(T)])
  if excluded:
    doc.text(f"Excluded (reference − init ≤ {summary['min_gain']} in some seed, so normalizing by "
             f"it would divide by about zero): {', '.join(excluded)}. Their rows of B and their "
             "scores are left out; they still take part as tasks trained after others.")
  doc.heading("Backward transfer B[a, b] (mean ± std over seeds"
              + (f" {summary['estimate_seeds']})" if out_of_sample else ")"))
  doc.text(
      "B[a, b] = normalized score of a after training a then b − normalized score of a after "
      "training a alone (= that − 1). Row: the task that was learned first; column: the task "
      "trained after it. Negative: training b damages a.")
  doc.table(["a \\ then b"] + short,
            [[short[a]] + ["—" if a == b else
                           ("n/a" if np.isnan(B[a, b]) else f"{B[a, b]:+.2f} ± {B_std[a, b]:.2f}")
                           for b in range(T)] for a in range(T)])
  doc.text(
      f"Stage 1 of each pairwise run repeats the single-task run of a; the largest difference in "
      f"a's raw score between them is {summary['stage1_max_abs_diff']:.3f} (run-to-run noise of the "
      "pipeline, not transfer).")
  doc.heading("Omni-Thinker's order: predicted vs measured")
  doc.text(
      "Predicted final normalized score of a (additivity): 1 + Σ B[a, x] over the tasks x trained "
      f"after a, from the seed-mean B. Order chosen by the best predicted mean ({omni['method']}"
      f"{' over all ' + str(_factorial(T)) + ' orders' if omni['method'] == 'enumerated' else ''}): "
      f"**{arrow(omni['order'])}**.")
  o = arms_s[omni_run]
  doc.table(["task", "stage", "predicted", "measured (mean ± std over seeds)"],
            [[short[a], str(omni["order"].index(tasks[a]) + 1), _f(o["predicted"][a]),
              _ms([s["orders"][omni_run]["final_normalized"][a] for s in measured])]
             for a in range(T)]
            + [["**mean**", "", _f(o["predicted_mean"]),
                f"{o['measured_mean']:.2f} ± {o['measured_mean_std']:.2f}"]])
  doc.heading("Every measured order")
  ranked = sorted(arms_s, key=lambda n: -np.nan_to_num(arms_s[n]["predicted_mean"], nan=-np.inf))
  doc.table(["order", "arm", "predicted mean", "measured mean ± std"] + [f"measured {x}" for x in short],
            [[arrow(arms_s[n]["order"]), ", ".join(arms_s[n]["labels"]) or "—",
              _f(arms_s[n]["predicted_mean"]),
              f"{arms_s[n]['measured_mean']:.2f} ± {arms_s[n]['measured_mean_std']:.2f}"]
             + [_ms([s["orders"][n]["final_normalized"][a] for s in measured]) for a in range(T)]
             for n in ranked])
  rank = summary["spearman_predicted_measured"]
  doc.text(f"Spearman rank correlation of predicted vs measured mean over these {len(arms_s)} "
           "orders: "
           f"{'n/a (fewer than 3 orders or no spread)' if np.isnan(rank) else f'{rank:+.2f}'}.")
  doc.text(f"**FWT-greedy** (forward transfer, not BWT: train a alone, score b zero-shot; next the "
           f"task whose training scores best on the others): {arrow(summary['fwt_greedy']['order'])}. "
           f"Predicted worst order: {arrow(summary['predicted_worst']['order'])}.")
  doc.heading("GEM metrics of Omni-Thinker's order (its R matrix, normalized, tasks in stage order)")
  doc.table(["metric", "mean ± std over seeds"],
            [[k.upper(), _ms([s["orders"][omni_run]["metrics"][k] for s in measured], 3)]
             for k in ("acc", "bwt", "fwt", "forgetting")
             if k in measured[0]["orders"][omni_run]["metrics"]])
  doc.text("ACC = mean final score; BWT = mean(R[T-1, j] − R[j, j]); FWT = mean(R[j-1, j] − init[j]) "
           "(init normalizes to 0); forgetting = mean(max earlier R[l, j] − R[T-1, j]) (GEM; "
           "Chaudhry et al.).")
  if out_of_sample:
    _describe_tests(doc, summary)
  doc.heading("What this does not show")
  doc.text(
      "The setting differs from Omni-Thinker's: there, RL (GRPO) on a pretrained LLM, where "
      "later tasks damage earlier ones a little; here, supervised training from scratch of a "
      "tiny model, where training one task alone after another erases most of the first "
      "(B near -0.9), so the last-trained task dominates every order and the rule has little "
      "room to matter. Nothing here says how the rule does in the paper's regime.")
  doc.text(
      f"B is measured for one stage length ({S} steps), one model size and these {T} tasks; "
      "forgetting at other lengths, or after a learned task is revisited, is not measured. The "
      "prediction assumes damage adds up: a task trained first and then damaged by several tasks is "
      "predicted 1 + the sum of its B's, which can fall below 0 (the untrained model) where the "
      "measured score cannot go far below it; when forgetting is near-total after one later task, "
      "additivity overstates the damage of the rest and mostly the last stage matters. Measured "
      "orders that match their prediction support the rule only for these tasks and this budget; "
      "with few seeds, differences between orders smaller than their spread are not evidence. "
      "Stages train each task alone (no replay, no mixing), so this does not say how mixed or "
      "replayed curricula behave. The scores are teacher-forced held-out token accuracy, not "
      "generated-answer correctness, and normalization by the untrained model (not by a "
      "format-only floor) can still credit format learning as task learning.")
  doc.text(f"Runnable config of Omni-Thinker's order: `{summary['derived_config']}` "
           f"(`mtjax train --config {epath.Path(root) / summary['derived_config']} --workdir DIR`).")
  doc.figure("transfer.png", lambda: _figure(summary, short), alt="transfer")
  return doc


def _total_runs(summary: Mapping[str, Any]) -> int:
  """Every arm the study trained, over all seeds (pairwise runs on the estimation seeds only,
  order runs on the test seeds only)."""
  T, per_seed = len(summary["tasks"]), summary["per_seed"]
  pairwise = sum("B" in s for s in per_seed) * T * (T - 1)
  orders = 0 if T == 2 else sum(len(s.get("orders", {})) for s in per_seed)
  return T * len(per_seed) + pairwise + orders


def tests(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The out-of-sample tests over the test seeds (stats.compare_named; module docstring)."""
  from mtjax.experiments import stats
  tasks = summary["tasks"]
  keep = np.array([t not in summary["excluded"] for t in tasks])
  omni = order_run_name(tasks, summary["omni_thinker"]["order"])
  chosen, errors = [], []
  for s in (s for s in summary["per_seed"] if "orders" in s):
    means = {n: _nanmean(np.asarray(o["final_normalized"])[keep]) for n, o in s["orders"].items()}
    chosen.append(means[omni] - float(np.mean(list(means.values()))))
    err = {k: _nanmean([abs(np.asarray(o[k])[a] - np.asarray(o["final_normalized"])[a])
                        for o in s["orders"].values() for a in range(len(tasks)) if keep[a]])
           for k in ("predicted", "last_trained")}
    errors.append(err["predicted"] - err["last_trained"])
  return stats.compare_named({"omni_thinker-orders": {"mean normalized score": chosen},
                              "additivity-last_trained": {"mean absolute error": errors}},
                             summary.get("primary", COMPARISONS[0]))


def _plainly(summary: Mapping[str, Any], short: Sequence[str]) -> str:
  t = tests(summary)
  c = t["omni_thinker-orders"]["mean normalized score"]
  e = t["additivity-last_trained"]["mean absolute error"]
  return ("**What this run shows.** Primary (named before the run): on seeds the prediction was "
          "not fitted to, Omni-Thinker's order vs the mean of all orders (a random order in "
          "expectation), mean normalized score: "
          + c.sentence("Omni-Thinker's order higher", "Omni-Thinker's order lower")
          + f" (mean difference {c.mean:+.3f}). Exploratory: the additivity prediction's error "
          "vs the last-trained-task-wins predictor's: "
          + e.sentence("additivity worse", "additivity better") + f" (mean {e.mean:+.3f}). "
          "**What it cannot show**: the paper's regime (RL on a pretrained LLM; see the end), "
          "other stage lengths, sizes or tasks.")


def _describe_tests(doc: report.Report, summary: Mapping[str, Any]) -> None:
  from mtjax.experiments import stats
  t = tests(summary)
  measured = [s for s in summary["per_seed"] if "orders" in s]
  doc.heading("Out of sample: the prediction tested on fresh seeds")
  doc.text(stats.method_note(summary.get("primary", COMPARISONS[0]), len(measured), 1,
                             "quantity"))
  c = t["omni_thinker-orders"]["mean normalized score"]
  e = t["additivity-last_trained"]["mean absolute error"]
  doc.bullets([
      "Omni-Thinker's order minus the mean over every measured order (per test seed: "
      + ", ".join(f"{d:+.3f}" for d in c.diffs) + "): "
      + c.sentence("Omni-Thinker's order higher", "Omni-Thinker's order lower") + ".",
      "Mean absolute error of the additivity prediction minus that of the last-trained-task-wins "
      "predictor, over every order and kept task (per test seed: "
      + ", ".join(f"{d:+.3f}" for d in e.diffs) + "): "
      + e.sentence("additivity worse", "additivity better") + "."])


def _factorial(n: int) -> int:
  out = 1
  for k in range(2, n + 1):
    out *= k
  return out


def _figure(summary: dict[str, Any], short: Sequence[str]) -> Any:
  tasks = summary["tasks"]
  B = np.asarray(summary["B_mean"])
  fig, axes = report.figure(1, 2, figsize=(10, 3.8), dpi=110)
  lim = max(1e-6, float(np.nanmax(np.abs(B))) if np.isfinite(B).any() else 1.0)
  im = axes[0].imshow(np.nan_to_num(B, nan=0.0), cmap="RdBu", vmin=-lim, vmax=lim)
  axes[0].set_xticks(range(len(short)), short, rotation=45, ha="right", fontsize=7)
  axes[0].set_yticks(range(len(short)), short, fontsize=7)
  axes[0].set_title("B[a, b]: a after a→b − a alone (normalized)", fontsize=9)
  axes[0].set_xlabel("then trained on b", fontsize=8)
  axes[0].set_ylabel("learned first: a", fontsize=8)
  fig.colorbar(im, ax=axes[0], fraction=0.046)
  arms_s = summary["order_runs"]
  for i, a in enumerate(arms_s.values()):
    label = "→".join(str(tasks.index(t)) for t in a["order"])
    if a["labels"]:
      label += " (" + ", ".join(a["labels"]) + ")"
    axes[1].errorbar([np.nan_to_num(a["predicted_mean"], nan=0.0)], [a["measured_mean"]],
                     yerr=[a["measured_mean_std"]], fmt="o", color=f"C{i % 10}", label=label)
  values = [np.nan_to_num(a["predicted_mean"], nan=0.0) for a in arms_s.values()] + [
      a["measured_mean"] for a in arms_s.values()]
  values = [v for v in values if np.isfinite(v)] or [0.0, 1.0]
  lo, hi = min(values) - 0.05, max(values) + 0.05
  axes[1].plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
  axes[1].set_xlabel("predicted mean normalized score", fontsize=8)
  axes[1].set_ylabel("measured (mean ± std over seeds)", fontsize=8)
  axes[1].set_title("orders: predicted vs measured", fontsize=9)
  axes[1].legend(fontsize=6)
  return fig


STUDY = arms.Study(
    name="transfer",
    help="pairwise sequential runs: backward transfer B, Omni-Thinker's order predicted vs measured",
    summarize=summarize, describe=describe, check=check, comparisons=COMPARISONS,
    default_primary=COMPARISONS[0])


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
