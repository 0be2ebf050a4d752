"""Metric rows and their writers: metrics.jsonl (always), TensorBoard events, PNG plots.

Only process 0 writes. Keys follow ../DESIGN.md: train/<task>/{loss,entropy,accuracy,tokens,weight},
data/<task>/{rate,truncated,skipped}, data/packing_efficiency, perf/*, train/skipped_steps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

PER_TASK_TRAIN = ("loss", "entropy", "accuracy", "tokens")


def train_row(step: int, metrics: Mapping[str, Any], task_names: Sequence[str],
              loss_weights: np.ndarray, entropy_coefs: np.ndarray) -> dict[str, Any]:
  """One JSON row from the step's (host) metrics. `step` counts completed steps."""
  row: dict[str, Any] = {
      "step": step,
      "train/loss": float(metrics["objective"]),
      "train/grad_norm": float(metrics["grad_norm"]),
      "train/lr": float(metrics["lr"]),
      "train/skipped_steps": int(metrics["skipped_steps"]),
  }
  per_task = metrics["per_task"]
  for i, name in enumerate(task_names):
    for key in PER_TASK_TRAIN:
      value = per_task[key][i]
      row[f"train/{name}/{key}"] = int(value) if key == "tokens" else float(value)
    row[f"train/{name}/weight"] = float(loss_weights[i])
    row[f"train/{name}/entropy_coef"] = float(entropy_coefs[i])
  return row


class MetricsWriter:
  """Appends rows to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # needs no TensorFlow
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._file = self.path.open("a")

  def write(self, row: Mapping[str, Any]) -> None:
    if self._tb is None:  # not process 0
      return
    self._file.write(json.dumps(row, sort_keys=True) + "\n")
    self._file.flush()
    step = int(row["step"])
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._file.close()
      self._tb.close()


def read_rows(path: epath.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_per_task(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str],
                  out_dir: epath.Path, prefix: str = "train") -> list[epath.Path]:
  """One PNG per metric (loss, entropy, accuracy) with a curve per task against step."""
  # A bare Figure, not pyplot: the global backend stays as it was (a notebook keeps its inline
  # plots) and no display is needed.
  from matplotlib.figure import Figure

  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for metric in ("loss", "entropy", "accuracy"):
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.subplots()
    for name in task_names:
      key = f"{prefix}/{name}/{metric}"
      pts = [(r["step"], r[key]) for r in rows if key in r and r.get(f"{prefix}/{name}/tokens", 1)]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (per target token)" if metric != "accuracy" else "next-token accuracy")
    ax.set_title(f"{prefix} {metric} per task")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
    if metric == "loss":
      ax.set_yscale("log")
    fig.tight_layout()
    path = out_dir / f"{prefix}_{metric}.png"
    with path.open("wb") as f:
      fig.savefig(f, format="png")
    written.append(path)
  return written
