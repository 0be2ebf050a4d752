"""Decomposition study (Granite's claim): is function calling learned better as the mixture of
its granular subtasks plus the umbrella task than as the umbrella task alone, at equal tokens?

Arms per seed, both study.steps_per_task x (number of tasks) steps on the same batch shape:
  umbrella  only the umbrella task (study.umbrella) is sampled
  granular  every task of data.tasks (the seven subtasks and the umbrella), equal weights
Both are scored on every subtask's held-out APIs: `accuracy` is the structural match of the
greedy completion (parsed calls compared as JSON, order-insensitive where the subtask allows),
`token_accuracy` the teacher-forced next-token accuracy on the target.
"""

from __future__ import annotations

import json

from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError

METRICS = ("accuracy", "token_accuracy")


def run(base: Config, workdir: str, *, umbrella: str = "fc_umbrella", train_fn=None) -> dict:
  from mtjax import train
  from mtjax.experiments import arms, report
  train_fn = train_fn or train.run
  tasks = list(base.data.tasks)
  if umbrella not in tasks:
    raise BadInputError("data.tasks", f"the decomposition study needs the umbrella task {umbrella!r}")
  root = epath.Path(workdir)
  arms.write_study_json(root, "decomposition", base)
  steps = base.study.steps_per_task * len(tasks)
  per_seed = []
  for seed in base.study.seeds:
    common = dict(seed=seed, steps=steps, eval_every=base.study.eval_every)
    result = {"seed": seed}
    for name, mixture in (("umbrella", {umbrella: 1.0}), ("granular", {t: 1.0 for t in tasks})):
      d = arms.run(root / f"seed{seed}", name, arms.configure(base, mixture=mixture, **common), train_fn)
      result[name] = {m: arms.final_eval(d, tasks, m) for m in METRICS}
      result[name + "_curves"] = {t: arms.eval_series(d, t, "token_accuracy") for t in tasks}
    per_seed.append(result)
  summary = {"tasks": tasks, "umbrella": umbrella, "seeds": list(base.study.seeds), "steps": steps,
             "per_seed": per_seed}
  (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  report.write_decomposition_report(root, summary)
  return summary
