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

import functools
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.experiments import arms, report

ARMS = ("joint", "joint_regularized", "structured_first")


def arm_configs(base: Config, seed: int) -> dict[str, Config]:
  from mtjax import tasks as task_registry
  st = base.study
  tasks = base.data.tasks
  steps = st.steps_per_task * len(tasks)
  free = [t for t in tasks if task_registry.get(t).open_ended]
  structured = [t for t in tasks if t not in free]
  equal = {t: 1.0 for t in tasks}
  arm = functools.partial(arms.configure, base, seed=seed, steps=steps, eval_every=st.eval_every)
  no_entropy: dict[str, Any] = {"train.entropy_coefs": {}}
  regularized: dict[str, Any] = {"train.entropy_coefs": {t: st.entropy_coef for t in free}}
  return {
      "joint": arm(mixture=equal, **no_entropy),
      "joint_regularized": arm(mixture=equal, **regularized),
      "structured_first": arm(
          stages=[(0, {t: 1.0 for t in structured or tasks}), (steps // 2, equal)], **no_entropy),
  }


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  from mtjax import tasks as task_registry
  tasks = list(base.data.tasks)
  k = base.eval.num_samples
  per_seed = []
  for seed in base.study.seeds:
    result: dict[str, Any] = {"seed": seed, "arms": {}}
    for name, cfg in arm_configs(base, seed).items():
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      result["arms"][name] = {t: {
          "train_entropy": arms.train_series(d, t, "entropy"),
          "eval_entropy": arms.eval_series(d, t, "entropy"),
          "distinct": arms.eval_series(d, t, f"distinct@{k}") if k else [],
          "pass1": arms.eval_series(d, t, "pass@1") if k else [],
      } for t in tasks}
    per_seed.append(result)
  return {"tasks": tasks, "open_ended": {t: task_registry.get(t).open_ended for t in tasks},
          "seeds": list(base.study.seeds), "entropy_coef": base.study.entropy_coef,
          "num_samples": k, "steps": base.study.steps_per_task * len(tasks),
          "per_seed": per_seed, "findings": findings(per_seed, tasks)}


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


# ---------------------------------------------------------------- the report

def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, f = summary["tasks"], summary["findings"]
  k = summary["num_samples"]
  doc = report.Report("Entropy study: does joint training collapse open-ended entropy?")
  doc.text(
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Every arm trains {summary['steps']} "
      f"steps. Arms: joint (no entropy term), joint_regularized (entropy coefficient "
      f"{summary['entropy_coef']} on the open-ended tasks), structured_first (structured tasks alone "
      "for the first half, then the joint mixture). Held-out predictive entropy per target token; "
      f"'retained' = final / peak held-out entropy after step 0 (1 = no collapse); distinct@{k} and "
      f"pass@1 from {k} sampled completions per prompt. Mean ± std over seeds.")
  rows = []
  for arm in ARMS:
    for t in tasks:
      runs = [s["arms"][arm][t] for s in summary["per_seed"]]
      rows.append([arm, t, "open-ended" if summary["open_ended"][t] else "structured",
                   _spread(_last(runs, "eval_entropy"), 3),
                   _spread([retained(r["eval_entropy"]) for r in runs], 2),
                   _spread(_last(runs, "distinct"), 2), _spread(_last(runs, "pass1"), 2)])
  doc.table(["arm", "task", "kind", "final entropy", "retained", f"distinct@{k}", "pass@1"], rows)
  free = [t for t in tasks if summary["open_ended"][t]]
  doc.heading("Findings")
  findings = []
  for t in free:
    j, r, s = (f[a][t] for a in ARMS)
    findings.append(
        f"`{t}`: joint training keeps {j['retained']:.0%} of its peak held-out entropy "
        f"(final {j['final_entropy']:.3f}); with the entropy term {r['retained']:.0%} "
        f"(final {r['final_entropy']:.3f}, {'higher' if r['final_entropy'] > j['final_entropy'] else 'not higher'}); "
        f"structured-first {s['retained']:.0%} (final {s['final_entropy']:.3f}).")
  doc.bullets(findings or ["no open-ended task in this run"])
  doc.figure("entropy.png", lambda: _figure(summary), alt="entropy")
  return doc


def _last(runs: list[dict[str, Any]], key: str) -> list[float] | None:
  """Each seed's final value of a series (None if some seed has none)."""
  return [r[key][-1][1] for r in runs] if all(r[key] for r in runs) else None


def _spread(values: list[float] | None, digits: int) -> str:
  return "-" if values is None else report.mean_std(values, digits)


def _figure(summary: dict[str, Any]) -> Any:
  tasks = summary["tasks"]
  k = summary["num_samples"]
  fig, axes = report.figure(2, len(tasks), figsize=(3.4 * len(tasks), 5.4), dpi=110, squeeze=False)
  for col, t in enumerate(tasks):
    for i, arm in enumerate(ARMS):
      for s, run in enumerate(summary["per_seed"]):
        for row, key in ((0, "eval_entropy"), (1, "distinct")):
          pts = run["arms"][arm][t][key]
          if pts:
            xs, ys = zip(*pts)
            axes[row, col].plot(xs, ys, color=f"C{i}", alpha=0.8, label=arm if s == 0 else None)
    axes[0, col].set_title(f"{t}" + (" (open-ended)" if summary["open_ended"][t] else ""), fontsize=8)
    axes[0, col].set_ylabel("held-out entropy")
    axes[1, col].set_ylabel(f"distinct@{k}")
    axes[1, col].set_xlabel("step")
    for row in (0, 1):
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  return fig


STUDY = arms.Study(
    name="entropy", help="entropy and distinct-k of open-ended tasks: joint, regularized, ordered",
    summarize=summarize, describe=describe)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
