"""Runs that are trained once: the DONE marker shared by study arms and sweep variants.

A run directory is marked DONE only after its training finished, so an interrupted study or sweep
reruns just the unfinished runs (each resuming from its own checkpoints). A run stopped by a
preemption signal is not finished: `run_once` raises `Preempted` and the CLI exits 3.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError

DONE = "DONE"


class Preempted(Exception):
  """A run was stopped by a preemption signal after saving; run the same command to resume."""


def is_done(run_dir: epath.Path) -> bool:
  return (run_dir / DONE).exists()


def mark_done(run_dir: epath.Path, payload: str = "") -> None:
  """Writes the DONE marker; `payload` is its text (a sweep records its variant there)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / DONE).write_text(payload)


def run_once(run_dir: epath.Path, config: Config, train_fn: Callable[[Config, epath.Path], Any], *,
             announce: str = "", payload: str = "") -> bool:
  """Trains `config` into `run_dir` unless it is DONE; returns whether it trained.

  `train_fn(config, run_dir)` returns a `mtjax.train.RunResult` (or None: finished). A result
  with `preempted` set leaves the run unmarked and raises `Preempted`.
  """
  if is_done(run_dir):
    return False
  if announce:
    print(announce, flush=True)
  result = train_fn(config, run_dir)
  if getattr(result, "preempted", False):
    message = (f"{run_dir} was interrupted by a preemption signal (saved, not DONE); "
               "run the same command again to resume")
    print(f"stopped: {message}", file=sys.stderr, flush=True)
    raise Preempted(message)
  mark_done(run_dir, payload)
  return True


def rows(run_dir: epath.Path) -> list[dict[str, Any]]:
  """The run's metric rows (metrics.jsonl, or its shards on object stores; blank lines skipped);
  no metrics at all is an error."""
  from mtjax.train import metrics  # lazy: importing mtjax.train loads JAX
  if not metrics.log_files(run_dir):
    raise BadInputError(str(metrics.log_path(run_dir)), "missing: this run never ran")
  return metrics.read_rows(run_dir)
