"""Metric rows and their writers: the metrics log (always), TensorBoard events, PNG plots.

Only process 0 writes. Keys follow ../DESIGN.md: train/<task>/{loss,entropy,accuracy,tokens,weight},
data/<task>/{rate,truncated,too_long,skipped}, data/packing_efficiency, perf/*, train/skipped_steps.

What a train row's numbers cover (`train_row`; the LogHook writes one every train.log_every steps
and at the last step):

- train/<task>/{loss,entropy,accuracy}: token-weighted means over every step of the LOG WINDOW
  (the steps since the previous train row, or since the run started or resumed), i.e.
  sum_s loss_s * tokens_s / sum_s tokens_s over the window's steps s. train/<task>/tokens is the
  window's total of that task's loss tokens. A task with no loss tokens in the window has
  train/<task>/tokens = 0 and NO loss/entropy/accuracy keys in that row (never a fake 0.0);
  plots and reports skip it there. A step the non-finite guard skipped still counts (its NaN
  shows in its window's means, and train/skipped_steps went up).
- train/loss, train/grad_norm, train/lr, train/<task>/weight, train/<task>/entropy_coef: the
  value at the logged step itself (train/loss is that step's objective: the weighted sum over
  tasks, not a window mean; comparing it between a straight and a resumed run stays bitwise,
  since it does not depend on where a window started).

The metrics log, one JSON object a line, in one of two layouts:

- Local workdirs: `metrics.jsonl`, appended and flushed row by row.
- Object stores (a workdir containing "://", e.g. gs://; needs `pip install 'mtjax[gcs]'`), which
  cannot append (gcsfs's append mode silently overwrites the object): numbered shards
  `metrics/000000.jsonl`, `metrics/000001.jsonl`, ..., which read as their concatenation in
  numeric order. Each writer (each start or resume of a run) begins a new shard after the last one
  and re-uploads its current shard whole after every row, so a row is in the bucket as soon as it
  is written and an upload never loses earlier rows; an object upload is atomic, so a shard is
  never torn. After ROWS_PER_SHARD rows the writer moves on to the next number, which keeps each
  upload small. A local workdir that already has shards (e.g. copied down from a bucket) goes on
  with them.

`read_rows(workdir or file)` reads either layout (both, if a workdir has both: metrics.jsonl
first); `mtjax.train.rundir.set_aside_metrics` trims them before a resume.

A torn last line (a crash or a full disk during a write) is not an error: `read_rows` skips it
with one warning on stderr (it never changes the log: a live run may still be writing that line),
and the next run in the workdir moves it to `metrics.torn.<time>.jsonl` (never deleted). An
undecodable line anywhere else is bad input: BadInputError naming the file and line number.

TensorBoard events go to `tensorboard/` through tensorboardX, which writes gs:// itself when
google-cloud-storage is installed (the gcs extra) and s3:// with boto3. For other object stores,
or without those packages, the run skips TensorBoard with one note on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.errors import BadInputError

PER_TASK_TRAIN = ("loss", "entropy", "accuracy", "tokens")
LOG_NAME = "metrics.jsonl"  # the local layout
SHARD_DIR = "metrics"  # the object-store layout: metrics/NNNNNN.jsonl
ROWS_PER_SHARD = 100
_SHARD = re.compile(r"^\d+\.jsonl$")


def window_sums(per_task_steps: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Per-task sums over steps, float64 on the host: loss, entropy and correct (each the step's
  per-task mean times its tokens) and tokens. `per_task_steps`: the steps' host `per_task` dicts
  ("loss", "entropy", "accuracy", "tokens", each [T])."""
  sums: dict[str, np.ndarray] = {}
  for per_task in per_task_steps:
    tokens = np.asarray(per_task["tokens"], np.float64)
    # An RL step has no per-task loss (its accuracy is the mean reward): only the keys it has.
    step = {name: np.asarray(per_task[key], np.float64) * tokens
            for name, key in (("loss", "loss"), ("entropy", "entropy"), ("correct", "accuracy"))
            if key in per_task}
    step["tokens"] = tokens
    for key, value in step.items():
      sums[key] = sums[key] + value if key in sums else value
  return sums


