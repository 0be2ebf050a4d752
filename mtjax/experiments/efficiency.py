"""Is training one model on K related tasks more efficient than K task-specific models?

For each seed: K single-task runs of S steps each, and one multi-task run of K x S steps on the
mixture (same batch shape, so the same total compute), all evaluated on held-out splits every
`study.eval_every` steps. Per task: tokens until its score first reaches the target, and the
final score. Efficiency ratio = (sum over tasks of single-task tokens to target) / (multi-task
tokens until EVERY task reached its target); > 1 means the joint run got there with less
compute. Verdict over seeds: "more efficient" if every seed's ratio > 1, "less efficient" if
every seed's ratio < 1, else "inconclusive" (or when a target was never reached).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.experiments import arms, report


def tokens_per_step(config: Config) -> int:
  return config.data.batch_size * config.data.seq_len


def first_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
  for step, value in curve:
    if value >= target:
      return step
  return None


def efficiency_ratio(single_steps: dict[str, int | None], multi_steps_all: int | None,
                     single_tokens_per_step: int, multi_tokens_per_step: int) -> float:
  reached = [s for s in single_steps.values() if s is not None]
  if multi_steps_all is None or len(reached) < len(single_steps):
    return math.nan
  single = sum(s * single_tokens_per_step for s in reached)
  multi = multi_steps_all * multi_tokens_per_step
  if multi == 0:  # already at target before training: no difference to measure
    return 1.0 if single == 0 else math.inf
  return single / multi


def verdict(ratios: Sequence[float]) -> str:
  r = np.asarray(ratios, np.float64)
  if len(r) == 0 or np.any(np.isnan(r)):
    return "inconclusive"
  if np.all(r > 1):
    return "more efficient"
  if np.all(r < 1):
    return "less efficient"
  return "inconclusive"



# ---------------------------------------------------------------- the study

def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """Trains both arms for every seed (skipping finished ones); the summary of their evals."""
  st = base.study
  tasks = list(base.data.tasks)
  goal = {t: float(st.targets.get(t, st.target)) for t in tasks}
  tps = tokens_per_step(base)
  per_seed = []
  for seed in st.seeds:
    seed_dir = root / f"seed{seed}"
    plan = {f"single_{t}": arms.configure(base, tasks=[t], steps=st.steps_per_task, seed=seed,
                                          eval_every=st.eval_every) for t in tasks}
    plan["multi"] = arms.configure(base, tasks=tasks, steps=st.steps_per_task * len(tasks),
                                   seed=seed, eval_every=st.eval_every)
    for name, cfg in plan.items():
      arms.run(seed_dir, name, cfg, train_fn)
    single_curves = {t: arms.eval_curves(seed_dir / f"single_{t}", st.metric)[t] for t in tasks}
    multi_curves = arms.eval_curves(seed_dir / "multi", st.metric)
    single_steps = {t: first_reach(single_curves[t], goal[t]) for t in tasks}
    multi_steps = {t: first_reach(multi_curves[t], goal[t]) for t in tasks}
    reached = [s for s in multi_steps.values() if s is not None]
    all_reached = max(reached) if len(reached) == len(tasks) else None
    per_seed.append({
        "seed": seed,
        "single_tokens_to_target": {t: None if s is None else s * tps for t, s in single_steps.items()},
        "multi_tokens_to_target": {t: None if s is None else s * tps for t, s in multi_steps.items()},
        "multi_tokens_all_reached": None if all_reached is None else all_reached * tps,
        "single_final": {t: single_curves[t][-1][1] for t in tasks},
        "multi_final": {t: multi_curves[t][-1][1] for t in tasks},
        "ratio": _finite(efficiency_ratio(single_steps, all_reached, tps, tps)),
        "single_curves": {t: [(s * tps, v) for s, v in c] for t, c in single_curves.items()},
        "multi_curves": {t: [(s * tps, v) for s, v in c] for t, c in multi_curves.items()},
    })
  return {
      "tasks": tasks, "seeds": list(st.seeds), "metric": st.metric, "target": st.target,
      "targets": goal, "steps_per_task": st.steps_per_task, "tokens_per_step": tps,
      "per_seed": per_seed, "ratios": [s["ratio"] for s in per_seed],
      "verdict": verdict([math.nan if s["ratio"] is None else s["ratio"] for s in per_seed]),
  }


def _finite(x: float) -> float | None:
  return None if math.isnan(x) else x


def _record(config: Config) -> dict[str, Any]:
  """The study settings study.json repeats at its top level (this study once took them as
  arguments; `mtjax report` lets them win over config.study)."""
  st = config.study
  return {"steps_per_task": st.steps_per_task, "seeds": list(st.seeds), "eval_every": st.eval_every,
          "target": st.target, "metric": st.metric, "targets": dict(st.targets)}


# ---------------------------------------------------------------- the report

def _fmt_tokens(values: list[int | None]) -> str:
  reached = [v for v in values if v is not None]
  missing = len(values) - len(reached)
  if not reached:
    return "not reached"
  text = f"{np.mean(reached):,.0f} ± {np.std(reached):,.0f}"
  return text + (f" ({missing} seed(s) not reached)" if missing else "")


def write_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  tasks, runs = summary["tasks"], summary["per_seed"]
  plot = _plot(root, summary)
  lines = [
      "# Efficiency study: multi-task vs task-specific",
      "",
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Each single-task run: "
      f"{summary['steps_per_task']} steps; the multi-task run: {summary['steps_per_task'] * len(tasks)} "
      f"steps (the same total compute); {summary['tokens_per_step']:,} tokens per step. Score: "
      f"held-out eval `{summary['metric']}`; target per task in the table.",
      "",
      "| task | target | single: tokens to target | multi: tokens to target | single: final | multi: final |",
      "|---|---|---|---|---|---|",
  ]
  for t in tasks:
    lines.append(f"| {t} | {summary['targets'][t]} | {_fmt_tokens([r['single_tokens_to_target'][t] for r in runs])} | "
                 f"{_fmt_tokens([r['multi_tokens_to_target'][t] for r in runs])} | "
                 f"{report.mean_std([r['single_final'][t] for r in runs])} | "
                 f"{report.mean_std([r['multi_final'][t] for r in runs])} |")
  ratios = summary["ratios"]
  shown = ", ".join("n/a" if r is None else f"{r:.3f}" for r in ratios)
  lines += [
      "",
      "Efficiency ratio = (sum of single-task tokens to target) / (multi-task tokens until every "
      f"task reached its target), per seed: {shown}.",
      "",
      f"**Verdict: {summary['verdict']}** (more efficient: every seed's ratio > 1; less efficient: "
      "every seed's ratio < 1; otherwise, or if a target was never reached, inconclusive).",
      "",
      f"![eval curves]({plot.name})",
      "",
  ]
  return report.write_markdown(root, lines)


def _plot(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  plt = report.pyplot()
  tasks = summary["tasks"]
  cols = min(len(tasks), 4)
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
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
    ax.set_ylabel(summary["metric"])
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  return report.save_figure(fig, root / "efficiency_curves.png")


STUDY = arms.Study(name="efficiency", help="multi-task vs task-specific at equal compute",
                   summarize=summarize, report=write_report, record=_record)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
