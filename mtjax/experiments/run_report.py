"""`mtjax report RUN_DIR` on a training run (not a study): report.md from what the run wrote.

Per task: its source and scorer (tasks.json), the last logged train loss and next-token accuracy,
data counts (truncated, too long, skipped), and every evaluation (in-training eval rows of the
metrics log and `mtjax eval` files under eval/), newest step last; plus the run's plots. Nothing
is recomputed: the report is a view of the run directory.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from mtjax.errors import BadInputError
from mtjax.experiments import report
from mtjax.train import metrics as metrics_lib


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return "-" if value is None else str(value)


def evaluations(root: epath.Path) -> list[dict[str, Any]]:
  """Eval rows by step: the metrics log's, overridden by `mtjax eval` files for the same step."""
  by_step: dict[int, dict[str, Any]] = {}
  for row in metrics_lib.read_rows(root):
    if any(k.startswith("eval/") for k in row):
      by_step.setdefault(int(row["step"]), {}).update(row)
  for path in sorted((root / "eval").glob("step_*.json")) if (root / "eval").exists() else []:
    try:
      row = json.loads(path.read_text())
    except ValueError as e:
      raise BadInputError(str(path), f"not valid JSON ({e})") from None
    by_step.setdefault(int(row["step"]), {}).update(row)
  return [by_step[s] for s in sorted(by_step)]


SAMPLES_SHOWN = 3  # generations per task in report.md (all of them are in the .samples.jsonl)


def _samples_section(doc: report.Report, root: epath.Path) -> None:
  """A few greedy generations per task from the latest `mtjax eval` that wrote any."""
  files = sorted((root / "eval").glob("step_*.samples.jsonl"),
                 key=lambda p: int(p.name.split("_")[1].split(".")[0])) if (root / "eval").exists() else []
  if not files:
    return
  latest = files[-1]
  shown: dict[str, int] = {}
  rows = []
  for line in latest.read_text().splitlines():
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except ValueError as e:
      raise BadInputError(str(latest), f"not valid JSON lines ({e})") from None
    if shown.get(r["task"], 0) < SAMPLES_SHOWN:
      shown[r["task"]] = shown.get(r["task"], 0) + 1
      rows.append([r["task"], _clip(r["prompt"]), _clip(r["output"]), _clip(r["reference"]),
                   "yes" if r["correct"] else "no"])
  doc.heading("Generations")
  doc.text(f"The first {SAMPLES_SHOWN} greedy outputs per task from `{latest.name}` (every scored "
           "prompt is in that file: prompt, output, reference, correct).")
  doc.table(["task", "prompt", "output", "reference", "correct"], rows)


def _clip(text: str, width: int = 60) -> str:
  text = " ".join(str(text).split()).replace("|", "\\|")
  return f"`{text[:width]}{'…' if len(text) > width else ''}`"


def write(workdir: str | epath.PathLike) -> epath.Path:
  root = epath.Path(workdir)
  if not (root / "config.json").exists():
    raise BadInputError(str(root), "not a run directory (no config.json) nor a study directory")
  config = json.loads((root / "config.json").read_text())
  record = json.loads((root / "tasks.json").read_text()) if (root / "tasks.json").exists() else {}
  names = list(config["data"]["tasks"])
  rows = [r for r in metrics_lib.read_rows(root) if "train/loss" in r]
  last = rows[-1] if rows else {}
  doc = report.Report(f"Run report: {root.name}")
  doc.text(f"Config: `config.json` (seed {config['seed']}, {config['train']['steps']} steps, "
           f"batch {config['data']['batch_size']} x {config['data']['seq_len']} tokens, "
           f"truncate={config['data'].get('truncate', 'right')}).")
  if last:
    doc.text(f"Last logged step {last['step']}: {metrics_lib.loss_summary(last, names)}.")
  header = ["task", "source", "scorer", "rate", "train loss", "train token acc", "truncated",
            "too long", "skipped"]
  table = []
  for name in names:
    entry = record.get(name, {})
    table.append([name, entry.get("kind", "?"), entry.get("scorer", "builtin" if entry else "?"),
                  _fmt(last.get(f"data/{name}/rate")), _fmt(last.get(f"train/{name}/loss")),
                  _fmt(last.get(f"train/{name}/accuracy")), _fmt(last.get(f"data/{name}/truncated")),
                  _fmt(last.get(f"data/{name}/too_long")), _fmt(last.get(f"data/{name}/skipped"))])
  doc.heading("Training")
  doc.table(header, table)
  evals = evaluations(root)
  if evals:
    tasks = sorted({k.split("/")[1] for row in evals for k in row if k.startswith("eval/")})
    metrics = ("accuracy", "loss", "token_accuracy", "skipped", "max_new_tokens")
    doc.heading("Evaluation (held-out splits)")
    doc.text("accuracy: greedy outputs judged by the task's scorer; loss and token_accuracy: "
             "teacher-forced; skipped: prompts that did not fit; max_new_tokens: the budget.")
    table = []
    for row in evals:
      for task in tasks:
        if any(f"eval/{task}/{m}" in row for m in metrics):
          table.append([str(row["step"]), task, *(_fmt(row.get(f"eval/{task}/{m}")) for m in metrics)])
    doc.table(["step", "task", *metrics], table)
    _samples_section(doc, root)
  else:
    doc.text("No evaluation yet: `mtjax eval --workdir " + str(root) + "` writes one.")
  plots = sorted((root / "plots").glob("*.png")) if (root / "plots").exists() else []
  if plots:
    doc.heading("Plots")
    doc.text("\n".join(f"![{p.stem}](plots/{p.name})" for p in plots))
  return report.write(root, doc)
