"""Orbax checkpoints of a run: train state, loader state, controls, resolved config, run facts.

The run facts record the state's `format_version` (mtjax.train.step.FORMAT_VERSION); restoring an
older layout migrates it (version 1 had no TrainState.extra; versions 1-2 kept one parameter
subtree per layer, version 3 stacks layers for the scan), a newer one is refused by name.

One CheckpointManager per run directory, saving asynchronously: the loop blocks only while the
arrays are copied off the devices; the write goes on in the background. Orbax writes into a
temporary directory and renames it when complete, so a save killed half-way is never picked up
(the run that next holds the workdir's lock removes such directories). Eval opens it read-only.

Retention keeps the latest `keep` AND the best `keep_best` by `best_metric` (both, through a
preservation policy; plain `best_fn` would keep only the best).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mtjax.config import CheckpointConfig, Config
from mtjax.errors import BadInputError

# Fields that must match to resume: they change the state's shapes or what the run is.
UNSAFE_ON_RESUME = ("model", "data.tasks", "data.tokenizer", "seed", "train.weighting.method",
                    "data.mixing.method", "rl.algorithm", "rl.prompts", "rl.samples")


def _changes_optimizer_state(field: str, was: Any, now: Any, saved: dict, config: Config) -> bool:
  """Optimizer settings whose change reshapes the optimizer state (so the checkpoint would not
  restore): an EMA turned on or off, and any param_groups change where a group freezes (scale 0:
  no optimizer state kept for it). Other values of these settings resume fine."""
  if field == "optimizer.ema":
    return (float(was or 0) > 0) != (float(now or 0) > 0)
  if field.startswith("optimizer.param_groups"):
    before = (saved.get("optimizer") or {}).get("param_groups") or {}
    return 0 in before.values() or 0 in config.optimizer.param_groups.values()
  return False


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
  """Dotted field -> (saved, now) for every field that differs. A field the saved config lacks
  (written before the field existed) counts as its default."""
  from mtjax.config import Config
  a = {**_flatten(json.loads(Config().to_json())), **_flatten(saved)}
  b = _flatten(now)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def set_aside_later_checkpoints(workdir: epath.Path, step: int) -> list[int]:
  """Moves checkpoints after `step` into workdir/abandoned_checkpoints/<time>/ (never deletes)."""
  directory = workdir / "checkpoints"
  later = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and int(p.name) > step) \
      if directory.exists() else []
  if later:
    target = workdir / "abandoned_checkpoints" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for s in later:
      (directory / str(s)).rename(target / str(s))
  return later


_TMP_STEP = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # Orbax's name for a save in progress


def remove_stale_temporaries(workdir: epath.Path) -> list[str]:
  """Removes `<step>.orbax-checkpoint-tmp*` directories (saves a crash left half-written).

  Only the holder of the workdir's lock may call this: another run's save in flight looks the
  same. Returns the names removed.
  """
  directory = workdir / "checkpoints"
  if not directory.exists():
    return []
  stale = sorted(p for p in directory.iterdir() if _TMP_STEP.match(p.name))
  for path in stale:
    path.rmtree()
  return [p.name for p in stale]


@contextlib.contextmanager
def _quiet_absl():
  """Orbax warns "Given directory is read only" on every read-only manager: not news here."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class Checkpointer:
  """read_only: list and restore only (eval): never creates checkpoints/, saves or deletes."""

  def __init__(self, workdir: epath.Path, cfg: CheckpointConfig, *, read_only: bool = False):
    self.directory = workdir / "checkpoints"
    self.cfg = cfg
    self.read_only = read_only
    if read_only:
      with _quiet_absl():
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False))
      return
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(cfg.keep)]
    if cfg.best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[cfg.best_metric], reverse=cfg.best_mode == "min",
          n=cfg.keep_best, keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)))

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.cfg.every > 0 and step > 0 and step % self.cfg.every == 0

  def save(self, step: int, state: Any, loader_state: dict, config: Config, run_facts: dict,
           metrics: dict[str, float] | None = None, controls: dict | None = None) -> bool:
    """Starts an async save; returns False if a checkpoint at or after `step` exists."""
    if self.read_only:
      raise RuntimeError(f"{self.directory}: this Checkpointer is read-only")
    from mtjax.train.state import FORMAT_VERSION
    if self.cfg.best_metric and not (metrics and self.cfg.best_metric in metrics):
      metrics = None  # kept by LatestN only
    # The JSON items are written by the async save's thread, later: a snapshot now, or a batch
    # source that keeps drawing (RL's prompt cursors) would record a later state than `step`'s.
    snapshot = lambda tree: json.loads(json.dumps(tree))
    with self._storage_errors():
      return self._manager.save(step, metrics=metrics, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          loader=ocp.args.JsonSave(snapshot(loader_state)),
          controls=ocp.args.JsonSave(snapshot(controls or {"feedback": []})),
          config=ocp.args.JsonSave(config.to_dict()),
          run=ocp.args.JsonSave(dict(run_facts, format_version=FORMAT_VERSION))))

  def _restore_json(self, step: int, item: str) -> dict:
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
      return restored[item]
    except Exception as e:  # a damaged checkpoint in any way: name it
      raise self._damaged(step, e) from None

  def _damaged(self, step: int, error: Exception) -> BadInputError:
    if not (self.directory / str(step)).exists():  # gone while being read: not damage
      kept = self.all_steps()
      return BadInputError(str(self.directory / str(step)), "was deleted while being read (the "
                           "running training's retention, checkpoint.keep, removed it); evaluate a "
                           f"step it keeps{f' (now {kept})' if kept else ''}, or raise "
                           "checkpoint.keep")
    earlier = [s for s in self.all_steps() if s < step]
    hint = f"; resume from an earlier one with --resume_from {earlier[-1]}" if earlier else ""
    return BadInputError(str(self.directory / str(step)),
                         f"checkpoint is damaged or incomplete ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}){hint}")

  def read_facts(self, step: int) -> tuple[dict, dict]:
    """(the saved config as a dict, the saved run facts) of a checkpoint."""
    return self._restore_json(step, "config"), self._restore_json(step, "run")

  def check_compatible(self, step: int, config: Config) -> dict[str, tuple[Any, Any]]:
    """Raises on unsafe config changes; returns the safe ones (to report)."""
    saved, _ = self.read_facts(step)
    changes = config_changes(saved, json.loads(config.to_json()))
    changes.pop("model.pinned", None)  # which flags were typed, not what the model is
    for field in changes:
      was, now = changes[field]
      if any(field == u or field.startswith(u + ".") for u in UNSAFE_ON_RESUME) \
          or _changes_optimizer_state(field, was, now, saved, config):
        raise BadInputError(field, f"is {now!r} but the checkpoint at step {step} in "
                            f"{self.directory} has {was!r}; this cannot change on resume (use a "
                            "new --workdir)")
    return changes

  def format_version(self, step: int) -> int:
    from mtjax.train.state import FORMAT_VERSION
    version = int(self.read_facts(step)[1].get("format_version", 1))
    if version > FORMAT_VERSION:
      raise BadInputError(str(self.directory / str(step)),
                          f"written in checkpoint format {version} by a newer mtjax; this one reads "
                          f"formats 1-{FORMAT_VERSION} (upgrade mtjax)")
    return version

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
    """Restores into the shapes and shardings of `like_state`: another mesh works (elastic)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
    version = self.format_version(step)
    if version <= 2:  # per-layer parameters (and, in version 1, no TrainState.extra)
      return self._restore_per_layer(step, like_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
    except Exception as e:
      raise self._damaged(step, e) from None
    return restored["state"], restored["loader"]

  def _restore_per_layer(self, step: int, like_state: Any) -> tuple[Any, dict]:
    """Formats 1-2 kept one subtree per layer (`layers/<i>/attn/q`); format 3 stacks them on a
    leading layer axis (`layers/attn/q`, scanned). Restores the saved tree as it is (no target),
    stacks every `layers/<i>/...` leaf into the state's `layers/...` leaf, and places each leaf
    in `like_state`'s sharding; a leaf the old format lacked (TrainState.extra) keeps
    `like_state`'s value."""
    import numpy as np

    from mtjax.tree import param_path
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), loader=ocp.args.JsonRestore()))
    except Exception as e:
      raise self._damaged(step, e) from None
    saved = {param_path(p): leaf
             for p, leaf in jax.tree_util.tree_flatten_with_path(restored["state"])[0]}
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(like_state)
    leaves = []
    for path, like in paths_and_leaves:
      parts = param_path(path).split("/")
      if "/".join(parts) in saved:  # already stacked (or not a layer leaf)
        value = np.asarray(saved["/".join(parts)])
      elif "layers" in parts:
        at = parts.index("layers") + 1
        names = ["/".join(parts[:at] + [str(i)] + parts[at:]) for i in range(like.shape[0])]
        missing = [n for n in names if n not in saved]
        if missing:
          raise BadInputError(str(self.directory / str(step)), f"format 2 checkpoint lacks "
                              f"{missing[0]} for {'/'.join(parts)} of shape {like.shape}")
        value = np.stack([np.asarray(saved[n]) for n in names])
      else:
        leaves.append(like)
        continue
      if value.shape != like.shape:
        raise BadInputError(str(self.directory / str(step)), f"{'/'.join(parts)} has shape "
                            f"{value.shape}, the model expects {like.shape}")
      leaves.append(jax.device_put(value.astype(like.dtype), like.sharding))
    return jax.tree_util.tree_unflatten(treedef, leaves), restored["loader"]

  def restore_controls(self, step: int) -> dict | None:
    """The pending fed-back weights and coefficients (None for checkpoints without them)."""
    if not (self.directory / str(step) / "controls").exists():
      return None
    return self._restore_json(step, "controls")

  def wait(self) -> None:
    with self._storage_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._storage_errors():
      self._manager.wait_until_finished()
    self._manager.close()

  @contextlib.contextmanager
  def _storage_errors(self) -> Iterator[None]:
    """Orbax reports a full disk from its save threads as ValueError("RESOURCE_EXHAUSTED: ...
    Failed writing ..."): raised as the OSError it is (the CLI prints one line; the unfinished
    save stays a *.orbax-checkpoint-tmp that the next start removes, earlier steps intact)."""
    try:
      yield
    except ValueError as e:
      text = str(e)
      if "RESOURCE_EXHAUSTED" not in text and "No space left" not in text:
        raise
      raise OSError(errno.ENOSPC, f"No space left on device (the checkpoint save failed: "
                    f"{text.splitlines()[0][:160]})", str(self.directory)) from None