def train_row(step: int, metrics: Mapping[str, Any], task_names: Sequence[str],
              loss_weights: np.ndarray, entropy_coefs: np.ndarray,
              window: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """One JSON row from the logged step's (host) metrics. `step` counts completed steps.

  window: `window_sums` over the steps of the log window (default: the logged step alone); the
  per-task loss, entropy and accuracy are its token-weighted means, absent for a task without
  tokens in it (see the module docstring).
  """
  row: dict[str, Any] = {
      "step": step,
      "train/loss": float(metrics["objective"]),
      "train/grad_norm": float(metrics["grad_norm"]),
      "train/lr": float(metrics["lr"]),
      "train/skipped_steps": int(metrics["skipped_steps"]),
  }
  sums = window_sums([metrics["per_task"]]) if window is None else window
  for key, value in metrics.items():  # an RL step's scalars (clip fraction, KL, ...)
    if key.startswith("rl/"):
      row[key] = float(value)
  if "task_weights" in metrics:  # as the step applied them (adaptive weighting included)
    loss_weights = np.asarray(metrics["task_weights"])
  for i, name in enumerate(task_names):
    tokens = float(sums["tokens"][i])
    if tokens > 0:
      for key, out in (("loss", "loss"), ("entropy", "entropy"), ("correct", "accuracy")):
        if key in sums:
          row[f"train/{name}/{out}"] = float(sums[key][i] / tokens)
    row[f"train/{name}/tokens"] = int(round(tokens))
    row[f"train/{name}/weight"] = float(loss_weights[i])
    row[f"train/{name}/entropy_coef"] = float(entropy_coefs[i])
  return row


def loss_summary(row: Mapping[str, Any], task_names: Sequence[str]) -> str:
  """'loss 2.4120 (mean of 3 tasks: a 2.1000, b 2.5000, c 2.6360)' from a train row: the mean of
  the per-task mean losses over tasks with tokens in that row's log window (train/loss is the
  objective: a weighted SUM over tasks, which reads as worse than chance with many tasks)."""
  losses = {n: row[f"train/{n}/loss"] for n in task_names
            if f"train/{n}/loss" in row and row.get(f"train/{n}/tokens", 1) > 0}
  if not losses:
    return f"objective {row['train/loss']:.4f}"
  mean = sum(losses.values()) / len(losses)
  parts = ", ".join(f"{n} {v:.4f}" for n, v in losses.items())
  if len(losses) == 1:
    return f"loss {mean:.4f} ({parts})"
  return f"loss {mean:.4f} (mean of {len(losses)} tasks: {parts})"


def is_object_store(workdir: epath.PathLike) -> bool:
  return "://" in str(workdir)


def uses_shards(workdir: epath.PathLike) -> bool:
  """Whether new rows in `workdir` go to metrics/ shards (else: appended to metrics.jsonl)."""
  workdir = epath.Path(workdir)
  return is_object_store(workdir) or bool(_shards(workdir / SHARD_DIR))


def log_path(workdir: epath.PathLike) -> epath.Path:
  """Where `workdir`'s new rows go: metrics.jsonl, or the metrics/ shard directory."""
  workdir = epath.Path(workdir)
  return workdir / (SHARD_DIR if uses_shards(workdir) else LOG_NAME)


def _shards(directory: epath.Path) -> list[epath.Path]:
  if not directory.exists():
    return []
  return sorted((p for p in directory.iterdir() if _SHARD.match(p.name)), key=_shard_number)


def _shard_number(path: epath.Path) -> int:
  return int(path.name.split(".")[0])


def log_files(path: epath.PathLike) -> list[epath.Path]:
  """The files holding the rows of `path`, in reading order (empty: no rows yet).

  `path`: a workdir (metrics.jsonl, then metrics/ shards), one `.jsonl` file, or a metrics/
  shard directory (`MetricsWriter.path` of an object-store workdir).
  """
  path = epath.Path(path)
  if path.name.endswith(".jsonl"):
    return [path] if path.exists() else []
  files = [path / LOG_NAME] if (path / LOG_NAME).exists() else []
  files += _shards(path / SHARD_DIR)
  if not files and path.name == SHARD_DIR:
    files = _shards(path)
  return files


@dataclasses.dataclass
class LogFile:
  path: epath.Path
  lines: list[bytes]  # the decodable lines, without their newline
  rows: list[dict[str, Any]]  # the same, decoded


@dataclasses.dataclass
class TornLine:
  path: epath.Path
  number: int  # 1-based line number in `path`
  text: bytes


def load(files: Sequence[epath.Path]) -> tuple[list[LogFile], TornLine | None]:
  """Reads and decodes `files` (from `log_files`). An undecodable last line of the last file with
  rows is returned as the TornLine; one anywhere else raises BadInputError naming file and line."""
  raw = []
  for path in files:
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1] == b"":
      lines.pop()
    raw.append((path, [(n, l) for n, l in enumerate(lines, 1) if l.strip()]))
  last = max((i for i, (_, entries) in enumerate(raw) if entries), default=-1)
  out, torn = [], None
  for i, (path, entries) in enumerate(raw):
    log = LogFile(path, [], [])
    for k, (number, line) in enumerate(entries):
      try:
        row = json.loads(line)
        if not isinstance(row, dict):
          raise ValueError(f"a JSON {type(row).__name__}")
      except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
        if i == last and k == len(entries) - 1:
          torn = TornLine(path, number, line)
          break
        raise BadInputError(f"{path}:{number}", f"not a JSON object ({str(e)[:120]}); every line "
                            "of a metrics log is one JSON object: fix or remove this line") from None
      log.lines.append(line)
      log.rows.append(row)
    out.append(log)
  return out, torn


