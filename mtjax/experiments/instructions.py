"""Instruction ablation (Kung & Peng, 2023: do models really learn to follow instructions?).

Arms per seed, equal steps (study.steps_per_task x number of tasks), the same mixture:
  original  instructions as written
  empty     every task's instruction blanked (data.instructions.<task>="empty"), in training and eval
  wrong     every task gets another task's instruction ("wrong"), in training and eval
The study reports, per task, the held-out score of each arm and its difference to `original`.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from mtjax.config import Config
from mtjax.experiments import arms, report

ARMS = ("original", "empty", "wrong")


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  metric = base.study.metric
  steps = base.study.steps_per_task * len(tasks)
  per_seed = []
  for seed in base.study.seeds:
    result: dict[str, Any] = {"seed": seed}
    for mode, name in zip(("keep", "empty", "wrong"), ARMS):
      instructions: dict[str, Any] = {"data.instructions": {t: mode for t in tasks}}
      cfg = arms.configure(base, seed=seed, steps=steps, eval_every=base.study.eval_every,
                           **instructions)
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      result[name] = arms.final_eval(d, tasks, metric)
    per_seed.append(result)
  return {"tasks": tasks, "seeds": list(base.study.seeds), "metric": metric, "steps": steps,
          "per_seed": per_seed}


def write_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  tasks, runs, metric = summary["tasks"], summary["per_seed"], summary["metric"]
  rows = []
  for t in tasks:
    base = [r["original"][t] for r in runs]
    cells = [t, report.mean_std(base)]
    for arm in ARMS[1:]:
      vals = [r[arm][t] for r in runs]
      cells += [report.mean_std(vals), report.mean_std([v - b for v, b in zip(vals, base)])]
    rows.append(cells)
  lines = [
      "# Instruction ablation",
      "",
      f"Seeds: {summary['seeds']}. Each arm trains {summary['steps']} steps on the same mixture; the "
      "ablation applies in training and in evaluation. Score: held-out "
      f"`{metric}`. Δ = arm − original (per seed, then mean ± std).",
      "",
      *report.md_table(["task", "original", "empty", "Δ empty", "wrong", "Δ wrong"], rows),
      "",
  ]
  return report.write_markdown(root, lines)


STUDY = arms.Study(name="instructions", help="instruction ablation: original vs empty vs wrong",
                   summarize=summarize, report=write_report)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
