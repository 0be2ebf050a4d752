"""Is training one model on K related tasks more efficient than K task-specific models?

For each seed: K single-task runs of S steps each, and one multi-task run of K x S steps on the
mixture (same batch shape, so the same total compute), all evaluated on held-out splits every
`study.eval_every` steps (and, under study.eval_schedule=log, at steps 1, 2, 4, 8, ...: dense
early, where single-task runs cross their targets). Every arm trains with the same LR at the
same step whatever its length (study.lr_schedule: constant after warmup, or wsd with the same
absolute decay length; arms.lr_settings).

Per task and arm, the crossing of its target: interpolated linearly (in tokens) between the last
eval below the target and the first at or above it, which two evals bound it (the crossing
interval). Efficiency ratio = (sum over tasks of single-task tokens to target) / (multi-task
tokens until EVERY task reached its target); > 1 means the joint run got there with less compute.
Per seed it has an interval: low = the most pessimistic crossings (single-task runs at the start
of their intervals, the joint run at the end of its), high = the most optimistic. A target a run
never reached within its budget is censored there (reached after it at the earliest, or never):
a single-task run that never got there leaves the ratio a lower bound, a joint run that never did
an upper bound. The ratio's null is not 1: with no transfer it is sum(s) / max(s_t / r_t) for the
measured loss-token shares r_t (multiplier.ratio_null). Verdict over seeds: log(ratio / null),
paired by seed, by an exact two-sided sign-flip test; "more efficient" / "less efficient" than no
transfer with p < 0.05, else "inconclusive" (a censored ratio enters by its interval's end nearest
the null when the interval lies on one side of it, else as 0: `log_excess`). Transfer per task:
the effective-data multiplier (multiplier.py), tested per task against the masked-joint run
(primary) and the single-task run (exploratory).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, floors, report, stats
from mtjax.experiments import multiplier as mx

MIN_SEEDS = 3  # recorded for older reports; the sign-flip test sets the power now


def tokens_per_step(config: Config) -> int:
  return config.data.batch_size * config.data.seq_len


@dataclasses.dataclass(frozen=True)
class Crossing:
  """Where a curve first reached its target: `at` interpolated linearly between `low` (the last
  eval below the target) and `high` (the first eval at or above it); low == at == high when the
  first eval was already at the target."""

  at: float
  low: float
  high: float

  def to_json(self) -> dict[str, float]:
    return {"at": self.at, "low": self.low, "high": self.high}


def crossing(curve: Sequence[tuple[float, float]], target: float) -> Crossing | None:
  """The first crossing of `target` by a curve of (x, value) points (x increasing; NaN values are
  skipped, a repeated x keeps its last value); None if the curve never reaches it."""
  prev: tuple[float, float] | None = None
  for x, v in _clean(curve):
    if v >= target:
      if prev is None:
        return Crossing(float(x), float(x), float(x))
      x0, v0 = prev  # v0 < target <= v
      return Crossing(x0 + (target - v0) / (v - v0) * (x - x0), float(x0), float(x))
    prev = (float(x), float(v))
  return None


def _clean(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  last = {x: v for x, v in sorted(curve, key=lambda p: p[0])}
  return [(x, v) for x, v in last.items() if not math.isnan(v)]


def _ratio(num: float, den: float) -> float:
  if den == 0:  # already at target before training: no difference to measure
    return 1.0 if num == 0 else math.inf
  if math.isinf(den):  # the joint run may never get there
    return 0.0 if math.isfinite(num) else math.nan
  return num / den


def censored(budget: float) -> Crossing:
  """A target a run never reached within its `budget` tokens: it would cross after the budget at
  the earliest, or never (at = NaN, low = budget, high = inf)."""
  return Crossing(math.nan, float(budget), math.inf)


def efficiency_ratio(single: Mapping[str, Crossing | None],
                     multi: Mapping[str, Crossing | None], *,
                     single_budget: float | None = None,
                     multi_budget: float | None = None) -> tuple[float, float, float]:
  """(ratio, low, high) from each task's crossing in its single-task run and in the multi-task
  run (both in tokens): ratio from the interpolated crossings, low from the most pessimistic
  ones (single-task crossings at their interval's start, the joint run's at its end), high from
  the most optimistic. A missing crossing (None) is censored at its run's budget in tokens when
  one is given (the ratio is then NaN and one end of the interval unbounded: a single-task run
  that never got there bounds the ratio from below, a joint run that never did from above);
  without a budget everything is NaN."""
  def fill(crossings: Mapping[str, Crossing | None], budget: float | None) -> list[Crossing] | None:
    if any(c is None for c in crossings.values()) and budget is None:
      return None
    return [censored(budget or 0.0) if c is None else c for c in crossings.values()]

  s, m = fill(single, single_budget), fill(multi, multi_budget)
  if s is None or m is None or not m:
    return math.nan, math.nan, math.nan
  missing = any(math.isnan(c.at) for c in s + m)
  point = math.nan if missing else _ratio(sum(c.at for c in s), max(c.at for c in m))
  low = _ratio(sum(c.low for c in s), max(c.high for c in m))
  high = _ratio(sum(c.high for c in s), max(c.low for c in m))
  return point, low, high


def log_excess(ratio: float, low: float, high: float, null: float) -> float:
  """One seed's log(ratio / no-transfer value) for the sign-flip test. A censored ratio (no point
  value) enters by its interval's end nearest the null when the whole interval lies on one side
  (a conservative value of the right sign), else as 0 (its sign is unknown: the seed then adds
  nothing to either direction). NaN where the null or the interval is unknown."""
  if not (_positive(null) and math.isfinite(null)):
    return math.nan
  if _positive(ratio):
    return math.log(ratio / null)
  if math.isnan(low) or math.isnan(high):
    return math.nan
  if low > null:
    return math.log(low / null)
  if high < null:
    return math.log(max(high, 1e-300) / null)
  return 0.0


def verdict(ratios: Sequence[tuple[float, float, float]], nulls: Sequence[float]) -> tuple[str, str]:
  """(verdict, why) of the efficiency ratio against its no-transfer value, from each seed's
  (ratio, low, high) and null: the paired log(ratio / null) over seeds by an exact two-sided
  sign-flip test (a family of one). 'more efficient' / 'less efficient' than no transfer only
  with p < 0.05, else 'inconclusive' with the p and what made it so."""
  diffs = [log_excess(r, lo, hi, n) for (r, lo, hi), n in zip(ratios, nulls)]
  if not diffs:
    return "inconclusive", "no seeds"
  if any(math.isnan(d) for d in diffs):
    return "inconclusive", ("a seed has no no-transfer value (a single-task run never reached "
                            "its target) or no ratio interval")
  c = stats.compare({"ratio": diffs})["ratio"]
  unknown = sum(d == 0 and not _positive(r) for d, (r, _, _) in zip(diffs, ratios))
  note = (f"; {unknown} censored seed(s) whose interval contains the null enter as 0"
          if unknown else "")
  if c.direction() > 0:
    return "more efficient", (f"the ratio lies above its no-transfer value: sign-flip p = "
                              f"{c.p:.3g}, {len(diffs)} seeds{note}")
  if c.direction() < 0:
    return "less efficient", (f"the ratio lies below its no-transfer value: sign-flip p = "
                              f"{c.p:.3g}, {len(diffs)} seeds{note}")
  return "inconclusive", (f"no detectable difference between the ratio and its no-transfer value "
                          f"at this power: sign-flip p = {c.p:.3g}, {len(diffs)} seeds, smallest "
                          f"detectable mean log ratio {c.detectable:.3g}{note}")


def _seed_ratios(per_seed: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float, float]],
                                                                 list[float]]:
  return ([(_nan(s["ratio"]), _nan(s["ratio_interval"][0]), _nan(s["ratio_interval"][1]))
           for s in per_seed], [_nan(s.get("ratio_null")) for s in per_seed])


# ---------------------------------------------------------------- the study

def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """Trains every arm for every seed (skipping finished ones); the summary of their evals. With
  study.model_sizes: once per size under root/d_model<d>, and the tests across tasks x sizes;
  with study.lr_candidates: each arm kind's LR tuned first (`tune_lrs`)."""
  if base.study.model_sizes:
    by_size = {}
    for d in base.study.model_sizes:
      sized = base.replace(**size_settings(d))
      by_size[str(d)] = _summarize_one(sized, root / f"d_model{d}", train_fn)
    return {"tasks": list(base.data.tasks), "seeds": list(base.study.seeds),
            "model_sizes": list(base.study.model_sizes), "by_size": by_size,
            "size_tests": size_tests(by_size, STUDY.primary(base)),
            "verdict": "; ".join(f"d_model {d}: {s['verdict']}" for d, s in by_size.items()),
            "verdict_reason": "per size, the ratio against its no-transfer value (each size's "
                              "report section)"}
  return _summarize_one(base, root, train_fn)


