"""Entropy study: does joint training collapse the entropy of open-ended tasks, and does entropy
regularization or ordering prevent it?

Arms, at equal steps (study.steps_per_task x number of tasks), per seed:
  joint             equal mixture, no entropy term
  joint_regularized equal mixture, entropy coefficient study.entropy_coef on the open-ended tasks
  structured_first  structured tasks alone for the first half, then the equal mixture
Tracked per task: predictive entropy (train and held-out), and from sampled completions
distinct@k and pass@1 (eval.num_samples samples for eval.sample_prompts prompts).
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from mtjax.config import Config

ARMS = ("joint", "joint_regularized", "structured_first")


def arm_configs(base: Config, seed: int) -> dict[str, Config]:
  from mtjax import tasks as task_registry
  from mtjax.experiments import arms
  st = base.study
  tasks = base.data.tasks
  steps = st.steps_per_task * len(tasks)
  free = [t for t in tasks if task_registry.get(t).open_ended]
  structured = [t for t in tasks if t not in free]
  equal = {t: 1.0 for t in tasks}
  common = dict(seed=seed, steps=steps, eval_every=st.eval_every)
  return {
      "joint": arms.configure(base, mixture=equal, **common, **{"train.entropy_coefs": {}}),
      "joint_regularized": arms.configure(base, mixture=equal, **common, **{
          "train.entropy_coefs": {t: st.entropy_coef for t in free}}),
      "structured_first": arms.configure(
          base, stages=[(0, {t: 1.0 for t in structured or tasks}), (steps // 2, equal)], **common,
          **{"train.entropy_coefs": {}}),
  }


def run(base: Config, workdir: str, *, train_fn=None) -> dict:
  from mtjax import tasks as task_registry
  from mtjax import train
  from mtjax.experiments import arms, report
  train_fn = train_fn or train.run
  root = epath.Path(workdir)
  arms.write_study_json(root, "entropy", base)
  tasks = list(base.data.tasks)
  k = base.eval.num_samples
  per_seed = []
  for seed in base.study.seeds:
    result = {"seed": seed, "arms": {}}
    for name, cfg in arm_configs(base, seed).items():
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      result["arms"][name] = {t: {
          "train_entropy": arms.train_series(d, t, "entropy"),
          "eval_entropy": arms.eval_series(d, t, "entropy"),
          "distinct": arms.eval_series(d, t, f"distinct@{k}") if k else [],
          "pass1": arms.eval_series(d, t, "pass@1") if k else [],
      } for t in tasks}
    per_seed.append(result)
  summary = {"tasks": tasks, "open_ended": {t: task_registry.get(t).open_ended for t in tasks},
             "seeds": list(base.study.seeds), "entropy_coef": base.study.entropy_coef,
             "num_samples": k, "steps": base.study.steps_per_task * len(tasks),
             "per_seed": per_seed, "findings": findings(per_seed, tasks)}
  (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  report.write_entropy_report(root, summary)
  return summary


def retained(series) -> float:
  """Final over peak held-out entropy (1 = no collapse; the peak excludes the untrained model)."""
  values = [v for s, v in series if s > 0] or [v for _, v in series]
  return float(values[-1] / max(max(values), 1e-9))


def findings(per_seed, tasks) -> dict[str, dict[str, dict[str, float]]]:
  """arm -> task -> mean over seeds of: final eval entropy, entropy retained, final distinct@k."""
  out = {}
  for arm in ARMS:
    out[arm] = {}
    for t in tasks:
      runs = [s["arms"][arm][t] for s in per_seed]
      out[arm][t] = {
          "final_entropy": float(np.mean([r["eval_entropy"][-1][1] for r in runs])),
          "retained": float(np.mean([retained(r["eval_entropy"]) for r in runs])),
          "final_distinct": (float(np.mean([r["distinct"][-1][1] for r in runs]))
                             if runs[0]["distinct"] else float("nan")),
          "final_pass1": (float(np.mean([r["pass1"][-1][1] for r in runs]))
                          if runs[0]["pass1"] else float("nan")),
      }
  return out
