"""Entropy study: does joint training collapse the entropy of open-ended tasks, and does entropy
regularization or ordering prevent it?

Arms, at equal steps (study.steps_per_task x number of tasks), per seed:
  joint             equal mixture, no entropy term
  joint_regularized equal mixture, entropy coefficient study.entropy_coef on the open-ended tasks
  structured_first  structured tasks alone first, then a mixture that gives every task the same
                    total number of examples as the joint arm (order without a change of amount)
Tracked per task: predictive entropy (train and held-out) against the generator's TRUE entropy
(floors.entropy_truth: below it the model is collapsed, above it underfit), and from sampled
completions distinct@k and pass@1 (eval.num_samples samples for eval.sample_prompts prompts).
Tests: per open-ended task, the arm's distance from the true entropy minus the joint arm's
(paired over seeds, sign flips, Holm over tasks; primary: joint_regularized vs joint).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.experiments import arms, report, stats

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
      "structured_first": arm(stages=structured_first_stages(tasks, structured, steps),
                              **no_entropy),
  }


def structured_first_stages(tasks, structured, steps: int) -> list[tuple[int, dict[str, float]]]:
  """Structured tasks alone for the first K_s / (2K) of the steps (half of their budget), then a
  mixture with weight 1 per structured and 2 per open-ended task, so every task ends with
  steps / K examples' worth of batches, as in the equal-mixture arms (K tasks, K_s structured):
  the phase-2 share of a structured task is (1 - K_s / 2K) / (K_s + 2 K_o) = 1 / 2K."""
  if not structured or len(structured) == len(tasks):
    return [(0, {t: 1.0 for t in tasks})]  # nothing to order
  first = round(steps * len(structured) / (2 * len(tasks)))
  return [(0, {t: 1.0 for t in structured}),
          (first, {t: 1.0 if t in structured else 2.0 for t in tasks})]


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


COMPARED = ("joint_regularized", "structured_first")  # each against the joint arm
NAMES = tuple(f"{a}-joint" for a in COMPARED)
DEFAULT_PRIMARY = "joint_regularized-joint"  # the entropy term's claim: it prevents collapse


def tests(per_seed, free: Sequence[str], truth: Mapping[str, float],
          primary: str = DEFAULT_PRIMARY) -> dict[str, dict[str, stats.Comparison]]:
  """Per open-ended task: |final entropy - truth| of the arm minus that of the joint arm, per seed
  (below 0: closer to the truth); without a recorded truth, the final entropies' difference."""
  def gap(arm: str, t: str) -> list[float]:
    final = [s["arms"][arm][t]["eval_entropy"][-1][1] for s in per_seed]
    return [abs(v - truth[t]) for v in final] if t in truth else final

  return stats.compare_named({f"{a}-joint": {t: [x - y for x, y in zip(gap(a, t), gap("joint", t))]
                                             for t in free} for a in COMPARED}, primary)


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
  free = [t for t in tasks if summary["open_ended"][t]]
  truth = report.true_entropies(summary)
  primary = summary.get("primary", DEFAULT_PRIMARY)
  if free:
    tested = tests(summary["per_seed"], free, truth, primary)
    words = ("further from the truth", "closer to the truth") if truth else ("higher", "lower")
    doc.text(stats.plainly(primary, {t: (c, c.sentence(*words)) for t, c in tested[primary].items()},
                           cannot="collapse in a model that has fitted its data (the joint arm "
                                  "is compared with the generator's true entropy: above it is "
                                  "underfit), other sizes, budgets or coefficients."))
  doc.text(
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Every arm trains {summary['steps']} "
      f"steps. Arms: joint (no entropy term), joint_regularized (entropy coefficient "
      f"{summary['entropy_coef']} on the open-ended tasks), structured_first (structured tasks alone "
      "first, then a mixture that gives every task the joint arm's number of examples). Held-out predictive entropy per target token; "
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
  per_seed = summary["per_seed"]
  if truth:
    doc.text("Final held-out entropy minus the generator's true entropy (nats per target token; "
             "the truth from the task's answer distribution on the same held-out prompts; below "
             "0 = more certain than the data allow, i.e. collapsed; above 0 = underfit):")
    doc.table(["task", "true entropy", *ARMS],
              [[t, f"{truth[t]:.3f}", *[_spread([v - truth[t] for v in _last(
                  [s["arms"][a][t] for s in per_seed], "eval_entropy") or []] or None, 3)
                  for a in ARMS]] for t in tasks if t in truth])
  doc.heading("Findings")
  lines = []
  if free:
    doc.text(stats.method_note(primary, len(per_seed), len(free), "open-ended tasks") + (
        " The tested quantity is the distance of the final held-out entropy from the true "
        "entropy, arm minus joint." if truth else " This record has no true entropy, so the "
        "tested quantity is the final held-out entropy, arm minus joint."))
  for t in free:
    j = f["joint"][t]
    above = sum(s["arms"]["joint"][t]["eval_entropy"][-1][1] > truth.get(t, math.inf)
                for s in per_seed)
    where = ("" if t not in truth else
             f"; the truth is {truth[t]:.3f}: the joint arm ends above it (underfit) in {above} "
             f"of {len(per_seed)} seeds and below it (more certain than the data allow) in "
             f"{len(per_seed) - above}")
    words = (("further from the truth", "closer to the truth") if t in truth
             else ("higher entropy", "lower entropy"))
    lines.append(
        f"`{t}`: joint training keeps {j['retained']:.0%} of its peak held-out entropy "
        f"(final {j['final_entropy']:.3f}{where}). Entropy term vs joint: "
        f"{tested['joint_regularized-joint'][t].sentence(*words)}; structured-first vs joint: "
        f"{tested['structured_first-joint'][t].sentence(*words)}.")
  doc.bullets(lines or ["no open-ended task in this run"])
  doc.figure("entropy.png", lambda: _figure(summary), alt="entropy")
  doc.heading("What this run does NOT show")
  doc.bullets([
      "Collapse is judged against the generator's true entropy, which only synthetic tasks "
      "have; a joint arm that ends above it is underfit, and an entropy bonus then pushes it "
      "further from the truth, which says nothing about collapse in a model that has fitted "
      "its data (a pretrained LLM after long RL).",
      "One model size, one step budget, one entropy coefficient: a longer run that fits the "
      "data could fall below the truth where this one does not.",
      "structured_first changes the order only (every task gets the same number of examples "
      "as in the joint arm); it does not test giving structured tasks more data."])
  return doc


def _last(runs: list[dict[str, Any]], key: str) -> list[float] | None:
  """Each seed's final value of a series (None if some seed has none)."""
  return [r[key][-1][1] for r in runs] if all(r[key] for r in runs) else None


def _spread(values: list[float] | None, digits: int) -> str:
  return "-" if values is None else report.mean_std(values, digits)


def _figure(summary: dict[str, Any]) -> Any:
  tasks = summary["tasks"]
  k = summary["num_samples"]
  truth = report.true_entropies(summary)
  fig, axes = report.figure(2, len(tasks), figsize=(3.4 * len(tasks), 5.4), dpi=110, squeeze=False)
  for col, t in enumerate(tasks):
    for i, arm in enumerate(ARMS):
      for s, run in enumerate(summary["per_seed"]):
        for row, key in ((0, "eval_entropy"), (1, "distinct")):
          pts = run["arms"][arm][t][key]
          if pts:
            xs, ys = zip(*pts)
            if row == 0 and t in truth:  # model minus truth: 0 is the generator's own entropy
              ys = [y - truth[t] for y in ys]
            axes[row, col].plot(xs, ys, color=f"C{i}", alpha=0.8, label=arm if s == 0 else None)
    axes[0, col].set_title(f"{t}" + (" (open-ended)" if summary["open_ended"][t] else ""), fontsize=8)
    axes[0, col].set_ylabel("held-out entropy - true" if t in truth else "held-out entropy")
    axes[1, col].set_ylabel(f"distinct@{k}")
    axes[1, col].set_xlabel("step")
    for row in (0, 1):
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  for col, t in enumerate(tasks):
    if t in truth:
      axes[0, col].axhline(0.0, color="k", ls="--", lw=0.8)
  return fig


STUDY = arms.Study(
    name="entropy", help="entropy and distinct-k of open-ended tasks: joint, regularized, ordered",
    summarize=summarize, describe=describe, comparisons=NAMES, default_primary=DEFAULT_PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