def size_settings(d_model: int) -> dict[str, Any]:
  """The model fields of one size of the size sub-study (mlp 4 x d_model, as the base's 64/256)."""
  return {"model.d_model": int(d_model), "model.mlp_dim": 4 * int(d_model),
          "study.model_sizes": ()}


def size_tests(by_size: Mapping[str, Mapping[str, Any]], primary: str) -> dict[str, Any]:
  """log M per seed, tested by sign flips with Holm across tasks x sizes (the family the size
  sub-study names): {comparison: {"<task> @ d<size>": Comparison json}}."""
  family: dict[str, dict[str, list[float]]] = {}
  for d, summary in by_size.items():
    runs = summary["per_seed"]
    for key in COMPARISONS:
      if not all(key in r for r in runs):
        continue
      for t in summary["tasks"]:
        logs = [math.log(r[key][t]["value"]) for r in runs if _positive(r[key][t]["value"])]
        family.setdefault(key, {})[f"{t} @ d{d}"] = (
            logs if len(logs) == len(runs) else [math.nan] * len(runs))
  if primary not in family:
    return {}
  tested = stats.compare_named(family, primary)
  return {k: {name: c.to_json() for name, c in v.items()} for k, v in tested.items()}


def tune_lrs(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """Per arm kind, the LR among study.lr_candidates whose run (first seed, evaluated on the
  tuning split) scores best at its end: a single-task or masked-joint run by its task's score,
  the joint run by the mean over tasks of (score - floor) / (ceiling - floor) on the tuning
  split. Returns {"chosen": {arm: lr}, "scores": {arm: {lr: score}}}."""
  st = base.study
  tasks = list(base.data.tasks)
  tuning = base.replace(**{"study.split": "tuning"})
  bounds = floors.describe(tuning.replace(**arms.split_settings(tuning)))
  metrics = {t: arms.metric_for(base, t) for t in tasks}
  seed = st.seeds[0]
  scores: dict[str, dict[str, float]] = {}
  for lr in st.lr_candidates:
    plan = _plan(tuning.replace(**{"optimizer.lr": float(lr)}), seed)
    for name, cfg in plan.items():
      d = arms.run(root / "lr_tuning" / f"lr{lr:g}", name, cfg, train_fn)
      final = {t: _last(_clean(arms.eval_series(d, t, metrics[t]))) for t in tasks}
      score = (floors.mean_normalized(final, bounds) if name == "multi"
               else final[name.split("_", 1)[1]])
      scores.setdefault(name, {})[f"{lr:g}"] = score
  chosen = {name: float(max(v, key=lambda k: -math.inf if math.isnan(v[k]) else v[k]))
            for name, v in scores.items()}
  return {"chosen": chosen, "scores": scores, "seed": seed}


def temperature_mixture(shares: Mapping[str, float], temperature: float) -> dict[str, float]:
  """Sampling rates proportional to share ** (-1 / T), normalized to sum 1: T = 1 makes every
  task's expected loss tokens equal (rates inversely proportional to its tokens per example)."""
  raw = {t: float(v) ** (-1.0 / float(temperature)) for t, v in shares.items()}
  total = sum(raw.values())
  return {t: v / total for t, v in raw.items()}


def tune_mixture(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """The joint run's mixture among the uniform one and `temperature_mixture` at each of
  study.mixture_temperatures, by the tuning-split mean over tasks of (score - floor) / (ceiling -
  floor) of a first-seed joint run each. Returns {"chosen", "rates", "scores", "shares", "seed"}."""
  st = base.study
  tasks = list(base.data.tasks)
  tuning = base.replace(**{"study.split": "tuning"})
  bounds = floors.describe(tuning.replace(**arms.split_settings(tuning)))
  metrics = {t: arms.metric_for(base, t) for t in tasks}
  seed, steps = st.seeds[0], st.steps_per_task * len(tasks)
  uniform = arms.configure(base, tasks=tasks, steps=steps, seed=seed, eval_every=st.eval_every)
  shares = mx.loss_token_shares(arms.loss_tokens_by_task(uniform, steps))
  candidates = {"uniform": {t: 1.0 / len(tasks) for t in tasks}}
  candidates.update({f"T={float(T):g}": temperature_mixture(shares, T)
                     for T in st.mixture_temperatures})
  scores = {}
  for name, rates in candidates.items():
    cfg = arms.configure(tuning, tasks=tasks, steps=steps, seed=seed, eval_every=st.eval_every,
                         mixture=rates)
    d = arms.run(root / "mixture_tuning", name.replace("=", ""), cfg, train_fn)
    scores[name] = floors.mean_normalized(
        {t: _last(_clean(arms.eval_series(d, t, metrics[t]))) for t in tasks}, bounds)
  chosen = max(scores, key=lambda k: -math.inf if math.isnan(scores[k]) else scores[k])
  return {"chosen": chosen, "rates": candidates[chosen], "scores": scores,
          "candidates": candidates, "shares": shares, "seed": seed}


def mixture_test(per_seed: Sequence[Mapping[str, Any]]) -> stats.Comparison | None:
  """log(tuned-mixture ratio) - log(uniform ratio), paired by seed, two-sided sign flips; a seed
  where either ratio is censored (no point value) enters as 0 (its sign is unknown)."""
  if not per_seed or not all("ratio_tuned" in s for s in per_seed):
    return None
  diffs = [math.log(s["ratio_tuned"] / s["ratio"]) if _positive(s["ratio_tuned"])
           and _positive(s["ratio"]) else 0.0 for s in per_seed]
  return stats.compare({"tuned-uniform": diffs}, primary=False)["tuned-uniform"]


def _plan(base: Config, seed: int, lrs: Mapping[str, float] | None = None,
          mixture: Mapping[str, float] | None = None) -> dict[str, Config]:
  """Every arm of one seed: single-task runs, the joint run and (study.masked_joint) the
  masked-joint runs, at the base's LR or the arm's tuned one (`lrs`)."""
  st = base.study
  tasks = list(base.data.tasks)
  def lr(name: str) -> dict[str, Any]:
    return {"optimizer.lr": float(lrs[name])} if lrs and name in lrs else {}

  plan = {f"single_{t}": arms.configure(base, tasks=[t], steps=st.steps_per_task, seed=seed,
                                        eval_every=st.eval_every, **lr(f"single_{t}"))
          for t in tasks}
  plan["multi"] = arms.configure(base, tasks=tasks, steps=st.steps_per_task * len(tasks),
                                 seed=seed, eval_every=st.eval_every, **lr("multi"))
  if st.masked_joint:  # the joint run's batches, only t's loss on: t's masked-joint reference
    for t in tasks:
      masked: dict[str, Any] = {"train.loss_weights": {
          u: (float(base.train.loss_weights.get(u, 1.0)) if u == t else 0.0) for u in tasks}}
      plan[f"masked_{t}"] = arms.configure(base, tasks=tasks, steps=st.steps_per_task * len(tasks),
                                           seed=seed, eval_every=st.eval_every, **masked,
                                           **lr(f"masked_{t}"))
  if mixture is not None:  # the joint run at the tuned mixture (the same steps and batch shape)
    plan["multi_tuned"] = arms.configure(base, tasks=tasks, steps=st.steps_per_task * len(tasks),
                                         seed=seed, eval_every=st.eval_every, mixture=mixture,
                                         **lr("multi"))
  return plan


def _summarize_one(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """One model size: every arm of every seed (LRs tuned first with study.lr_candidates)."""
  st = base.study
  tuned = tune_lrs(base, root, train_fn) if st.lr_candidates else None
  mixing = tune_mixture(base, root, train_fn) if st.mixture_temperatures else None
  tasks = list(base.data.tasks)
  goal = {t: float(st.targets.get(t, st.target)) for t in tasks}
  metrics = {t: arms.metric_for(base, t) for t in tasks}  # open-ended tasks: e.g. their verifier
  tps = tokens_per_step(base)
  per_seed = []
  notes: dict[str, str] = {}  # arm -> its LR schedule, as it ran (config.json)
  for seed in st.seeds:
    seed_dir = root / f"seed{seed}"
    plan = _plan(base, seed, tuned["chosen"] if tuned else None,
                 mixing["rates"] if mixing else None)
    for name, cfg in plan.items():
      notes[name] = arms.stored_lr_note(arms.run(seed_dir, name, cfg, train_fn))
    tokens = lambda curve: [(s * tps, v) for s, v in _clean(curve)]
    single_curves = {t: tokens(arms.eval_series(seed_dir / f"single_{t}", t, metrics[t]))
                     for t in tasks}
    multi_curves = {t: tokens(arms.eval_series(seed_dir / "multi", t, metrics[t])) for t in tasks}
    single = {t: crossing(single_curves[t], goal[t]) for t in tasks}
    multi = {t: crossing(multi_curves[t], goal[t]) for t in tasks}
    point, low, high = efficiency_ratio(single, multi, single_budget=st.steps_per_task * tps,
                                        multi_budget=st.steps_per_task * len(tasks) * tps)
    found = [c for c in multi.values() if c is not None]
    masked_curves = ({t: tokens(arms.eval_series(seed_dir / f"masked_{t}", t, metrics[t]))
                      for t in tasks} if st.masked_joint else {})
    transfer = _transfer(plan, tasks, single, single_curves, multi_curves, masked_curves, tps)
    if mixing:  # the tuned mixture's joint run: its ratio and that ratio's no-transfer value
      tuned_curves = {t: tokens(arms.eval_series(seed_dir / "multi_tuned", t, metrics[t]))
                      for t in tasks}
      tuned_multi = {t: crossing(tuned_curves[t], goal[t]) for t in tasks}
      t_point, t_low, t_high = efficiency_ratio(
          single, tuned_multi, single_budget=st.steps_per_task * tps,
          multi_budget=st.steps_per_task * len(tasks) * tps)
      tuned_plan = {**plan, "multi": plan["multi_tuned"]}
      tuned_null = _transfer(tuned_plan, tasks, single, single_curves, tuned_curves, {},
                             tps)["ratio_null"]
      transfer.update(ratio_tuned=_finite(t_point),
                      ratio_tuned_interval=[_finite(t_low), _finite(t_high)],
                      ratio_null_tuned=tuned_null,
                      multi_tuned_final={t: _last(tuned_curves[t]) for t in tasks})
    per_seed.append({
        "seed": seed,
        "single_tokens_to_target": {t: None if c is None else c.at for t, c in single.items()},
        "multi_tokens_to_target": {t: None if c is None else c.at for t, c in multi.items()},
        "single_crossing": {t: None if c is None else c.to_json() for t, c in single.items()},
        "multi_crossing": {t: None if c is None else c.to_json() for t, c in multi.items()},
        "multi_tokens_all_reached": max(c.at for c in found) if len(found) == len(tasks) else None,
        "single_final": {t: _last(single_curves[t]) for t in tasks},
        "multi_final": {t: _last(multi_curves[t]) for t in tasks},
        "ratio": _finite(point),
        "ratio_interval": [_finite(low), _finite(high)],
        **transfer,
        "single_curves": single_curves,
        "multi_curves": multi_curves,
        **({"masked_curves": masked_curves} if masked_curves else {}),
    })
  decided, why = verdict(*_seed_ratios(per_seed))
  # The primary comparison, per task: log M against the masked-joint reference (transfer from the
  # other tasks' losses) over seeds, sign-flip tested, Holm-corrected across the tasks; against
  # the single-task run: exploratory (it also counts the joint run's update schedule).
  tests = {}
  named = STUDY.primary(base) if st.masked_joint else "multiplier_vs_single"
  for key in COMPARISONS:
    primary = key == named
    if not all(key in s for s in per_seed):
      continue
    logs = {t: [math.log(s[key][t]["value"]) for s in per_seed if _positive(s[key][t]["value"])]
            for t in tasks}
    tested = stats.compare({t: v for t, v in logs.items() if len(v) == len(per_seed)},
                           primary=primary)
    tests[key] = {t: c.to_json() for t, c in tested.items()}
  return {
      "tasks": tasks, "seeds": list(st.seeds), "metric": st.metric, "metrics": metrics,
      "target": st.target, "targets": goal,
      # Each task's floor (trivial baselines) and ceiling (best achievable) under its metric.
      "steps_per_task": st.steps_per_task, "tokens_per_step": tps,
      "eval_every": st.eval_every, "eval_schedule": st.eval_schedule,
      "lr_schedule": st.lr_schedule, "lr_decay_steps": st.lr_decay_steps,
      "schedule": arms.schedule_note(notes), "min_seeds": MIN_SEEDS,
      "per_seed": per_seed, "ratios": [s["ratio"] for s in per_seed],
      "ratio_intervals": [s["ratio_interval"] for s in per_seed],
      "verdict": decided, "verdict_reason": why,
      "ratio_nulls": [s["ratio_null"] for s in per_seed],
      "num_scored": {t: int(base.eval.num_generate if metrics[t] == "accuracy"
                            else base.eval.num_examples) for t in tasks},
      "d_model": base.model.d_model,
      **({"lr_tuning": tuned} if tuned else {}),
      **({"mixture_tuning": mixing} if mixing else {}),
      "multiplier_tests": tests,
  }


def _positive(x: float | None) -> bool:
  return x is not None and math.isfinite(x) and x > 0


def _transfer(plan: Mapping[str, Config], tasks: Sequence[str], single: Mapping[str, Any],
              single_curves: Mapping[str, list], multi_curves: Mapping[str, list],
              masked_curves: Mapping[str, list], tps: int) -> dict[str, Any]:
  """The joint run's measured loss-token shares, the ratio's no-transfer value for them, and each
  task's effective-data multiplier at the joint run's last eval against its single-task run and
  (when run) its masked-joint run (experiments/multiplier.py: x axes in the task's own loss
  tokens; the masked-joint run has the joint run's batches, so the same scale)."""
  multi_cfg = plan["multi"]
  multi_steps = multi_cfg.train.steps
  by_task = arms.loss_tokens_by_task(multi_cfg, multi_steps)
  shares = mx.loss_token_shares(by_task)
  joint_per_step = sum(by_task.values()) / max(1, multi_steps)
  single_per_step = {t: arms.loss_tokens_per_step(plan[f"single_{t}"], plan[f"single_{t}"].train.steps)
                     for t in tasks}
  density = {t: single_per_step[t] / joint_per_step for t in tasks}
  s_tokens = {t: math.inf if single[t] is None else single[t].at for t in tasks}
  null = mx.ratio_null(s_tokens, shares, density)
  multipliers = {}
  for t in tasks:
    reference = [(x / tps * single_per_step[t], v) for x, v in single_curves[t]]
    joint = [(x / tps * joint_per_step * shares[t], v) for x, v in multi_curves[t]]
    last = mx.curve(mx.Reference.from_curve(reference), joint[-1:]) if reference and joint else []
    multipliers[t] = (last[0].to_json() if last else
                      {"tokens": None, "score": None, "value": None, "kind": mx.EXACT})
  out = {"loss_token_shares": shares, "loss_density": density,
         "ratio_null": None if math.isnan(null) else null, "multiplier_vs_single": multipliers}
  if masked_curves:
    masked = {}
    for t in tasks:
      scale = joint_per_step * shares[t] / tps  # t's loss tokens per token of the joint run
      reference = [(x * scale, v) for x, v in masked_curves[t]]  # the joint run's batches
      joint = [(x * scale, v) for x, v in multi_curves[t]]
      last = (mx.curve(mx.Reference.from_curve(reference), joint[-1:])
              if reference and joint else [])
      masked[t] = (last[0].to_json() if last else
                   {"tokens": None, "score": None, "value": None, "kind": mx.EXACT})
    out["multiplier_vs_masked"] = masked
  return out


def _last(curve: Sequence[tuple[float, float]]) -> float:
  return curve[-1][1] if curve else math.nan


def _finite(x: float) -> float | None:
  return None if math.isnan(x) else x


def _nan(x: float | None) -> float:
  return math.nan if x is None else x


def _record(config: Config) -> dict[str, Any]:
  """The study settings study.json repeats at its top level (this study once took them as
  arguments; `mtjax report` lets them win over config.study)."""
  st = config.study
  return {"steps_per_task": st.steps_per_task, "seeds": list(st.seeds), "eval_every": st.eval_every,
          "target": st.target, "metric": st.metric, "targets": dict(st.targets)}


# ---------------------------------------------------------------- the report

def _fmt_tokens(values: list[float | None], budget: float) -> str:
  """Mean ± std over seeds; a seed that never reached the target enters at the run's budget (it
  would reach it later or never), so the mean becomes a lower bound: never dropped, which would
  flatter the arm whose runs fail."""
  reached = [v for v in values if v is not None]
  missing = len(values) - len(reached)
  if not reached:
    return f"not reached (> {budget:,.0f})"
  if not missing:
    return f"{np.mean(reached):,.0f} ± {np.std(reached):,.0f}"
  bound = np.mean([budget if v is None else v for v in values])
  return f"≥ {bound:,.0f} ({missing} of {len(values)} seed(s) censored at the budget {budget:,.0f})"


def _fmt_crossing(c: Mapping[str, float] | None) -> str:
  if c is None:
    return "not reached"
  return f"{c['at']:,.0f} [{c['low']:,.0f}, {c['high']:,.0f}]"


def _fmt_bound(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def _fmt_ratio(x: float | None) -> str:
  return "n/a" if x is None else "∞" if math.isinf(x) else f"{x:.3f}"


def _describe_sizes(summary: dict[str, Any], root: Any) -> report.Report:
  """The size sub-study: per size and task, the multipliers and their tests (Holm across tasks x
  sizes), the ratio against its no-transfer value; then each size's own report."""
  doc = report.Report("Efficiency study across model sizes")
  tasks, sizes = summary["tasks"], summary["model_sizes"]
  tests = summary.get("size_tests") or {}
  primary = next((k for k, v in tests.items() if any(c["primary"] for c in v.values())), "")
  n = len(summary["seeds"])
  doc.text(f"**What this run shows.** Per task and model size (d_model {', '.join(map(str, sizes))}"
           f"; mlp 4 x d_model), the effective-data multiplier M at the joint run's last eval and "
           f"its sign-flip test over {n} seeds, Holm-corrected across tasks x sizes (primary: "
           f"`{primary}`; the other reference exploratory). **What it cannot show**: sizes "
           "outside this range, or training budgets other than this one (the same steps at every "
           "size: larger models are further from convergence).")
  rows = []
  for d in sizes:
    sub = summary["by_size"][str(d)]
    for t in tasks:
      cells = [str(d), t]
      for key in COMPARISONS:
        vals = [r[key][t]["value"] for r in sub["per_seed"] if key in r]
        c = tests.get(key, {}).get(f"{t} @ d{d}")
        cells.append("n/a" if not vals or c is None else
                     f"{_geo([v for v in vals if v is not None]):.2f}: " + stats.Comparison(
                         c["name"], tuple(c["diffs"]), c["p"], c["p_holm"], c["detectable"],
                         c["primary"]).sentence("M above 1", "M below 1"))
      rows.append(cells)
  doc.table(["d_model", "task", *[f"M {k.replace('multiplier_', '')} (geometric mean: test)"
                                  for k in COMPARISONS]], rows)
  doc.text("Was the mixture the bottleneck? Per size, the whole-run ratio against its "
           "no-transfer value for the mixture used (the ratio's null, not 1):")
  doc.bullets([f"d_model {d}: {summary['by_size'][str(d)]['verdict']} "
               f"({summary['by_size'][str(d)]['verdict_reason']})" for d in sizes])
  for d in sizes:
    sub = describe(summary["by_size"][str(d)], epath.Path(root or ".") / f"d_model{d}")
    doc.heading(f"d_model {d}")
    for block in sub.blocks:  # each size's plots are left out (one report, one set of files)
      if block.kind == "heading":
        doc.blocks.append(dataclasses.replace(block, lines=("#" + block.lines[0],)))
      elif block.kind == "verdict":
        doc.blocks.append(dataclasses.replace(block, kind="text"))
      elif block.kind != "figure":
        doc.blocks.append(block)
  return doc


def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  if "by_size" in summary:
    return _describe_sizes(summary, root)
  tasks, runs = summary["tasks"], summary["per_seed"]
  evals = (f"every {summary['eval_every']} steps"
           + (" and at steps 1, 2, 4, 8, ... (log-spaced: dense early)"
              if summary["eval_schedule"] == "log" else "") + ", and at each arm's end")
  doc = report.Report("Efficiency study: multi-task vs task-specific")
  if "multiplier_tests" in summary:
    doc.text(_plainly(summary))
  doc.text(
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Each single-task run: "
      f"{summary['steps_per_task']} steps; the multi-task run: {summary['steps_per_task'] * len(tasks)} "
      f"steps (the same total compute); {summary['tokens_per_step']:,} tokens per step. Score: "
      f"held-out eval `{summary['metric']}` (per task in the table) {evals}; target per task in the table. "
      f"{summary['schedule']}")
  doc.text("Tokens to target: where the eval curve first crosses the target, interpolated linearly "
           "between the last eval below it and the first at or above it (mean ± std over seeds; a "
           "seed that never reached it enters at the run's budget, making the mean a lower bound).")
  doc.text("Floor: the best trivial baseline on the evaluated held-out examples ("
           + ("the family listed at the end: frequency rules, other tasks' rules, n-grams, a frame"
              if any((summary.get("floors") or {}).get(t, {}).get("baselines") for t in tasks)
              else "most frequent training tokens or answer")
           + "); ceiling: the best achievable score (1 where the target is a function of the "
           "prompt; the Bayes-optimal one for generated open-ended tasks; - unknown).")
  metrics = summary.get("metrics") or {t: summary["metric"] for t in tasks}
  bounds = summary.get("floors") or {}
  single_budget = summary["steps_per_task"] * summary["tokens_per_step"]
  doc.table(["task", "metric", "floor", "target", "ceiling", "single: tokens to target",
             "multi: tokens to target", "single: final", "multi: final"],
            [[t, metrics[t], _fmt_bound(bounds.get(t, {}).get("floor")), str(summary["targets"][t]),
              _fmt_bound(bounds.get(t, {}).get("ceiling")),
              _fmt_tokens([r["single_tokens_to_target"][t] for r in runs], single_budget),
              _fmt_tokens([r["multi_tokens_to_target"][t] for r in runs], single_budget * len(tasks)),
              report.mean_std([r["single_final"][t] for r in runs]),
              report.mean_std([r["multi_final"][t] for r in runs])] for t in tasks])
  doc.text("Crossings per seed: tokens at the interpolated crossing [last eval below, first eval at "
           "or above the target].")
  doc.table(["seed", "task", "single", "multi"],
            [[str(r["seed"]), t, _fmt_crossing(r["single_crossing"][t]),
              _fmt_crossing(r["multi_crossing"][t])] for r in runs for t in tasks])
  if "lr_tuning" in summary:
    tuned = summary["lr_tuning"]
    doc.text(f"LRs tuned per arm kind on the tuning split (seed {tuned['seed']}; single-task and "
             "masked-joint runs by their task's final score, the joint run by the mean over "
             "tasks of (score - floor) / (ceiling - floor)); chosen in bold:")
    lrs = sorted({lr for v in tuned["scores"].values() for lr in v}, key=float)
    doc.table(["arm", *[f"LR {lr}" for lr in lrs]],
              [[arm] + [("**" if float(lr) == tuned["chosen"][arm] else "")
                        + ("n/a" if v.get(lr) is None or math.isnan(v[lr]) else f"{v[lr]:.3f}")
                        + ("**" if float(lr) == tuned["chosen"][arm] else "") for lr in lrs]
               for arm, v in tuned["scores"].items()])
  if "multiplier_tests" in summary:
    _describe_transfer(doc, summary)
    _describe_curves(doc, summary, root)
  if "mixture_tuning" in summary:
    _describe_mixture(doc, summary)
  doc.text(
      "Efficiency ratio = (sum of single-task tokens to target) / (multi-task tokens until every "
      "task reached its target); its interval: from the most pessimistic crossings (single-task "
      "at the start of their intervals, multi-task at the end) to the most optimistic. A target "
      "a run never reached is censored at that run's budget: it would be reached later or never, "
      "so the ratio has no point value and one end of its interval is unbounded (∞ or 0).")
  rows = []
  nulls = "ratio_nulls" in summary
  for r in runs:
    low, high = r["ratio_interval"]
    rows.append([str(r["seed"]), _fmt_ratio(r["ratio"]),
                 "n/a" if low is None else f"[{_fmt_ratio(low)}, {_fmt_ratio(high)}"
                 + (")" if high is not None and math.isinf(high) else "]")]
                + ([_fmt_ratio(r["ratio_null"])] if nulls else []))
  if nulls:
    doc.text("No-transfer value: what the ratio would be if each task learned in the joint run "
             "exactly as alone, per token of its own (sum of single-task tokens to target / the "
             "largest of single-task tokens x loss-token density / the task's measured share of "
             "the joint run's loss tokens): the ratio's null for the mixture actually used, not 1. "
             "n/a where a single-task run never reached its target.")
  doc.table(["seed", "ratio", "interval"] + (["no-transfer value"] if nulls else []), rows)
  if nulls:  # the verdict again from the stored ratios (the rule of this version)
    decided, why = verdict(*_seed_ratios(runs))
    doc.verdict(
        f"**Verdict: {decided}** ({why}; more / less efficient: the ratio above / below its "
        "no-transfer value for this mixture, paired over seeds by an exact two-sided sign-flip "
        "test of log(ratio / no-transfer value), p < 0.05; otherwise inconclusive).")
  else:
    doc.verdict(f"**Verdict: {summary['verdict']}** ({summary['verdict_reason']}).")
  doc.figure("efficiency_curves.png", lambda: _figure(summary), alt="eval curves")
  return doc


def _plainly(summary: dict[str, Any]) -> str:
  """The report's first paragraph: what the run shows and what it cannot, with its power."""
  n = len(summary["per_seed"])
  primary = summary["multiplier_tests"].get("multiplier_vs_masked", {})
  called = [f"{t} (M {'above' if c['mean'] > 0 else 'below'} 1, Holm p = {c['p_holm']:.3g})"
            for t, c in primary.items() if c["p_holm"] < stats.ALPHA]
  rest = len(primary) - len(called)
  shown = ("Primary result: transfer from the other tasks (effective-data multiplier against "
           "the masked-joint run) differs from none for " + ", ".join(called)
           + ("; for the other tasks no detectable difference at this power." if rest else ".")
           if called else
           "Primary result: no task's transfer from the other tasks (effective-data multiplier "
           "against the masked-joint run) is detectably different from none at this power.")
  if not primary:
    shown = "No masked-joint runs: transfer is measured against single-task runs only (exploratory)."
  return (f"**What this run shows.** {shown} Power: {n} seeds, so the smallest two-sided "
          f"sign-flip p is {stats.smallest_p(n, 'two-sided'):.3g} before correcting across "
          f"{len(summary['tasks'])} tasks. **What it cannot show**: anything about larger models, "
          "longer training or other tasks (one model size, these tasks, this budget); the "
          "efficiency ratio is compared with its no-transfer value for this mixture (below), not "
          "with 1; tasks whose targets no run reaches leave the ratio censored.")


def _describe_transfer(doc: report.Report, summary: dict[str, Any]) -> None:
  tasks, runs = summary["tasks"], summary["per_seed"]
  masked = all("multiplier_vs_masked" in r for r in runs)
  doc.text("Transfer per task: the effective-data multiplier M at the joint run's last eval: the "
           "task's loss tokens a reference run needed to score what the joint model scores (its "
           "curve made monotone and inverted), over the task's loss tokens in the joint run. "
           "M = 1: no transfer; > 1: the joint run's score is worth more of the task's data than "
           "it saw; >= / <=: the joint score lies outside the reference curve (a bound). "
           + ("Against the masked-joint run (the joint run's batches with only this task's loss "
              "on: the same updates of the task, minus the other tasks' gradients) M is transfer "
              "from the other tasks. " if masked else "")
           + "Against the single-task run M also counts the joint run's more, smaller updates of "
           "the task (its share of each batch over more steps): what a practitioner choosing "
           "between one joint run and one run per task gets, not transfer alone. Shares: each "
           "task's measured share of the joint run's loss tokens.")
  header = ["seed"] + ([f"{t}: M vs masked" for t in tasks] if masked else []) + \
      [f"{t}: M vs single" for t in tasks] + [f"{t}: share" for t in tasks]
  doc.table(header, [[str(r["seed"])]
                     + ([_fmt_multiplier(r["multiplier_vs_masked"][t]) for t in tasks]
                        if masked else [])
                     + [_fmt_multiplier(r["multiplier_vs_single"][t]) for t in tasks]
                     + [f"{r['loss_token_shares'][t]:.3f}" for t in tasks] for r in runs])
  doc.text("Tests, named before the run: per task, is log M different from 0 (paired over seeds: "
           "exact sign-flip test, Holm-corrected across the tasks; with n seeds the smallest "
           "two-sided p is 2 / 2^n, so 3 seeds can never reach 0.05). Primary: M against the "
           "masked-joint run; M against the single-task run is exploratory.")
  lines = []
  for key, label in (("multiplier_vs_masked", "vs masked-joint"),
                     ("multiplier_vs_single", "vs single-task")):
    tested = summary["multiplier_tests"].get(key)
    if tested is None:
      continue
    for t in tasks:
      if t not in tested:
        lines.append(f"{t}, {label}: not tested (a seed without a finite multiplier)")
        continue
      c = tested[t]
      comparison = stats.Comparison(c["name"], tuple(c["diffs"]), c["p"], c["p_holm"],
                                    c["detectable"], c["primary"])
      lines.append(f"{t}, {label}, log M: " + comparison.sentence("M above 1", "M below 1"))
  doc.bullets(lines)


def multiplier_curves(run: Mapping[str, Any], task: str) -> dict[str, list[mx.Multiplier]]:
  """M at every eval of one seed's joint run, against each reference run ("single", "masked")."""
  joint, refs = _on_task_tokens(run, task)
  return {k: mx.curve(ref, joint) for k, ref in refs.items()}


def _on_task_tokens(run: Mapping[str, Any], task: str
                    ) -> tuple[list[tuple[float, float]], dict[str, mx.Reference]]:
  """One seed's joint curve and its reference curves ("single", "masked") on one x axis, the
  task's loss tokens, from the stored curves: the scales (the task's loss tokens per token of
  each run) are those of the stored last-eval multiplier, so the last point of each M curve is
  that multiplier. ([], {}) without a last-eval multiplier."""
  last, multi = run["multiplier_vs_single"][task], run["multi_curves"][task]
  if not multi or last.get("tokens") is None:
    return [], {}
  per_token = last["tokens"] / multi[-1][0]  # the task's loss tokens per joint-run token
  share, density = run["loss_token_shares"][task], run["loss_density"][task]
  joint = [(x * per_token, v) for x, v in multi if x > 0]
  refs = {"single": [(x * density * per_token / share, v) for x, v in run["single_curves"][task]]}
  if "masked_curves" in run:
    refs["masked"] = [(x * per_token, v) for x, v in run["masked_curves"][task]]
  return joint, {k: mx.Reference.from_curve(ref) for k, ref in refs.items() if ref}


def _geo(values: Sequence[float]) -> float:
  v = [x for x in values if math.isfinite(x) and x > 0]
  return float(math.exp(np.mean(np.log(v)))) if v else math.nan


def num_scored(summary: Mapping[str, Any], root: Any) -> dict[str, int]:
  """Held-out examples scored per task: the summary's, else the record's config (study.json)."""
  if "num_scored" in summary:
    return dict(summary["num_scored"])
  try:
    import json
    cfg = json.loads((epath.Path(root) / "study.json").read_text())["config"]["eval"]
  except (OSError, ValueError, KeyError, TypeError):
    return {}
  metrics = summary.get("metrics") or {}
  return {t: int(cfg["num_generate" if metrics.get(t) == "accuracy" else "num_examples"])
          for t in summary["tasks"]}


def bootstrap_multipliers(summary: Mapping[str, Any], counts: Mapping[str, int], *,
                          resamples: int = 2000) -> dict[str, dict[str, tuple[float, float]]]:
  """95% intervals of the geometric-mean multiplier at the last eval, over seeds AND held-out
  examples: seeds drawn with replacement; within each, the joint score redrawn as the mean of n
  examples (Binomial(n, s) / n: exact for per-example 0/1 scores, and the largest variance any
  n scores in [0, 1] with mean s can have, so conservative for token accuracy), then the
  reference curve inverted. reference -> task -> (low, high)."""
  out: dict[str, dict[str, tuple[float, float]]] = {}
  runs = summary["per_seed"]
  for task in summary["tasks"]:
    n = counts.get(task)
    per_seed = [_on_task_tokens(r, task) for r in runs]
    for key in ("masked", "single"):
      if not n or not all(key in refs and any(not math.isnan(v) for _, v in joint)
                          for joint, refs in per_seed):
        continue
      refs = [refs[key] for _, refs in per_seed]
      points = [[(x, v) for x, v in joint if not math.isnan(v)][-1] for joint, _ in per_seed]

      def draw(rng: np.random.Generator, refs=refs, points=points, n=n) -> float:
        picks = rng.integers(0, len(points), size=len(points))
        return _geo([mx.multiplier(refs[i], points[i][0],
                                   rng.binomial(n, min(1.0, max(0.0, points[i][1]))) / n).value
                     for i in picks])

      out.setdefault(key, {})[task] = stats.bootstrap_interval(draw, resamples=resamples)
  return out


def _describe_mixture(doc: report.Report, summary: dict[str, Any]) -> None:
  m = summary["mixture_tuning"]
  runs = summary["per_seed"]
  doc.text("Was the mixture the bottleneck? A second joint run per seed at a mixture tuned on the "
           f"tuning split (seed {m['seed']}; candidates: uniform, and rates ∝ share ** (-1/T); "
           "mean normalized tuning-split score): "
           + ", ".join(f"{k} {v:.3f}" + (" (chosen)" if k == m["chosen"] else "")
                       for k, v in m["scores"].items())
           + ". Chosen rates: " + ", ".join(f"{t} {r:.3f}" for t, r in m["rates"].items()) + ".")
  doc.table(["seed", "ratio (uniform)", "no-transfer value", "ratio (tuned)",
             "no-transfer value (tuned)"],
            [[str(r["seed"]), _fmt_ratio(r["ratio"]), _fmt_ratio(r["ratio_null"]),
              _fmt_ratio(r["ratio_tuned"]), _fmt_ratio(r["ratio_null_tuned"])] for r in runs])
  c = mixture_test(runs)
  if c is not None:
    doc.text("Tuned vs uniform mixture, log ratio paired by seed (exploratory; a seed with a "
             "censored ratio enters as 0): "
             + c.sentence("the tuned mixture reached the targets with less compute",
                          "the tuned mixture needed more compute") + ".")


def _describe_curves(doc: report.Report, summary: dict[str, Any], root: Any) -> None:
  tasks, runs = summary["tasks"], summary["per_seed"]
  curves = {t: [multiplier_curves(r, t) for r in runs] for t in tasks}
  keys = [k for k in ("masked", "single") if all(k in c for t in tasks for c in curves[t])]
  if not keys:
    return
  steps = [x / summary["tokens_per_step"] for x, _ in runs[0]["multi_curves"][tasks[0]] if x > 0]
  doc.text("The multiplier as a curve: M at every eval of the joint run (geometric mean over "
           "seeds; bounds enter at their value), per reference; n/a where no seed's joint "
           "score is above 0 (M is not defined there). Early evals sit below the references' "
           "first evals more often (bounds).")
  header = ["joint step"] + [f"{t}: M vs {k}" for t in tasks for k in keys]
  rows = []
  for i, step in enumerate(steps):
    row = [f"{step:g}"]
    for t in tasks:
      for k in keys:
        geo = _geo([c[k][i].value for c in curves[t] if i < len(c[k])])
        row.append("n/a" if math.isnan(geo) else f"{geo:.2f}")
    rows.append(row)
  doc.table(header, rows)
  counts = num_scored(summary, root)
  intervals = bootstrap_multipliers(summary, counts)
  if intervals:
    doc.text("95% bootstrap intervals of the geometric-mean M at the last eval, over seeds AND "
             "held-out examples (seeds drawn with replacement; each drawn seed's joint score "
             "redrawn as the mean of its n scored examples, Binomial(n, s) / n: exact for "
             "0/1 scores, conservative for token accuracy; the reference curves are held fixed, "
             "so their eval noise is not in the interval): "
             + "; ".join(f"{t} vs {k} [{lo:.2f}, {hi:.2f}] (n = {counts[t]})"
                         for k, per in intervals.items() for t, (lo, hi) in per.items()) + ".")
  doc.figure("efficiency_multiplier.png", lambda: _multiplier_figure(summary, curves, keys),
             alt="the effective-data multiplier over the joint run")


def _multiplier_figure(summary: dict[str, Any], curves: Mapping[str, Any],
                       keys: Sequence[str]) -> Any:
  tasks = summary["tasks"]
  fig, axes = report.figure(1, len(tasks), figsize=(3.8 * len(tasks), 3.0), dpi=110,
                            squeeze=False)
  tps = summary["tokens_per_step"]
  for ax, t in zip(axes.flat, tasks):
    for j, k in enumerate(keys):
      xs = [x / tps for x, _ in summary["per_seed"][0]["multi_curves"][t] if x > 0]
      for c in curves[t]:
        ax.plot(xs[:len(c[k])], [m.value if m.value > 0 else math.nan for m in c[k]],
                color=f"C{j}", alpha=0.25, lw=0.8)  # M = 0 (a score of 0) has no log
      geo = [_geo([c[k][i].value for c in curves[t] if i < len(c[k])]) for i in range(len(xs))]
      ax.plot(xs, geo, color=f"C{j}", lw=2, label=f"vs {k}")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_title(t, fontsize=9)
    ax.set_xlabel("joint-run step")
    ax.set_ylabel("multiplier M")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  return fig


def _fmt_multiplier(m: Mapping[str, Any]) -> str:
  if m.get("value") is None:
    return "n/a"
  return mx.Multiplier(m["tokens"], m["score"], m["value"], m["kind"]).text()


def _figure(summary: dict[str, Any]) -> Any:
  tasks = summary["tasks"]
  cols = min(len(tasks), 4)
  rows = -(-len(tasks) // cols)
  fig, axes = report.figure(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    for run in summary["per_seed"]:
      for arm, style in (("single", "--"), ("multi", "-")):
        pts = run[f"{arm}_curves"][task]
        if pts:
          xs, ys = zip(*pts)
          ax.plot(xs, ys, style, color="C0" if arm == "single" else "C1", alpha=0.8,
                  label=arm if run is summary["per_seed"][0] else None)
    ax.axhline(summary["targets"][task], color="gray", linewidth=0.8)
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("tokens")
    ax.set_ylabel((summary.get("metrics") or {}).get(task, summary["metric"]))
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  return fig


# The comparisons: per task, log M against the masked-joint run (transfer from the other tasks'
# losses) and against the single-task run (also counts the joint run's update schedule).
COMPARISONS = ("multiplier_vs_masked", "multiplier_vs_single")


def _check(config: Config) -> None:
  st = config.study
  if STUDY.primary(config) == "multiplier_vs_masked" and not st.masked_joint:
    raise BadInputError("study.primary", "multiplier_vs_masked needs the masked-joint runs "
                        "(study.masked_joint=True), or name multiplier_vs_single")
  heads = config.model.num_heads
  for d in st.model_sizes:
    if int(d) <= 0 or int(d) % heads:
      raise BadInputError("study.model_sizes", f"expected positive d_model values divisible by "
                          f"model.num_heads ({heads}), got {d}")
  if len(set(st.model_sizes)) != len(st.model_sizes):
    raise BadInputError("study.model_sizes", f"expected distinct sizes, got {list(st.model_sizes)}")
  if any(not float(T) > 0 for T in st.mixture_temperatures):
    raise BadInputError("study.mixture_temperatures",
                        f"expected positive temperatures, got {list(st.mixture_temperatures)}")
  if st.mixture_temperatures and not st.tuning_examples:
    raise BadInputError("study.mixture_temperatures", "the mixture is chosen on the tuning split: "
                        "set study.tuning_examples > 0")
  if any(not float(lr) > 0 for lr in st.lr_candidates):
    raise BadInputError("study.lr_candidates", f"expected positive LRs, got {list(st.lr_candidates)}")
  if st.lr_candidates and not st.tuning_examples:
    raise BadInputError("study.lr_candidates", "LRs are chosen on the tuning split: set "
                        "study.tuning_examples > 0")


STUDY = arms.Study(name="efficiency", help="multi-task vs task-specific at equal compute",
                   summarize=summarize, describe=describe, record=_record, check=_check,
                   comparisons=COMPARISONS, default_primary=COMPARISONS[0])


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
