"""Does adaptive task weighting or online data mixing beat tuned static weights?

Every arm trains the same model on the same tasks for the same number of steps with the same
batch shape (equal tokens: study.steps_per_task x number of tasks steps of data.batch_size x
data.seq_len), the same LR schedule (arms.lr_settings) and the same seeds; arms differ only in how
the tasks' losses are weighted or how often each task is sampled:

  static        equal loss weights, equal sampling rates
  tuned_static  static loss weights (train.loss_weights) chosen by a small sweep: each of
                CANDIDATES trained once (the first seed) and scored on the TUNING split (the first
                study.tuning_examples held-out examples of each task); the best candidate then
                runs with every seed on the report split (the examples after them). When equal
                weights win, tuned_static IS static (its runs are static's).
  uncertainty, dwa, famo          train.weighting.method: loss-based, inside the step
  pcgrad, mgda, dbmtl             train.weighting.method: per-task gradients, inside the step
  odm           data.mixing.method=odm (an EXP3 bandit over tasks feeding the loader's rates)
  temperature   data.rates=examples_proportional at data.rate_temperature (the base config's;
                2 when it is 1); not run when every task has as many training examples as the
                others (its rates would be equal: the static arm again)

Score of a task: its held-out study metric (study.metric, or study.task_metrics.<task>) at the
arm's last step. Normalized score: (score - floor) / (ceiling - floor), with the floor (the best
trivial baseline) and ceiling (the best achievable score) of mtjax.experiments.floors on the
evaluated examples; an arm's mean normalized score per seed is the mean over tasks (tasks without
both bounds are left out and named). Against tuned static: per seed, the difference of mean
normalized scores (same seed: same initialization and, for arms that sample like static, the same
data order), its mean over seeds and a two-sided 95% Student-t interval of that mean
(descriptive). The test, named before the run (the primary comparison `methods-tuned_static`):
each method's paired differences by an exact sign-flip permutation test, Holm-corrected across
the methods; "beats tuned static" / "worse than tuned static" only with a corrected p < 0.05,
else "no detectable difference" with the smallest effect the design could detect. Step time: the median perf/step_time_s of an arm's logged
rows (every seed's), without each run's first row (it includes compilation) and last row (it
includes the final evaluation), relative to static's.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, floors, report, runs, stats
from mtjax.train import weighting as weighting_lib

MIN_SEEDS = 3  # recorded for older reports; the sign-flip test sets the power now
PRIMARY = "methods-tuned_static"  # the one comparison: every method against tuned static weights
# The adaptive methods, from their registration (mtjax.config.WEIGHTING_METHODS): an arm each.
GRADIENT_BASED = weighting_lib.names(weighting_lib.Need.GRADIENTS)
LOSS_BASED = tuple(m for m in weighting_lib.names() if m != "static" and m not in GRADIENT_BASED)
DATA_LEVEL = ("odm", "temperature")
ARMS = ("static", "tuned_static") + LOSS_BASED + GRADIENT_BASED + DATA_LEVEL
DEFAULT_TEMPERATURE = 2.0  # the temperature arm's, when the base config's data.rate_temperature is 1
# The tuned_static sweep: relative loss weights by kind of task (closed: one right answer;
# open-ended: many), normalized to mean 1 over the run's tasks (the objective's scale stays T).
CANDIDATES: dict[str, dict[str, float]] = {
    "equal": {"closed": 1.0, "open_ended": 1.0},
    "closed_x2": {"closed": 2.0, "open_ended": 1.0},
    "open_ended_x2": {"closed": 1.0, "open_ended": 2.0},
}
KIND = {"static": "baseline", "tuned_static": "baseline", **{m: "loss-based" for m in LOSS_BASED},
        **{m: "gradient-based" for m in GRADIENT_BASED}, "odm": "data mixing",
        "temperature": "data mixing"}


# ---------------------------------------------------------------- arithmetic

def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
  """(mean, sample std, low, high): a two-sided Student-t interval of the mean of paired
  differences (NaN bounds with fewer than two values)."""
  from scipy import stats
  d = np.asarray(diffs, np.float64)
  if len(d) == 0:
    return math.nan, math.nan, math.nan, math.nan
  mean = float(d.mean())
  if len(d) < 2:
    return mean, math.nan, math.nan, math.nan
  std = float(d.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * std / math.sqrt(len(d))
  return mean, std, mean - half, mean + half


def verdicts(family: Mapping[str, Sequence[float]]) -> dict[str, tuple[str, str]]:
  """method -> (verdict, why) against tuned static from its per-seed differences: sign-flip
  tests Holm-corrected across the methods (stats.compare_named)."""
  if not family:
    return {}
  tested = stats.compare_named({PRIMARY: family}, PRIMARY)[PRIMARY]
  out = {}
  for name, c in tested.items():
    direction = c.direction()
    decided = ("beats tuned static" if direction > 0 else "worse than tuned static"
               if direction < 0 else "no detectable difference")
    out[name] = (decided, c.sentence("higher than tuned static", "lower than tuned static"))
  return out


def verdict(diffs: Sequence[float]) -> tuple[str, str]:
  """(verdict, why) of one method alone (a family of one)."""
  return verdicts({"method": diffs})["method"]


def _method_diffs(per_seed: Sequence[Mapping[str, Any]], names: Sequence[str],
                  tuned_is_static: bool) -> dict[str, list[float]]:
  """The tested methods' per-seed differences of mean normalized score from tuned static."""
  return {name: [s["arms"][name]["mean_normalized"] - s["arms"]["tuned_static"]["mean_normalized"]
                 for s in per_seed]
          for name in names if name != "tuned_static" and not (name == "static" and tuned_is_static)}


