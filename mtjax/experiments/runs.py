"""Runs that are trained once: the DONE marker shared by study arms and sweep variants.

A run directory is marked DONE only after its training finished, so an interrupted study or sweep
reruns just the unfinished runs (each resuming from its own checkpoints). A run stopped by a
preemption signal is not finished: `run_once` raises `Preempted` and the CLI exits 3. A finished
run is reused only for the config it was trained with: a study or sweep rerun into a workdir whose
finished arm stored different settings (an edited config, a changed default) stops with exit 2
naming the field, instead of mixing stale arms into a new result.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
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
  if train_fn is stored_only:  # a report rebuilt from the arms as they are: nothing trains
    if not is_done(run_dir):
      stored_only(config, run_dir)
    return False
  check_same_config(run_dir, config)  # finished, or interrupted and about to resume
  if is_done(run_dir):
    return False
  if announce:
    print(announce, flush=True)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / REQUESTED).write_text(json.dumps(_requested(run_dir, config), indent=2,
                                              sort_keys=True) + "\n")
  result = train_fn(config, run_dir)
  if getattr(result, "preempted", False):
    message = (f"{run_dir} was interrupted by a preemption signal (saved, not DONE); "
               "run the same command again to resume")
    print(f"stopped: {message}", file=sys.stderr, flush=True)
    raise Preempted(message)
  mark_done(run_dir, payload)
  return True


REQUESTED = "requested_config.json"  # the config as the study or sweep asked for it
# How a run is operated, never what it computes: never a reason to call an arm stale.
OPERATIONAL = ("train.progress", "train.compilation_cache", "train.compilation_cache_dir",
               "train.platform", "train.preemption_every", "checkpoint.every", "checkpoint.keep")
# An interrupted run may also be resumed to a different length (the trainer continues to it).
MAY_CHANGE_ON_RESUME = ("train.steps",)


def stored_only(config: Config, run_dir: epath.Path) -> None:
  """The train_fn of a report rebuilt from stored runs (`mtjax report`): an unfinished run is an
  error, and finished ones are read whatever settings the current code would ask for."""
  del config
  raise BadInputError(str(run_dir), "this run is not finished; run the study to complete it")


def check_same_config(run_dir: epath.Path, config: Config) -> None:
  """BadInputError when the run at `run_dir` (finished or interrupted) was asked for a setting
  different from `config`'s. Compared with the requested config run_once stored (the run's own
  config.json holds resolved values: head_dim, vocab_size); fields only one side has (written
  before a field existed) are not compared, nor runs started before this record existed.
  OPERATIONAL fields are never compared; an interrupted run may also change its length."""
  stored_path = run_dir / REQUESTED
  if not stored_path.exists():
    return
  stored, now = _flat(json.loads(stored_path.read_text())), _flat(_requested(run_dir, config))
  ignored = OPERATIONAL + (() if is_done(run_dir) else MAY_CHANGE_ON_RESUME)
  differ = [k for k in sorted(stored.keys() & now.keys())
            if stored[k] != now[k] and k not in ignored]
  if differ:
    k = differ[0]
    more = f" (and {len(differ) - 1} other field(s): {', '.join(differ[1:4])})" if len(differ) > 1 else ""
    raise BadInputError(str(run_dir), f"this run was started with {k}={stored[k]!r}, "
                        f"the config now asks {k}={now[k]!r}{more}; use a new --workdir, or "
                        f"delete {run_dir} to retrain it")


def _requested(run_dir: epath.Path, config: Config) -> dict[str, Any]:
  """The config as JSON values, paths inside the run's parent directory made relative to it (an
  arm that starts from a sibling's export still matches after the study directory moves)."""
  parent = str(run_dir.parent) + "/"
  return json.loads(config.to_json().replace(json.dumps(parent)[1:-1], "<parent>/"))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and v:
      out |= _flat(v, f"{prefix}{k}.")
    else:
      out[f"{prefix}{k}"] = v
  return out


def rows(run_dir: epath.Path) -> list[dict[str, Any]]:
  """The run's metric rows (metrics.jsonl, or its shards on object stores; blank lines skipped);
  no metrics at all is an error."""
  from mtjax.train import metrics  # lazy: importing mtjax.train loads JAX
  if not metrics.log_files(run_dir):
    raise BadInputError(str(metrics.log_path(run_dir)), "missing: this run never ran")
  return metrics.read_rows(run_dir)
