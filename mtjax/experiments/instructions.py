"""Instruction ablation (Kung & Peng, 2023: do models really learn to follow instructions?).

Arms per seed, equal steps (study.steps_per_task x number of tasks), the same mixture:
  original  instructions as written
  empty     every task's instruction blanked (data.instructions.<task>="empty"), in training and eval
  wrong     every task gets another task's instruction ("wrong"), in training and eval
The study reports, per task, the held-out score of each arm and its difference to `original`.
"""

from __future__ import annotations

import json

from etils import epath

from mtjax.config import Config

ARMS = ("original", "empty", "wrong")


def run(base: Config, workdir: str, *, train_fn=None) -> dict:
  from mtjax import train
  from mtjax.experiments import arms, report
  train_fn = train_fn or train.run
  root = epath.Path(workdir)
  arms.write_study_json(root, "instructions", base)
  tasks = list(base.data.tasks)
  metric = base.study.metric
  steps = base.study.steps_per_task * len(tasks)
  per_seed = []
  for seed in base.study.seeds:
    result = {"seed": seed}
    for mode, name in zip(("keep", "empty", "wrong"), ARMS):
      cfg = arms.configure(base, seed=seed, steps=steps, eval_every=base.study.eval_every,
                           **{"data.instructions": {t: mode for t in tasks}})
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      result[name] = arms.final_eval(d, tasks, metric)
    per_seed.append(result)
  summary = {"tasks": tasks, "seeds": list(base.study.seeds), "metric": metric, "steps": steps,
             "per_seed": per_seed}
  (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  report.write_instructions_report(root, summary)
  return summary