def step_time(arm_dirs: Sequence[epath.Path]) -> float:
  """The median perf/step_time_s over the runs' logged rows, without each run's first row
  (compilation) and last row (the final evaluation) where a run has more than two."""
  times: list[float] = []
  for d in arm_dirs:
    rows = [float(r["perf/step_time_s"]) for r in runs.rows(d) if "perf/step_time_s" in r]
    times += rows[1:-1] if len(rows) > 2 else rows[1:] or rows
  return statistics.median(times) if times else math.nan


def candidate_weights(name: str, tasks: Sequence[str]) -> dict[str, float]:
  """CANDIDATES[name] as train.loss_weights for these tasks (mean 1)."""
  from mtjax import tasks as task_registry
  kind = CANDIDATES[name]
  raw = {t: kind["open_ended" if task_registry.get(t).open_ended else "closed"] for t in tasks}
  scale = len(raw) / sum(raw.values())
  return {t: w * scale for t, w in raw.items()}


def temperature_of(base: Config) -> float:
  t = base.data.rate_temperature
  return DEFAULT_TEMPERATURE if t == 1.0 else float(t)


def train_sizes(base: Config) -> dict[str, int]:
  """Each task's number of training examples (what examples-proportional rates count)."""
  from mtjax import tasks as task_registry
  return {t: len(task_registry.get(t).source.load("train", base.seed, base.data.on_bad_record).examples)
          for t in base.data.tasks}


# ---------------------------------------------------------------- the study

def _steps(base: Config) -> int:
  return base.study.steps_per_task * len(base.data.tasks)


def _arm(base: Config, seed: int, **dotted: Any) -> Config:
  """One arm: equal sampling weights, static equal loss weights unless `dotted` says otherwise."""
  tasks = base.data.tasks
  plain: dict[str, Any] = {"train.loss_weights": {}, "train.weighting.method": "static",
                           "data.mixing.method": "none", "data.rates": "explicit"}
  return arms.configure(base, seed=seed, steps=_steps(base), eval_every=base.study.eval_every,
                        mixture={t: 1.0 for t in tasks}, **{**plain, **dotted})


def arm_configs(base: Config, seed: int, tuned: Mapping[str, float] | None,
                run_temperature: bool) -> dict[str, Config]:
  """The arms of one seed (tuned_static: with the chosen weights; None: equal, i.e. static's)."""
  arm = functools.partial(_arm, base, seed)
  out = {"static": arm()}
  if tuned is not None:
    out["tuned_static"] = arm(**{"train.loss_weights": dict(tuned)})
  for method in LOSS_BASED + GRADIENT_BASED:
    out[method] = arm(**{"train.weighting.method": method})
  out["odm"] = arm(**{"data.mixing.method": "odm"})
  if run_temperature:
    out["temperature"] = arm(**{"data.rates": "examples_proportional",
                                "data.rate_temperature": temperature_of(base)})
  return out


def tuning_base(base: Config) -> Config:
  return base.replace(**{"study.split": "tuning"})


def _scores(arm_dir: epath.Path, tasks: Sequence[str], metrics: Mapping[str, str],
            step: int) -> dict[str, float]:
  return dict(zip(tasks, arms.eval_at(arm_dir, step, tasks, metrics)))


