"""Decomposition study (Granite's claim): is function calling learned better as the mixture of
its granular subtasks plus the umbrella task than as the umbrella task alone, at equal tokens?

Arms per seed, on the same batch shape and matched on supervised (loss) tokens, not row slots:
  umbrella  only the umbrella task (fc_umbrella) is sampled, study.steps_per_task x (number of
            tasks) steps
  granular  every task of data.tasks (the seven subtasks and the umbrella), equal weights, for as
            many steps as give the umbrella arm's loss tokens (each arm's loss tokens per step
            measured on its first MATCH_BATCHES training batches as the loader builds them;
            the steps are rounded, so the totals agree within half a step's loss tokens plus the
            measurement's sampling error)
Arms of different lengths train at the same LR at the same step (arms.lr_settings).
Both are scored on every subtask's held-out APIs: `accuracy` is the structural match of the
greedy completion (parsed calls compared as JSON, order-insensitive where the subtask allows),
`token_accuracy` the teacher-forced next-token accuracy on the target.

Tests (granular minus umbrella, paired by seed, sign flips; stats.compare_named), named before the
run: `umbrella_task` (primary: Granite's claim is that the subtasks help function calling itself,
the umbrella task, on both metrics) and `subtasks` (exploratory: the umbrella arm never trains the
subtasks' output formats, so the granular arm is expected to win there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report, stats

METRICS = ("accuracy", "token_accuracy")
METRIC_NAMES = {"accuracy": "structural match", "token_accuracy": "token accuracy"}
COMPARISONS = ("umbrella_task", "subtasks")
DEFAULT_PRIMARY = "umbrella_task"


UMBRELLA = "fc_umbrella"


def check(base: Config) -> None:
  if UMBRELLA not in base.data.tasks:
    raise BadInputError("data.tasks",
                        f"the decomposition study needs the umbrella task {UMBRELLA!r}")


MATCH_BATCHES = 32  # training batches measured per arm for its loss tokens per step


def arm_configs(base: Config, seed: int) -> tuple[dict[str, Config], dict[str, float]]:
  """({arm: config}, {arm: measured loss tokens per step}): the granular arm's steps chosen so
  its loss tokens match the umbrella arm's (study.steps_per_task x number of tasks steps)."""
  tasks = base.data.tasks
  steps = base.study.steps_per_task * len(tasks)
  arm = lambda n, mixture: arms.configure(base, seed=seed, steps=n,
                                          eval_every=base.study.eval_every, mixture=mixture)
  granular_mixture = {t: 1.0 for t in tasks}
  umbrella = arm(steps, {UMBRELLA: 1.0})
  per_step = {name: arms.loss_tokens_per_step(cfg, min(steps, MATCH_BATCHES))
              for name, cfg in (("umbrella", umbrella), ("granular", arm(steps, granular_mixture)))}
  granular_steps = max(1, round(steps * per_step["umbrella"] / max(per_step["granular"], 1.0)))
  return {"umbrella": umbrella, "granular": arm(granular_steps, granular_mixture)}, per_step


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  per_seed = []
  notes: dict[str, str] = {}
  for seed in base.study.seeds:
    result: dict[str, Any] = {"seed": seed}
    configs, per_step = arm_configs(base, seed)
    for name, cfg in configs.items():
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      notes[name] = arms.stored_lr_note(d)
      result[name] = {m: arms.final_eval(d, tasks, m) for m in METRICS}
      result[name + "_curves"] = {t: arms.eval_series(d, t, "token_accuracy") for t in tasks}
    result["arm_steps"] = {n: c.train.steps for n, c in configs.items()}
    result["loss_tokens_per_step"] = per_step
    result["loss_tokens"] = {n: per_step[n] * c.train.steps for n, c in configs.items()}
    per_seed.append(result)
  return {"tasks": tasks, "umbrella": UMBRELLA, "seeds": list(base.study.seeds),
          "steps": base.study.steps_per_task * len(tasks), "per_seed": per_seed,
          "schedule": arms.schedule_note(notes)}


