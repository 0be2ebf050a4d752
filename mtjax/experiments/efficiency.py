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

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config


def arm_config(base: Config, tasks: Sequence[str], steps: int, seed: int, eval_every: int) -> Config:
  keep = lambda m: {k: v for k, v in m.items() if k in tasks}
  return base.replace(**{
      "data.mixture_name": "", "data.tasks": tuple(tasks),
      "data.mixture": keep(base.data.mixture) or {t: 1.0 for t in tasks},
      "train.loss_weights": keep(base.train.loss_weights),
      "train.entropy_coefs": keep(base.train.entropy_coefs), "eval.tasks": (),
      "train.steps": steps, "seed": seed, "eval.every": eval_every, "checkpoint.every": 0,
      "train.progress": False})


def tokens_per_step(config: Config) -> int:
  return config.data.batch_size * config.data.seq_len


def curves(workdir: epath.Path, metric: str) -> dict[str, list[tuple[int, float]]]:
  """task -> [(step, value)] of eval/<task>/<metric> rows."""
  out: dict[str, list[tuple[int, float]]] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    for key, value in row.items():
      if key.startswith("eval/") and key.endswith(f"/{metric}"):
        out.setdefault(key.split("/")[1], []).append((row["step"], float(value)))
  return out


def first_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
  for step, value in curve:
    if value >= target:
      return step
  return None


def efficiency_ratio(single_steps: dict[str, int | None], multi_steps_all: int | None,
                     single_tokens_per_step: int, multi_tokens_per_step: int) -> float:
  if multi_steps_all is None or any(s is None for s in single_steps.values()):
    return math.nan
  single = sum(s * single_tokens_per_step for s in single_steps.values())
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


def run(base: Config, workdir: str, *, steps_per_task: int, seeds: Sequence[int], eval_every: int,
        target: float, metric: str = "accuracy", targets: dict[str, float] | None = None,
        train_fn=None) -> dict[str, Any]:
  """Trains both arms for every seed (skipping finished runs), writes summary.json and report.md."""
  from mtjax import train
  from mtjax.experiments import arms as arms_lib
  from mtjax.experiments import report
  train_fn = train_fn or train.run
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "study.json").write_text(json.dumps({
      "study": "efficiency", "config": base.to_dict(), "steps_per_task": steps_per_task,
      "seeds": list(seeds), "eval_every": eval_every, "target": target, "metric": metric,
      "targets": dict(targets or {})},
      indent=2) + "\n")
  tasks = list(base.data.tasks)
  goal = {t: float((targets or {}).get(t, target)) for t in tasks}
  per_seed = []
  for seed in seeds:
    arms = {f"single_{t}": arm_config(base, [t], steps_per_task, seed, eval_every) for t in tasks}
    arms["multi"] = arm_config(base, tasks, steps_per_task * len(tasks), seed, eval_every)
    for name, cfg in arms.items():
      arms_lib.run(root / f"seed{seed}", name, cfg, train_fn)
    tps = tokens_per_step(base)
    single_curves = {t: curves(root / f"seed{seed}" / f"single_{t}", metric)[t] for t in tasks}
    multi_curves = curves(root / f"seed{seed}" / "multi", metric)
    single_steps = {t: first_reach(single_curves[t], goal[t]) for t in tasks}
    multi_steps = {t: first_reach(multi_curves[t], goal[t]) for t in tasks}
    all_reached = None if any(s is None for s in multi_steps.values()) else max(multi_steps.values())
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
  summary = {
      "tasks": tasks, "seeds": list(seeds), "metric": metric, "target": target, "targets": goal,
      "steps_per_task": steps_per_task, "tokens_per_step": tokens_per_step(base),
      "per_seed": per_seed, "ratios": [s["ratio"] for s in per_seed],
      "verdict": verdict([math.nan if s["ratio"] is None else s["ratio"] for s in per_seed]),
  }
  (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  report.write_efficiency_report(root, summary)
  return summary


def _finite(x: float) -> float | None:
  return None if math.isnan(x) else x