def _tune(base: Config, root: epath.Path, train_fn: arms.TrainFn, tasks: list[str],
          metrics: dict[str, str]) -> dict[str, Any]:
  """The tuned_static sweep: every candidate at the first seed, scored on the tuning split."""
  tb = tuning_base(base)
  bounds = floors.describe(tb.replace(**arms.split_settings(tb)))
  seed = base.study.seeds[0]
  rows = []
  for name in CANDIDATES:
    weights = candidate_weights(name, tasks)
    d = arms.run(root / f"tune_seed{seed}", name,
                 _arm(tb, seed, **{"train.loss_weights": weights}), train_fn)
    scores = _scores(d, tasks, metrics, _steps(base))
    rows.append({"candidate": name, "weights": weights, "scores": scores,
                 "mean_normalized": floors.mean_normalized(scores, bounds)})
  best = max(rows, key=lambda r: (_nan_low(r["mean_normalized"]), -rows.index(r)))
  return {"seed": seed, "split": "tuning", "examples": base.study.tuning_examples,
          "floors": bounds, "candidates": rows, "chosen": best["candidate"],
          "chosen_weights": best["weights"]}


def _nan_low(x: float) -> float:
  return -math.inf if math.isnan(x) else x


def _final_controls(arm_dir: epath.Path, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
  """The last logged train row's train/<task>/weight and data/<task>/rate."""
  rows = [r for r in runs.rows(arm_dir) if "train/loss" in r]
  last = rows[-1] if rows else {}
  return {key: {t: float(last[f"{prefix}/{t}/{key}"]) for t in tasks if f"{prefix}/{t}/{key}" in last}
          for prefix, key in (("train", "weight"), ("data", "rate"))}


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """Trains the sweep and every arm of every seed (skipping finished runs); the summary."""
  st = base.study
  tasks = list(base.data.tasks)
  metrics = {t: arms.metric_for(base, t) for t in tasks}
  steps = _steps(base)
  bounds = floors.describe(base.replace(**arms.split_settings(base)))  # the scored examples
  tuning = _tune(base, root, train_fn, tasks, metrics)
  chosen_equal = tuning["chosen"] == "equal"
  sizes = train_sizes(base)
  run_temperature = len(set(sizes.values())) > 1
  names = [a for a in ARMS if run_temperature or a != "temperature"]
  per_seed = []
  dirs: dict[str, list[epath.Path]] = {a: [] for a in names}
  notes: dict[str, str] = {}
  for seed in st.seeds:
    seed_dir = root / f"seed{seed}"
    plan = arm_configs(base, seed, None if chosen_equal else tuning["chosen_weights"],
                       run_temperature)
    ran = {name: arms.run(seed_dir, name, cfg, train_fn) for name, cfg in plan.items()}
    if chosen_equal:
      ran["tuned_static"] = ran["static"]  # equal weights won the sweep: the same runs
    result: dict[str, Any] = {"seed": seed, "arms": {}}
    for name in names:
      d = ran[name]
      dirs[name].append(d)
      notes[name] = arms.stored_lr_note(d)
      scores = _scores(d, tasks, metrics, steps)
      result["arms"][name] = {
          "scores": scores,
          "normalized": {t: floors.normalized(s, bounds[t]["floor"], bounds[t]["ceiling"])
                         for t, s in scores.items()},
          "mean_normalized": floors.mean_normalized(scores, bounds),
          "step_time_s": step_time([d]),
          "controls": _final_controls(d, tasks),
      }
    per_seed.append(result)
  return {
      "tasks": tasks, "seeds": list(st.seeds), "metric": st.metric, "metrics": metrics,
      "arms": names, "kinds": {a: KIND[a] for a in names},
      "steps": steps, "steps_per_task": st.steps_per_task,
      "batch_size": base.data.batch_size, "seq_len": base.data.seq_len,
      "tokens_per_step": base.data.batch_size * base.data.seq_len,
      "schedule": arms.schedule_note(notes), "min_seeds": MIN_SEEDS,
      "floors": bounds, "unbounded_tasks": [t for t in tasks if floors.normalized(
          0.0, bounds[t]["floor"], bounds[t]["ceiling"]) is None],
      "train_sizes": sizes, "temperature": temperature_of(base) if run_temperature else None,
      "tuning": tuning, "tuned_is_static": chosen_equal,
      "weighting": dict(base.to_dict()["train"]["weighting"]),
      "mixing": dict(base.to_dict()["data"]["mixing"]),
      "per_seed": per_seed,
      "findings": findings(per_seed, names, dirs, tuned_is_static=chosen_equal),
  }


def findings(per_seed: list[dict[str, Any]], names: Sequence[str],
             dirs: Mapping[str, Sequence[epath.Path]], *,
             tuned_is_static: bool = False) -> dict[str, dict[str, Any]]:
  """arm -> mean normalized score (mean, std over seeds), its paired difference from tuned
  static (mean, std, 95% interval, verdict), step time and its ratio to static's."""
  static_time = step_time(dirs["static"])
  tested = verdicts(_method_diffs(per_seed, names, tuned_is_static))
  out = {}
  for name in names:
    values = [s["arms"][name]["mean_normalized"] for s in per_seed]
    diffs = [s["arms"][name]["mean_normalized"] - s["arms"]["tuned_static"]["mean_normalized"]
             for s in per_seed]
    mean, std, low, high = t_interval(diffs)
    if name == "tuned_static":
      decided, why = "-", "the reference"
    elif name == "static" and tuned_is_static:
      decided, why = "= tuned static", "equal weights won the sweep: the same runs"
    else:
      decided, why = tested[name]
    arm_time = step_time(dirs[name])
    out[name] = {
        "mean_normalized": float(np.mean(values)), "std_normalized": float(np.std(values)),
        "diff_vs_tuned": mean, "diff_std": _finite(std), "diff_interval": [_finite(low), _finite(high)],
        "verdict": decided, "verdict_reason": why,
        "step_time_s": arm_time, "relative_step_time": arm_time / static_time,
    }
  return out


def _finite(x: float) -> float | None:
  return None if math.isnan(x) else x


def _check(config: Config) -> None:
  if config.study.tuning_examples <= 0:
    raise BadInputError("study.tuning_examples", "the weighting study tunes static loss weights "
                        "on a tuning split: expected a positive number of examples, got "
                        f"{config.study.tuning_examples}")


def _record(config: Config) -> dict[str, Any]:
  st = config.study
  return {"steps_per_task": st.steps_per_task, "seeds": list(st.seeds), "eval_every": st.eval_every,
          "metric": st.metric}


# ---------------------------------------------------------------- the report

def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _interval(f: Mapping[str, Any]) -> str:
  low, high = f["diff_interval"]
  if low is None:
    return "n/a"
  return f"[{low:+.3f}, {high:+.3f}]"


def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, names, f = summary["tasks"], summary["arms"], dict(summary["findings"])
  # The verdicts again from the stored per-seed scores (records from before the sign-flip test).
  for name, (decided, why) in verdicts(_method_diffs(summary["per_seed"], names,
                                                     summary["tuned_is_static"])).items():
    f[name] = {**f[name], "verdict": decided, "verdict_reason": why}
  tuning = summary["tuning"]
  metrics = summary["metrics"]
  metric_note = ", ".join(sorted({f"`{m}`" for m in metrics.values()}))
  bounds = summary["floors"]
  sizes = summary["train_sizes"]
  temp = summary["temperature"]
  doc = report.Report("Weighting study: adaptive task weighting and online data mixing vs tuned "
                      "static weights")
  family = _method_diffs(summary["per_seed"], names, summary["tuned_is_static"])
  if family:
    tested = stats.compare_named({PRIMARY: family}, PRIMARY)[PRIMARY]
    doc.text(stats.plainly(PRIMARY, {m: (c, f[m]["verdict_reason"]) for m, c in tested.items()},
                           cannot="which method does best at scale or with its own tuning (every "
                                  "method at its published defaults; a tiny model, 300 steps)."))
  doc.text(
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Every arm trains {summary['steps']} "
      f"steps of {summary['batch_size']} x {summary['seq_len']} tokens "
      f"({summary['tokens_per_step']:,} per step: the same tokens in every arm) from the same "
      f"initialization per seed. {summary['schedule']} Score: held-out {metric_note} at the last "
      "step, on the report split (the held-out examples after the tuning split). Normalized "
      "score: (score - floor) / (ceiling - floor) per task (floor: the best trivial baseline on "
      "the scored examples; ceiling: the best achievable score), averaged over tasks"
      + (f" (left out, no floor or ceiling: {', '.join(summary['unbounded_tasks'])})"
         if summary["unbounded_tasks"] else "") + "; mean ± std over seeds.")
  doc.text(
      "Δ vs tuned static: per seed, an arm's mean normalized score minus tuned static's (paired "
      "by seed), mean over seeds with its two-sided 95% Student-t interval (descriptive). "
      + stats.method_note(PRIMARY, len(summary["per_seed"]),
                          len([a for a in names if a not in ("tuned_static",) and not (
                              a == "static" and summary["tuned_is_static"])]), "methods")
      + " Step time: median "
      "`perf/step_time_s` of the logged rows (first row, with compilation, and last, with the "
      "final evaluation, left out), relative to static.")
  rows = []
  for a in names:
    r = f[a]
    same = a == "tuned_static" or (a == "static" and summary["tuned_is_static"])
    rows.append([a, summary["kinds"][a], f"{r['mean_normalized']:.3f} ± {r['std_normalized']:.3f}",
                 "reference" if a == "tuned_static" else "same runs" if same
                 else _fmt(r["diff_vs_tuned"], signed=True),
                 "-" if same else _interval(r), r["verdict"],
                 f"{1000 * r['step_time_s']:.1f}", f"{r['relative_step_time']:.2f}x"])
  doc.table(["arm", "kind", "mean normalized score", "Δ vs tuned static", "95% interval",
             "verdict", "step time (ms)", "vs static"], rows)
  doc.text("Tests: " + "; ".join(f"`{a}` {f[a]['verdict_reason']}" for a in names
                                 if f[a]["verdict"] not in ("-", "= tuned static")) + ".")
  beat = [a for a in names if f[a]["verdict"] == "beats tuned static"]
  worse = [a for a in names if f[a]["verdict"] == "worse than tuned static"]
  methods = [a for a in names if a not in ("static", "tuned_static")]
  failed = [a for a in names if f[a]["mean_normalized"] < 0]
  if failed:
    doc.text(f"**Did not learn: {', '.join(failed)}** (mean normalized score below 0: below "
             "the trivial baselines on average). Their differences from tuned static measure a "
             "failed run, not the method's merit: check the method's implementation and "
             "settings before reading them as a finding.")
  doc.heading("Tuned static weights")
  doc.text(
      f"Candidates (relative loss weights of closed tasks, one right answer, and open-ended ones, "
      f"normalized to mean 1), each trained once (seed {tuning['seed']}) and scored on the tuning "
      f"split (the first {tuning['examples']} held-out examples of each task; its own floors). "
      f"Chosen: **{tuning['chosen']}**"
      + (" (equal weights: tuned_static is the static arm's runs)." if summary["tuned_is_static"]
         else "."))
  doc.table(["candidate", "loss weights", "tuning-split mean normalized score"],
            [[c["candidate"], ", ".join(f"{t}: {w:.2f}" for t, w in c["weights"].items()),
              _fmt(c["mean_normalized"]) + (" (chosen)" if c["candidate"] == tuning["chosen"] else "")]
             for c in tuning["candidates"]])
  doc.heading("Final weights and rates")
  doc.text("The last logged row's `train/<task>/weight` (static x adaptive loss weight as applied) "
           "and `data/<task>/rate` (sampling rate), mean over seeds."
           + (f" Temperature arm: rates ∝ n ** (1 / {temp:g}) over training-set sizes "
              f"{', '.join(f'{t}: {n:,}' for t, n in sizes.items())}." if temp is not None else
              f" No temperature arm: every task has {next(iter(sizes.values())):,} training "
              "examples, so examples-proportional rates at any temperature are equal (the "
              "static arm again)."))
  crows = []
  for a in names:
    for key in ("weight", "rate"):
      vals = [s["arms"][a]["controls"].get(key, {}) for s in summary["per_seed"]]
      if all(t in v for v in vals for t in tasks):
        crows.append([a, key] + [f"{np.mean([v[t] for v in vals]):.3f}" for t in tasks])
  doc.table(["arm", "quantity", *tasks], crows)
  doc.heading("Per-task held-out scores")
  doc.text("Mean ± std over seeds at the last step; floor and ceiling on the scored examples.")
  trows = [["floor", *[report.floor_of(summary, t) for t in tasks]],
           ["ceiling", *[_fmt(bounds.get(t, {}).get("ceiling")) for t in tasks]]]
  for a in names:
    trows.append([a, *[report.mean_std([s["arms"][a]["scores"][t] for s in summary["per_seed"]])
                       for t in tasks]])
  doc.table(["arm", *[f"{t} ({metrics[t]})" for t in tasks]], trows)
  undecided = [a for a in methods if a not in beat + worse]
  doc.verdict(
      f"**Verdict: {', '.join(beat) + ' beat' if beat else 'no method is detectably better than'}"
      f" tuned static here**"
      f" ({len(summary['seeds'])} seeds; beats / worse: Holm-corrected sign-flip p < 0.05, the "
      "p-values are in the tests above"
      + (f"; worse than tuned static: {', '.join(worse)}" if worse else "")
      + (f"; no detectable difference at this power: {', '.join(undecided)}" if undecided else "")
      + ").")
  doc.figure("weighting.png", lambda: _figure(summary), alt="weighting")
  doc.heading("What this run does NOT show")
  caveats = [
      f"Anything at scale: a {summary['steps']}-step run of a tiny model on "
      f"{len(tasks)} synthetic tasks. Which method does best depends on the model, the budget and how "
      "much the tasks conflict; a method with no detectable difference here may help (or hurt) elsewhere.",
      "Tuned hyperparameters for the methods: each runs with the published defaults "
      "(train.weighting, data.mixing in study.json); only static weights were tuned, over "
      f"{len(tuning['candidates'])} candidates and one seed, so tuned static is a weak tuning "
      "baseline, not the best static weighting.",
      "Small differences: \"no detectable difference\" means the difference is within what this "
      "many seeds can resolve (the smallest detectable effect is in the tests), not that the "
      "methods are equal.",
      "Step time on a production accelerator, or small step-time differences: times are from "
      "this machine (CPU, other work running beside it: static's per-seed median step time "
      f"ranged {_time_range(summary, 'static')} here); per-task-gradient methods' cost grows with "
      "the number of tasks (`mtjax bench` measures the methods' overhead interleaved).",
      "Generation quality: scores are teacher-forced held-out metrics at the last step, not "
      "sampled outputs or the learning curve."]
  if temp is not None:
    caveats.append("A real temperature baseline: the tasks' sizes are set by their generators, so "
                   "the temperature arm only shifts rates toward the larger tasks; it says nothing "
                   "about natural data-size imbalance.")
  doc.bullets(caveats)
  return doc


def _time_range(summary: dict[str, Any], arm: str) -> str:
  times = [1000 * s["arms"][arm]["step_time_s"] for s in summary["per_seed"]]
  return f"{min(times):.1f}-{max(times):.1f} ms"


def _figure(summary: dict[str, Any]) -> Any:
  names, f = summary["arms"], summary["findings"]
  fig, axes = report.figure(1, 2, figsize=(11, 3.8), dpi=110, squeeze=False)
  ax, bx = axes[0, 0], axes[0, 1]
  xs = np.arange(len(names))
  colors = {"baseline": "C0", "loss-based": "C1", "gradient-based": "C2", "data mixing": "C3"}
  means = [f[a]["mean_normalized"] for a in names]
  stds = [f[a]["std_normalized"] for a in names]
  ax.bar(xs, means, yerr=stds, capsize=3, color=[colors[summary["kinds"][a]] for a in names],
         alpha=0.8)
  for i, a in enumerate(names):
    ax.plot([i] * len(summary["per_seed"]),
            [s["arms"][a]["mean_normalized"] for s in summary["per_seed"]], "k.", markersize=3)
  ax.axhline(f["tuned_static"]["mean_normalized"], color="gray", linewidth=0.8, linestyle="--",
             label="tuned static")
  ax.legend(fontsize=8, loc="lower left")
  ax.set_ylabel("mean normalized score (± std over seeds)")
  ax.set_xticks(xs, names, rotation=45, ha="right", fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  bx.bar(xs, [f[a]["relative_step_time"] for a in names],
         color=[colors[summary["kinds"][a]] for a in names], alpha=0.8)
  bx.axhline(1.0, color="gray", linewidth=0.8)
  bx.set_ylabel("step time relative to static")
  bx.set_xticks(xs, names, rotation=45, ha="right", fontsize=8)
  bx.grid(alpha=0.3, axis="y")
  return fig


STUDY = arms.Study(
    name="weighting",
    help="adaptive task weighting and online data mixing vs tuned static weights, at equal tokens",
    summarize=summarize, describe=describe, check=_check, record=_record,
    comparisons=(PRIMARY,), default_primary=PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
