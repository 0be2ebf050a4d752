"""What every study shares: arm configs, runs that are skipped once DONE, reading stored metrics.

An arm is one training run of a study, in `<study workdir>/seed<S>/<arm name>`; it is marked DONE
only after it finished, so an interrupted study reruns just the unfinished arms.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError

DONE = "DONE"


def configure(base: Config, *, seed: int, steps: int, eval_every: int,
              mixture: Mapping[str, float] | None = None,
              stages: Sequence[tuple[int, Mapping[str, float]]] | None = None,
              **dotted: Any) -> Config:
  """The base config as one arm: all base tasks stay in data.tasks (so every task is evaluated),
  trained on `mixture` (constant) or on `stages`; no checkpoints but the last, no progress bar."""
  tasks = base.data.tasks
  changes = {"data.mixture_name": "", "seed": seed, "train.steps": steps, "eval.every": eval_every,
             "eval.tasks": (), "checkpoint.every": 0, "train.progress": False}
  if stages is not None:
    changes.update({"data.schedule": "stages", "data.mixture": {},
                    "data.stages": tuple((int(s), {t: float(w.get(t, 0.0)) for t in tasks})
                                         for s, w in stages)})
  else:
    mixture = mixture or {t: base.data.mixture.get(t, 1.0) for t in tasks}
    changes.update({"data.schedule": "constant", "data.stages": (),
                    "data.mixture": {t: float(mixture.get(t, 0.0)) for t in tasks}})
  changes.update(dotted)
  return base.replace(**changes)


def sequential_stages(order: Sequence[str], steps_per_task: int) -> list[tuple[int, dict[str, float]]]:
  return [(i * steps_per_task, {t: 1.0}) for i, t in enumerate(order)]


def run(root: epath.Path, name: str, cfg: Config, train_fn: Callable) -> epath.Path:
  """Trains one arm unless it is already DONE; returns its workdir."""
  arm_dir = root / name
  if not (arm_dir / DONE).exists():
    print(f"study: {root.name}/{name} ({cfg.train.steps} steps)", flush=True)
    train_fn(cfg, arm_dir)
    (arm_dir / DONE).write_text("")
  return arm_dir


def rows(arm_dir: epath.Path) -> list[dict[str, Any]]:
  path = arm_dir / "metrics.jsonl"
  if not path.exists():
    raise BadInputError(str(path), "missing: this arm never ran")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_series(arm_dir: epath.Path, task: str, metric: str) -> list[tuple[int, float]]:
  key = f"eval/{task}/{metric}"
  return [(r["step"], float(r[key])) for r in rows(arm_dir) if key in r]


def train_series(arm_dir: epath.Path, task: str, metric: str) -> list[tuple[int, float]]:
  key = f"train/{task}/{metric}"
  return [(r["step"], float(r[key])) for r in rows(arm_dir) if key in r]


def eval_at(arm_dir: epath.Path, step: int, tasks: Sequence[str], metric: str) -> list[float]:
  """Scores of `tasks` at the eval row of `step`."""
  for r in rows(arm_dir):
    if r.get("step") == step and f"eval/{tasks[0]}/{metric}" in r:
      return [float(r[f"eval/{t}/{metric}"]) for t in tasks]
  raise BadInputError(str(arm_dir / "metrics.jsonl"), f"no eval row at step {step}")


def final_eval(arm_dir: epath.Path, tasks: Sequence[str], metric: str) -> dict[str, float]:
  last = [r for r in rows(arm_dir) if f"eval/{tasks[0]}/{metric}" in r][-1]
  return {t: float(last[f"eval/{t}/{metric}"]) for t in tasks}


def write_study_json(root: epath.Path, study: str, base: Config) -> None:
  root.mkdir(parents=True, exist_ok=True)
  (root / "study.json").write_text(json.dumps({"study": study, "config": base.to_dict()}, indent=2) + "\n")


def mean_std(values: Sequence[float], digits: int = 3) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def save_figure(fig, path: epath.Path) -> epath.Path:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
