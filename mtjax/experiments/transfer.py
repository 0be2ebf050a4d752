"""Continual-learning transfer metrics over an accuracy matrix, and the BWT-guided task order.

R[i, j] = score on task j after training stage i (stages in order, one task each). Scores are
normalized per task before use (divided by `reference`, e.g. each task's single-task score).
Definitions follow GEM (Lopez-Paz & Ranzato, 2017) and, for forgetting, Chaudhry et al. (2018):

  ACC        = mean_j R[T-1, j]
  BWT        = mean_{j < T-1} (R[T-1, j] - R[j, j])
  FWT        = mean_{j > 0}   (R[j-1, j] - baseline[j])
  forgetting = mean_{j < T-1} (max_{l < T-1} R[l, j] - R[T-1, j])
"""

from __future__ import annotations

import pprint
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.experiments import arms, report


def normalize(R: np.ndarray, reference: Sequence[float] | np.ndarray) -> np.ndarray:
  ref = np.asarray(reference, np.float64)
  if np.any(ref <= 0):
    raise ValueError(f"reference scores must be positive, got {ref.tolist()}")
  return np.asarray(R, np.float64) / ref[None, :]


def metrics(R: np.ndarray,
            baseline: Sequence[float] | np.ndarray | None = None) -> dict[str, float]:
  R = np.asarray(R, np.float64)
  T = R.shape[0]
  if R.shape != (T, T):
    raise ValueError(f"R must be square (stages x tasks), got {R.shape}")
  b = np.zeros(T) if baseline is None else np.asarray(baseline, np.float64)
  out = {"acc": float(R[-1].mean())}
  if T > 1:
    out["bwt"] = float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))
    out["fwt"] = float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))
    out["forgetting"] = float(np.mean([R[: T - 1, j].max() - R[-1, j] for j in range(T - 1)]))
  return out


def greedy_order(M: np.ndarray) -> list[int]:
  """Greedy order from a transfer matrix M[a, b] (normalized score on b after training on a):
  next, the remaining task whose training maximizes the mean score over the other remaining
  tasks (ties: the lowest index), as in Omni-Thinker's backward-transfer-guided curriculum."""
  M = np.asarray(M, np.float64)
  remaining = list(range(M.shape[0]))
  order = []
  while remaining:
    if len(remaining) == 1:
      order.append(remaining.pop())
      break
    gains = [np.mean([M[a, b] for b in remaining if b != a]) for a in remaining]
    best = remaining[int(np.argmax(gains))]
    order.append(best)
    remaining.remove(best)
  return order


# ---------------------------------------------------------------- the study

def study_orders(tasks: Sequence[str], open_ended: Sequence[bool], greedy: Sequence[int]) -> dict[str, tuple[str, ...]]:
  """The orders compared at equal tokens (one stage of steps_per_task per task)."""
  structured = [t for t, o in zip(tasks, open_ended) if not o]
  free = [t for t, o in zip(tasks, open_ended) if o]
  return {"structured_first": tuple(structured + free), "open_ended_first": tuple(free + structured),
          "bwt_guided": tuple(tasks[i] for i in greedy)}


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  """Transfer matrix, sequential R matrix and its metrics, greedy order, order comparison."""
  from mtjax import tasks as task_registry
  st = base.study
  tasks = list(base.data.tasks)
  T, S, metric = len(tasks), st.steps_per_task, st.metric
  open_ended = [task_registry.get(t).open_ended for t in tasks]
  per_seed = []
  for seed in st.seeds:
    seed_dir = root / f"seed{seed}"
    # 1. Transfer matrix: train on task a alone (S steps), score every task.
    M = np.zeros((T, T))
    for a, task in enumerate(tasks):
      d = arms.run(seed_dir, f"only_{task}", arms.configure(
          base, seed=seed, steps=S, eval_every=S, mixture={task: 1.0}), train_fn)
      M[a] = arms.eval_at(d, S, tasks, metric)
    reference = np.maximum(np.diag(M), 1e-6)  # each task's own single-task score
    Mn = normalize(M, reference)
    greedy = greedy_order(Mn)
    # 2. Sequential stages in the config's order: R[i, j] after stage i; row 0 of evals = init.
    seq = arms.run(seed_dir, "sequential", arms.configure(
        base, seed=seed, steps=T * S, eval_every=S, stages=arms.sequential_stages(tasks, S)), train_fn)
    R = np.array([arms.eval_at(seq, (i + 1) * S, tasks, metric) for i in range(T)])
    init = np.array(arms.eval_at(seq, 0, tasks, metric))
    Rn = normalize(R, reference)
    # 3. Orders compared at equal tokens (T x S steps); identical orders share one run.
    orders = study_orders(tasks, open_ended, greedy)
    compare = {"joint": arms.final_eval(arms.run(seed_dir, "joint", arms.configure(
        base, seed=seed, steps=T * S, eval_every=S, mixture={t: 1.0 for t in tasks}), train_fn),
        tasks, metric)}
    for name, order in orders.items():
      run_name = "sequential" if list(order) == tasks else "order_" + "-".join(
          str(tasks.index(t)) for t in order)
      compare[name] = arms.final_eval(arms.run(seed_dir, run_name, arms.configure(
          base, seed=seed, steps=T * S, eval_every=S, stages=arms.sequential_stages(order, S)),
          train_fn), tasks, metric)
    per_seed.append({
        "seed": seed, "M": M.tolist(), "reference": reference.tolist(), "M_normalized": Mn.tolist(),
        "greedy_order": [tasks[i] for i in greedy], "R": R.tolist(), "R_normalized": Rn.tolist(),
        "init": init.tolist(), "metrics": metrics(Rn, init / reference),
        "orders": {k: list(v) for k, v in orders.items()},
        "compare": compare,
        "compare_mean_normalized": {k: float(np.mean([v[t] / reference[j] for j, t in enumerate(tasks)]))
                                    for k, v in compare.items()},
    })
  # The greedy order from the seed-averaged normalized transfer matrix, written as a runnable config.
  mean_Mn = np.mean([s["M_normalized"] for s in per_seed], axis=0)
  derived = [tasks[i] for i in greedy_order(mean_Mn)]
  config_path = write_schedule_config(root / "bwt_guided_schedule.py", base, derived, S)
  return {"tasks": tasks, "open_ended": open_ended, "seeds": list(st.seeds), "metric": metric,
          "steps_per_task": S, "per_seed": per_seed, "derived_order": derived,
          "derived_config": config_path.name}


