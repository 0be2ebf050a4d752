"""Study reports: report.md with tables and PNG plots in the study's workdir.

`mtjax report DIR` rebuilds a study's report from the metrics its runs stored (study.json says
which study and with which settings; no training happens).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath


def _fmt_tokens(values: list[int | None]) -> str:
  reached = [v for v in values if v is not None]
  missing = len(values) - len(reached)
  if not reached:
    return "not reached"
  text = f"{np.mean(reached):,.0f} ± {np.std(reached):,.0f}"
  return text + (f" ({missing} seed(s) not reached)" if missing else "")


def _fmt(values: list[float]) -> str:
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def write_efficiency_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  tasks, runs = summary["tasks"], summary["per_seed"]
  plot = _plot_efficiency(root, summary)
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
                 f"{_fmt([r['single_final'][t] for r in runs])} | {_fmt([r['multi_final'][t] for r in runs])} |")
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
  path = root / "report.md"
  path.write_text("\n".join(lines))
  return path


def _plot_efficiency(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
  fig.tight_layout()
  path = root / "efficiency_curves.png"
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path


def rebuild(workdir: str) -> epath.Path:
  """Recomputes a study's tables and plots from its runs' stored metrics."""
  from mtjax import config as config_lib
  from mtjax.errors import BadInputError
  from mtjax.experiments import efficiency
  root = epath.Path(workdir)
  if not (root / "study.json").exists():
    raise BadInputError(str(root), "not a study directory (no study.json)")
  study = json.loads((root / "study.json").read_text())
  if study["study"] != "efficiency":
    raise BadInputError(str(root / "study.json"), f"unknown study {study['study']!r}")

  def no_training(cfg, arm_dir):
    raise BadInputError(str(arm_dir), "this run is not finished; run the study to complete it")

  efficiency.run(config_lib.from_dict(study["config"]), str(root),
                 steps_per_task=study["steps_per_task"], seeds=study["seeds"],
                 eval_every=study["eval_every"], target=study["target"], metric=study["metric"],
                 targets=study.get("targets"), train_fn=no_training)
  return root / "report.md"
