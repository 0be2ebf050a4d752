"""Decomposition study (Granite's claim): is function calling learned better as the mixture of
its granular subtasks plus the umbrella task than as the umbrella task alone, at equal tokens?

Arms per seed, both study.steps_per_task x (number of tasks) steps on the same batch shape:
  umbrella  only the umbrella task (fc_umbrella) is sampled
  granular  every task of data.tasks (the seven subtasks and the umbrella), equal weights
Both are scored on every subtask's held-out APIs: `accuracy` is the structural match of the
greedy completion (parsed calls compared as JSON, order-insensitive where the subtask allows),
`token_accuracy` the teacher-forced next-token accuracy on the target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report

METRICS = ("accuracy", "token_accuracy")


UMBRELLA = "fc_umbrella"


def check(base: Config) -> None:
  if UMBRELLA not in base.data.tasks:
    raise BadInputError("data.tasks",
                        f"the decomposition study needs the umbrella task {UMBRELLA!r}")


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  steps = base.study.steps_per_task * len(tasks)
  per_seed = []
  for seed in base.study.seeds:
    result: dict[str, Any] = {"seed": seed}
    for name, mixture in (("umbrella", {UMBRELLA: 1.0}), ("granular", {t: 1.0 for t in tasks})):
      cfg = arms.configure(base, seed=seed, steps=steps, eval_every=base.study.eval_every,
                           mixture=mixture)
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      result[name] = {m: arms.final_eval(d, tasks, m) for m in METRICS}
      result[name + "_curves"] = {t: arms.eval_series(d, t, "token_accuracy") for t in tasks}
    per_seed.append(result)
  return {"tasks": tasks, "umbrella": UMBRELLA, "seeds": list(base.study.seeds), "steps": steps,
          "per_seed": per_seed}


# ---------------------------------------------------------------- the report

def write_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  tasks, runs = summary["tasks"], summary["per_seed"]
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
  x = np.arange(len(tasks))
  for i, arm in enumerate(("umbrella", "granular")):
    ax.bar(x + (i - 0.5) * 0.4, [np.mean([r[arm]["token_accuracy"][t] for r in runs]) for t in tasks],
           0.4, label=arm)
  ax.set_xticks(x, [t.replace("fc_", "") for t in tasks], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out token accuracy")
  ax.legend(fontsize=8)
  plot = report.save_figure(fig, root / "decomposition.png")
  rows = []
  for t in tasks:
    cells = [t]
    for m in METRICS:
      u = [r["umbrella"][m][t] for r in runs]
      g = [r["granular"][m][t] for r in runs]
      cells += [report.mean_std(u), report.mean_std(g), f"{np.mean(g) - np.mean(u):+.3f}"]
    rows.append(cells)
  lines = [
      "# Decomposition study: umbrella task alone vs granular subtasks + umbrella",
      "",
      f"Seeds: {summary['seeds']}. Both arms train {summary['steps']} steps on the same batch shape "
      f"(equal tokens): `umbrella` samples only {summary['umbrella']}; `granular` samples all "
      f"{len(tasks)} tasks equally. Scored on held-out APIs (never seen in training): structural "
      "match of the greedy completion, and teacher-forced token accuracy.",
      "",
      *report.md_table(["subtask", "structural match: umbrella", "granular", "Δ",
                        "token acc: umbrella", "granular", "Δ"], rows),
      "",
      f"![decomposition]({plot.name})",
      "",
  ]
  return report.write_markdown(root, lines)


STUDY = arms.Study(
    name="decomposition", help="function calling: umbrella alone vs granular subtasks",
    summarize=summarize, report=write_report, check=check)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