def read_rows(path: epath.PathLike) -> list[dict[str, Any]]:
  """Every row of a workdir's metrics log (either layout), or of one `.jsonl` file, in order.

  A torn last line is skipped with one warning on stderr; the log itself is left as it is.
  """
  logs, torn = load(log_files(path))
  if torn is not None:
    print(f"warning: {torn.path}:{torn.number}: the last line is not complete JSON (cut off by a "
          "crash or a full disk, or still being written); ignored", file=sys.stderr, flush=True)
  return [row for log in logs for row in log.rows]


class MetricsWriter:
  """Writes rows to the metrics log and TensorBoard; a no-op on processes other than 0.

  `path`: metrics.jsonl (appended) or, on object stores, the metrics/ shard directory.
  sharded: force a layout (default: `uses_shards(workdir)`).
  """

  def __init__(self, workdir: epath.PathLike, enabled: bool = True, sharded: bool | None = None):
    workdir = epath.Path(workdir)
    self.enabled = enabled
    self.sharded = uses_shards(workdir) if sharded is None else sharded
    self.path = workdir / (SHARD_DIR if self.sharded else LOG_NAME)
    self._tb: Any = None
    self._file: Any = None
    self._shard, self._shard_rows = 0, []  # the current shard's number and rows
    if not enabled:
      return
    if not is_object_store(workdir):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if self.sharded:
        self.path.mkdir(exist_ok=True)
    if self.sharded:
      existing = _shards(self.path)
      self._shard = _shard_number(existing[-1]) + 1 if existing else 0
    else:
      unterminated = False
      if self.path.exists():
        with self.path.open("rb") as f:
          if f.seek(0, 2) > 0:
            f.seek(-1, 2)
            unterminated = f.read(1) != b"\n"
      self._file = self.path.open("a")
      if unterminated:  # a complete last row whose newline a crash cut off: keep rows apart
        self._file.write("\n")
    self._tb = _tensorboard(workdir / "tensorboard")

  def write(self, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(row, sort_keys=True) + "\n"
    if self.sharded:
      self._shard_rows.append(line)
      (self.path / f"{self._shard:06d}.jsonl").write_text("".join(self._shard_rows))
      if len(self._shard_rows) >= ROWS_PER_SHARD:
        self._shard, self._shard_rows = self._shard + 1, []
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      step = int(row["step"])
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _tensorboard(logdir: epath.PathLike) -> Any:
  """A tensorboardX SummaryWriter for `logdir`, or None (one note) where it cannot write."""
  url = str(logdir)
  if is_object_store(url):
    from tensorboardX import record_writer
    scheme = url.split("://", 1)[0]
    why = {"gs": "it needs google-cloud-storage (pip install 'mtjax[gcs]')",
           "s3": "it needs boto3"}.get(scheme, f"tensorboardX cannot write {scheme}://")
    ready = {"gs": record_writer.GCS_ENABLED, "s3": record_writer.S3_ENABLED}.get(scheme, False)
    if not ready:
      print(f"note: no TensorBoard events in {url}: {why}; the metrics log has the same scalars",
            file=sys.stderr, flush=True)
      return None
  from tensorboardX import SummaryWriter  # needs no TensorFlow
  return SummaryWriter(url)


def plot_per_task(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str],
                  out_dir: epath.Path, prefix: str = "train") -> list[epath.Path]:
  """One PNG per metric (loss, entropy, accuracy) with a curve per task against step; a row where
  a task has no value (no tokens in that log window) is skipped for that task, never drawn as 0."""
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
  return written + plot_controls(rows, task_names, out_dir)


def plot_controls(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str],
                  out_dir: epath.Path) -> list[epath.Path]:
  """train_weight.png / data_rate.png: each task's loss weight (as the step applied it: adaptive
  weighting included) and sampling rate against step; only for a run where they changed."""
  from matplotlib.figure import Figure

  written = []
  for key, label, name in (("train/{}/weight", "loss weight (as applied)", "train_weight"),
                           ("data/{}/rate", "sampling rate", "data_rate")):
    series = {t: [(r["step"], r[key.format(t)]) for r in rows if key.format(t) in r]
              for t in task_names}
    if all(len({v for _, v in pts}) <= 1 for pts in series.values()):
      continue  # constant over the run: nothing to look at
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.subplots()
    for t, pts in series.items():
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=t, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{label} per task")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    with path.open("wb") as f:
      fig.savefig(f, format="png")
    written.append(path)
  return written
