"""The checkpoints' config group (checkpoint.*): cadence and retention; its checks."""

from __future__ import annotations

import dataclasses

from mtjax.errors import BadInputError

@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # 0: only at the end
  keep: int = 3  # the latest K are kept ...
  best_metric: str = ""  # ... and also the best by this logged metric (e.g. "train/loss")
  best_mode: str = "min"  # min | max
  keep_best: int = 1


def check(c: CheckpointConfig) -> None:
  for field, value in (("keep", c.keep), ("keep_best", c.keep_best)):
    if value <= 0:
      raise BadInputError(f"checkpoint.{field}", f"expected a positive integer, got {value}")
  if c.every < 0:
    raise BadInputError("checkpoint.every", f"expected a value >= 0, got {c.every}")
  if c.best_mode not in ("min", "max"):
    raise BadInputError("checkpoint.best_mode", f"expected one of min, max, got {c.best_mode!r}")