def tests(summary: Mapping[str, Any]) -> dict[str, dict[str, stats.Comparison]]:
  """{comparison: {"<task> <metric name>": its sign-flip test of granular minus umbrella}}."""
  runs = summary["per_seed"]

  def diffs(task: str, metric: str) -> list[float]:
    return [r["granular"][metric][task] - r["umbrella"][metric][task] for r in runs]

  families = {
      "umbrella_task": {f"{UMBRELLA} {METRIC_NAMES[m]}": diffs(UMBRELLA, m) for m in METRICS},
      "subtasks": {f"{t} {METRIC_NAMES[m]}": diffs(t, m) for t in summary["tasks"]
                   if t != UMBRELLA for m in METRICS}}
  return stats.compare_named(families, summary.get("primary", DEFAULT_PRIMARY))


# ---------------------------------------------------------------- the report

def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, runs = summary["tasks"], summary["per_seed"]
  rows = []
  for t in tasks:
    cells = [t, report.floor_of(summary, t)]
    for m in METRICS:
      u = [r["umbrella"][m][t] for r in runs]
      g = [r["granular"][m][t] for r in runs]
      cells += [report.mean_std(u), report.mean_std(g), f"{np.mean(g) - np.mean(u):+.3f}"]
    rows.append(cells)
  doc = report.Report("Decomposition study: umbrella task alone vs granular subtasks + umbrella")
  primary = summary.get("primary", DEFAULT_PRIMARY)
  tested = tests(summary)
  up, down = "granular higher", "umbrella higher"
  doc.text(stats.plainly(primary, {k: (c, c.sentence(up, down)) for k, c in tested[primary].items()},
                         cannot="Granite's setting (a pretrained LLM fine-tuned on real function-"
                         "calling data): this is a 0.4M-parameter model trained from scratch on "
                         "synthetic APIs; other budgets, sizes or mixtures."))
  doc.text(
      f"Seeds: {summary['seeds']}. `umbrella` samples only {summary['umbrella']} for "
      f"{summary['steps']} steps; `granular` samples all {len(tasks)} tasks equally, for as many "
      "steps as match the umbrella arm's supervised (loss) tokens, on the same batch shape: "
      + "; ".join(f"seed {r['seed']}: " + ", ".join(
          f"{n} {r['arm_steps'][n]} steps x {r['loss_tokens_per_step'][n]:,.0f} = "
          f"{r['loss_tokens'][n]:,.0f} loss tokens" for n in ("umbrella", "granular"))
          for r in runs if "arm_steps" in r)
      + f". {summary.get('schedule', '')} Scored on held-out APIs (never seen in training): "
      "structural match of the greedy completion, and teacher-forced token accuracy. Floor: "
      "the structural match of always answering the most frequent training answer.")
  doc.table(["subtask", "floor", "structural match: umbrella", "granular", "Δ",
             "token acc: umbrella", "granular", "Δ"], rows)
  doc.figure("decomposition.png", lambda: _figure(summary), alt="decomposition")
  doc.heading("Findings")
  doc.text(stats.method_note(primary, len(runs), len(tested[primary]), "keys (the umbrella task's "
                                                                       "two metrics)"))
  doc.table(["comparison", "granular - umbrella", "mean", "per seed", "verdict"],
            [[name, key, f"{c.mean:+.3f}", ", ".join(f"{d:+.3f}" for d in c.diffs),
              c.sentence(up, down)] for name, family in tested.items()
             for key, c in family.items()])
  return doc


def _figure(summary: dict[str, Any]) -> Any:
  tasks, runs = summary["tasks"], summary["per_seed"]
  fig, ax = report.figure(figsize=(7, 3.2), dpi=110)
  x = np.arange(len(tasks))
  for i, arm in enumerate(("umbrella", "granular")):
    ax.bar(x + (i - 0.5) * 0.4, [np.mean([r[arm]["token_accuracy"][t] for r in runs]) for t in tasks],
           0.4, label=arm)
  ax.set_xticks(x, [t.replace("fc_", "") for t in tasks], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out token accuracy")
  ax.legend(fontsize=8)
  return fig


STUDY = arms.Study(
    name="decomposition", help="function calling: umbrella alone vs granular subtasks",
    summarize=summarize, describe=describe, check=check,
    comparisons=COMPARISONS, default_primary=DEFAULT_PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
