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


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(r) + " |" for r in rows]


def write_transfer_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  from mtjax.experiments import arms
  tasks, runs = summary["tasks"], summary["per_seed"]
  short = [t.replace("structured_", "s:").replace("open_ended_", "o:") for t in tasks]
  R = np.mean([r["R_normalized"] for r in runs], axis=0)
  M = np.mean([r["M_normalized"] for r in runs], axis=0)
  plot = _plot_transfer(root, summary, R, M, short)
  lines = [
      "# Transfer and order study",
      "",
      f"Tasks: {', '.join(tasks)} (open-ended: {', '.join(t for t, o in zip(tasks, summary['open_ended']) if o) or 'none'}). "
      f"Seeds: {summary['seeds']}. One stage = {summary['steps_per_task']} steps. Score: held-out "
      f"`{summary['metric']}`, normalized per task by its single-task score (the diagonal of the "
      "transfer matrix). Mean over seeds.",
      "",
      "## Transfer matrix (row: trained alone on; column: normalized score on)",
      "",
      *_md_table(["trained on"] + short, [[short[i]] + [f"{v:.2f}" for v in M[i]] for i in range(len(tasks))]),
      "",
      "## Sequential training in the config's order: R[i, j] after stage i",
      "",
      *_md_table(["after stage"] + short, [[f"{i + 1}: {short[i]}"] + [f"{v:.2f}" for v in R[i]]
                                           for i in range(len(tasks))]),
      "",
      *_md_table(["metric", "mean ± std over seeds"],
                 [[k.upper(), arms.mean_std([r["metrics"][k] for r in runs])]
                  for k in ("acc", "bwt", "fwt", "forgetting") if k in runs[0]["metrics"]]),
      "",
      "ACC = mean final score; BWT = mean(R[T-1, j] - R[j, j]); FWT = mean(R[j-1, j] - init[j]); "
      "forgetting = mean(max earlier R[l, j] - R[T-1, j]) (GEM; Chaudhry et al.).",
      "",
      "## Orders at equal tokens (mean normalized final score over tasks)",
      "",
  ]
  names = list(runs[0]["compare_mean_normalized"])
  rows = []
  for name in names:
    order = "mixed" if name == "joint" else " → ".join(
        short[tasks.index(t)] for t in runs[0]["orders"][name])
    rows.append([name, order, arms.mean_std([r["compare_mean_normalized"][name] for r in runs])]
                + [arms.mean_std([r["compare"][name][t] for r in runs], 2) for t in tasks])
  lines += _md_table(["arm", "order (seed " + str(runs[0]["seed"]) + ")", "mean normalized"] + short, rows)
  best = max(names, key=lambda n: np.mean([r["compare_mean_normalized"][n] for r in runs]))
  lines += [
      "",
      f"Best arm by mean normalized score: **{best}**. BWT-guided order derived from the "
      f"seed-averaged transfer matrix: {' → '.join(summary['derived_order'])}; runnable config: "
      f"`{summary['derived_config']}` (`mtjax train --config {root / summary['derived_config']} --workdir DIR`).",
      "",
      f"![transfer]({plot.name})",
      "",
  ]
  path = root / "report.md"
  path.write_text("\n".join(lines))
  return path


def _plot_transfer(root, summary, R, M, short) -> epath.Path:
  from mtjax.experiments import arms
  plt = arms.pyplot()
  runs = summary["per_seed"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
  for ax, mat, title, ylabel in ((axes[0], M, "transfer: trained alone on (row)", "trained on"),
                                 (axes[1], R, "sequential: after stage (row)", "after stage")):
    im = ax.imshow(mat, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(short)), short, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(short)), short, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
  names = list(runs[0]["compare_mean_normalized"])
  means = [np.mean([r["compare_mean_normalized"][n] for r in runs]) for n in names]
  stds = [np.std([r["compare_mean_normalized"][n] for r in runs]) for n in names]
  axes[2].bar(range(len(names)), means, yerr=stds, color=[f"C{i}" for i in range(len(names))])
  axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  axes[2].set_ylabel("mean normalized score")
  axes[2].set_title("orders at equal tokens", fontsize=9)
  return arms.save_figure(fig, root / "transfer.png")


def write_entropy_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  from mtjax.experiments import entropy
  tasks, f = summary["tasks"], summary["findings"]
  k = summary["num_samples"]
  plot = _plot_entropy(root, summary)
  lines = [
      "# Entropy study: does joint training collapse open-ended entropy?",
      "",
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Every arm trains {summary['steps']} "
      f"steps. Arms: joint (no entropy term), joint_regularized (entropy coefficient "
      f"{summary['entropy_coef']} on the open-ended tasks), structured_first (structured tasks alone "
      "for the first half, then the joint mixture). Held-out predictive entropy per target token; "
      f"'retained' = final / peak held-out entropy after step 0 (1 = no collapse); distinct@{k} and "
      f"pass@1 from {k} sampled completions per prompt. Means over seeds.",
      "",
  ]
  rows = []
  for arm in entropy.ARMS:
    for t in tasks:
      v = f[arm][t]
      rows.append([arm, t, "open-ended" if summary["open_ended"][t] else "structured",
                   f"{v['final_entropy']:.3f}", f"{v['retained']:.2f}",
                   f"{v['final_distinct']:.2f}", f"{v['final_pass1']:.2f}"])
  lines += _md_table(["arm", "task", "kind", "final entropy", "retained", f"distinct@{k}", "pass@1"], rows)
  free = [t for t in tasks if summary["open_ended"][t]]
  lines += ["", "## Findings", ""]
  for t in free:
    j, r, s = (f[a][t] for a in entropy.ARMS)
    lines.append(
        f"- `{t}`: joint training keeps {j['retained']:.0%} of its peak held-out entropy "
        f"(final {j['final_entropy']:.3f}); with the entropy term {r['retained']:.0%} "
        f"(final {r['final_entropy']:.3f}, {'higher' if r['final_entropy'] > j['final_entropy'] else 'not higher'}); "
        f"structured-first {s['retained']:.0%} (final {s['final_entropy']:.3f}).")
  if not free:
    lines.append("- no open-ended task in this run")
  lines += ["", f"![entropy]({plot.name})", ""]
  path = root / "report.md"
  path.write_text("\n".join(lines))
  return path