def _docstring(text: str) -> str:
  """`text` as a triple-quoted Python literal whose value is exactly `text`: backslashes, quotes
  and characters that are not printable (but newlines) are escaped, so any task name is safe."""
  def escape(c: str) -> str:
    if c in '\\"':
      return "\\" + c
    if c == "\n" or c.isprintable():
      return c
    return c.encode("unicode_escape").decode("ascii")
  return '"""' + "".join(escape(c) for c in text) + '"""'


def write_schedule_config(path: epath.Path, base: Config, order: Sequence[str],
                          steps_per_task: int) -> epath.Path:
  """A config file others can run: the base config with the derived order as stages."""
  cfg = arms.configure(base, seed=base.seed, steps=steps_per_task * len(order),
                       eval_every=base.eval.every, stages=arms.sequential_stages(order, steps_per_task))
  cfg = cfg.replace(**{"train.progress": True, "checkpoint.every": base.checkpoint.every})
  doc = ("The backward-transfer-guided order derived by `mtjax experiment transfer`:\n"
         f"{' -> '.join(order)}, {steps_per_task} steps per stage.\n\n"
         f"  mtjax train --config {path.name} --workdir runs/bwt_guided\n")
  path.write_text(
      f"{_docstring(doc)}\n\n"
      "import ml_collections\n\n"
      f"CONFIG = {pprint.pformat(cfg.to_dict(), indent=1, width=100)}\n\n\n"
      "def get_config(variant: str = '') -> ml_collections.ConfigDict:\n"
      "  del variant\n"
      "  return ml_collections.ConfigDict(CONFIG)\n")
  return path


# ---------------------------------------------------------------- the report

def write_report(root: epath.Path, summary: dict[str, Any]) -> epath.Path:
  tasks, runs = summary["tasks"], summary["per_seed"]
  short = [t.replace("structured_", "s:").replace("open_ended_", "o:") for t in tasks]
  R = np.mean([r["R_normalized"] for r in runs], axis=0)
  M = np.mean([r["M_normalized"] for r in runs], axis=0)
  plot = _plot(root, summary, R, M, short)
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
      *report.md_table(["trained on"] + short,
                       [[short[i]] + [f"{v:.2f}" for v in M[i]] for i in range(len(tasks))]),
      "",
      "## Sequential training in the config's order: R[i, j] after stage i",
      "",
      *report.md_table(["after stage"] + short,
                       [[f"{i + 1}: {short[i]}"] + [f"{v:.2f}" for v in R[i]] for i in range(len(tasks))]),
      "",
      *report.md_table(["metric", "mean ± std over seeds"],
                       [[k.upper(), report.mean_std([r["metrics"][k] for r in runs])]
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
    rows.append([name, order, report.mean_std([r["compare_mean_normalized"][name] for r in runs])]
                + [report.mean_std([r["compare"][name][t] for r in runs], 2) for t in tasks])
  lines += report.md_table(
      ["arm", "order (seed " + str(runs[0]["seed"]) + ")", "mean normalized"] + short, rows)
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
  return report.write_markdown(root, lines)


def _plot(root: epath.Path, summary: dict[str, Any], R: np.ndarray, M: np.ndarray,
          short: Sequence[str]) -> epath.Path:
  plt = report.pyplot()
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
  return report.save_figure(fig, root / "transfer.png")


STUDY = arms.Study(
    name="transfer", help="sequential stages: R matrix, ACC/BWT/FWT, BWT-guided order, orders",
    summarize=summarize, report=write_report)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
