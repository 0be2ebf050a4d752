"""Orbax checkpoints: train state (params, optimizer, step, skip counters), loader state, config.

One CheckpointManager per run directory, saving asynchronously (training continues while a
save is written). Orbax finalizes a step only once it is complete, so a killed save is never
picked up by `latest_step`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError

# Config fields that must match to resume: they change the state's shapes or its meaning.
_UNSAFE_ON_RESUME = ("model", "data.tasks", "seed")


def _get(tree: dict, dotted: str) -> Any:
  for key in dotted.split("."):
    tree = tree[key]
  return tree


class Checkpointer:

  def __init__(self, workdir: epath.Path, every: int, keep: int):
    self.directory = workdir / "checkpoints"
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step > 0 and step % self.every == 0

  def save(self, step: int, state: Any, loader_state: dict, config: Config) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        loader=ocp.args.JsonSave(loader_state),
        config=ocp.args.JsonSave(config.to_dict())))

  def restore(self, step: int, like_state: Any, config: Config) -> tuple[Any, dict]:
    """Restores into the shapes and shardings of `like_state` (may be another mesh)."""
    saved_config = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config
    now = json.loads(config.to_json())
    for field in _UNSAFE_ON_RESUME:
      if _get(saved_config, field) != _get(now, field):
        raise BadInputError(field, f"differs from the checkpoint at step {step} in "
                            f"{self.directory} (saved {_get(saved_config, field)!r}); use a new "
                            "--workdir for a different model or task list")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise BadInputError(str(self.directory / str(step)),
                          f"checkpoint could not be restored ({type(e).__name__}: {e})") from None
    return restored.state, restored.loader

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