def _plot_entropy(root, summary) -> epath.Path:
  from mtjax.experiments import arms, entropy
  plt = arms.pyplot()
  tasks = summary["tasks"]
  k = summary["num_samples"]
  fig, axes = plt.subplots(2, len(tasks), figsize=(3.4 * len(tasks), 5.4), dpi=110, squeeze=False)
  for col, t in enumerate(tasks):
    for i, arm in enumerate(entropy.ARMS):
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
  return arms.save_figure(fig, root / "entropy.png")


def write_decomposition_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  from mtjax.experiments import arms
  tasks, runs = summary["tasks"], summary["per_seed"]
  plt = arms.pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
  x = np.arange(len(tasks))
  for i, arm in enumerate(("umbrella", "granular")):
    ax.bar(x + (i - 0.5) * 0.4, [np.mean([r[arm]["token_accuracy"][t] for r in runs]) for t in tasks],
           0.4, label=arm)
  ax.set_xticks(x, [t.replace("fc_", "") for t in tasks], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out token accuracy")
  ax.legend(fontsize=8)
  plot = arms.save_figure(fig, root / "decomposition.png")
  rows = []
  for t in tasks:
    cells = [t]
    for m in ("accuracy", "token_accuracy"):
      u = [r["umbrella"][m][t] for r in runs]
      g = [r["granular"][m][t] for r in runs]
      cells += [arms.mean_std(u), arms.mean_std(g), f"{np.mean(g) - np.mean(u):+.3f}"]
    rows.append(cells)
  lines = [
      "# Decomposition study: umbrella task alone vs granular subtasks + umbrella",
      "",
      f"Seeds: {summary['seeds']}. Both arms train {summary['steps']} steps on the same batch shape "
      f"(equal tokens): `umbrella` samples only {summary['umbrella']}; `granular` samples all "
      f"{len(tasks)} tasks equally. Scored on held-out APIs (never seen in training): structural "
      "match of the greedy completion, and teacher-forced token accuracy.",
      "",
      *_md_table(["subtask", "structural match: umbrella", "granular", "Δ",
                  "token acc: umbrella", "granular", "Δ"], rows),
      "",
      f"![decomposition]({plot.name})",
      "",
  ]
  path = root / "report.md"
  path.write_text("\n".join(lines))
  return path


def write_instructions_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  from mtjax.experiments import arms, instructions
  tasks, runs, metric = summary["tasks"], summary["per_seed"], summary["metric"]
  rows = []
  for t in tasks:
    base = [r["original"][t] for r in runs]
    cells = [t, arms.mean_std(base)]
    for arm in instructions.ARMS[1:]:
      vals = [r[arm][t] for r in runs]
      cells += [arms.mean_std(vals), arms.mean_std([v - b for v, b in zip(vals, base)])]
    rows.append(cells)
  lines = [
      "# Instruction ablation",
      "",
      f"Seeds: {summary['seeds']}. Each arm trains {summary['steps']} steps on the same mixture; the "
      "ablation applies in training and in evaluation. Score: held-out "
      f"`{metric}`. Δ = arm − original (per seed, then mean ± std).",
      "",
      *_md_table(["task", "original", "empty", "Δ empty", "wrong", "Δ wrong"], rows),
      "",
  ]
  path = root / "report.md"
  path.write_text("\n".join(lines))
  return path


STUDIES = ("efficiency", "transfer", "entropy", "decomposition", "instructions")


def rebuild(workdir: str) -> epath.Path:
  """Recomputes a study's tables and plots from its runs' stored metrics (no training)."""
  from mtjax import config as config_lib
  from mtjax.errors import BadInputError
  from mtjax.experiments import decomposition, efficiency, entropy, instructions, transfer
  root = epath.Path(workdir)
  if not (root / "study.json").exists():
    raise BadInputError(str(root), "not a study directory (no study.json)")
  study = json.loads((root / "study.json").read_text())
  if study.get("study") not in STUDIES:
    raise BadInputError(str(root / "study.json"), f"unknown study {study.get('study')!r} (known: {STUDIES})")

  def no_training(cfg, arm_dir):
    raise BadInputError(str(arm_dir), "this run is not finished; run the study to complete it")

  base = config_lib.from_dict(study["config"])
  if study["study"] == "efficiency":
    efficiency.run(base, str(root), steps_per_task=study["steps_per_task"], seeds=study["seeds"],
                   eval_every=study["eval_every"], target=study["target"], metric=study["metric"],
                   targets=study.get("targets"), train_fn=no_training)
  else:
    module = {"transfer": transfer, "entropy": entropy, "decomposition": decomposition,
              "instructions": instructions}[study["study"]]
    module.run(base, str(root), train_fn=no_training)
  return root / "report.md"
