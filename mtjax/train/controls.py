"""Per-step task weights and entropy coefficients: the step's array inputs, decided on the host.

Each step gets `loss_weights[T]` (train.loss_weights, default 1) and `entropy_coefs[T]`
(train.entropy_coefs: a constant, or (start, end) interpolated linearly over train.steps). A hook
may set new values once s steps are done; they apply from step s + data.feedback_lag, the same
lag as fed-back sampling rates, so a decision never races prefetched work and a resumed run (the
pending decisions are checkpointed) replays the same values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtjax.config import Config

EntropyCoef = float | tuple[float, float]
KINDS = ("loss_weights", "entropy_coefs")


def entropy_coef_at(coef: EntropyCoef, step: int, total_steps: int) -> float:
  """A constant, or (start, end) interpolated linearly from step 0 to total_steps."""
  if isinstance(coef, tuple):
    start, end = coef
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start + (end - start) * frac
  return coef


class Controls:
  """`at(step) -> (loss_weights[T], entropy_coefs[T])`; `set(...)` feeds back new values."""

  def __init__(self, task_names: Sequence[str], loss_weights: Mapping[str, float],
               entropy_coefs: Mapping[str, EntropyCoef], total_steps: int, lag: int,
               state: Mapping[str, Any] | None = None):
    self.task_names = tuple(task_names)
    self.loss_weights = np.array([loss_weights.get(n, 1.0) for n in self.task_names], np.float32)
    self.entropy_coefs = [entropy_coefs.get(n, 0.0) for n in self.task_names]
    self.total_steps, self.lag = total_steps, lag
    # [[effective step, kind, [T values]], ...] in the order decided
    self.state: dict[str, Any] = copy.deepcopy(dict(state)) if state else {"feedback": []}

  @classmethod
  def from_config(cls, config: Config, state: Mapping[str, Any] | None = None) -> Controls:
    return cls(config.data.tasks, config.train.loss_weights, config.train.entropy_coefs,
               config.train.steps, config.data.feedback_lag, state)

  def _latest(self, kind: str, step: int) -> np.ndarray | None:
    values = [v for s, k, v in self.state["feedback"] if k == kind and s <= step]
    return np.asarray(values[-1], np.float32) if values else None

  def at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    weights = self._latest("loss_weights", step)
    coefs = self._latest("entropy_coefs", step)
    if coefs is None:
      coefs = np.array([entropy_coef_at(c, step, self.total_steps) for c in self.entropy_coefs],
                       np.float32)
    return (self.loss_weights if weights is None else weights), coefs

  def set(self, done: int, *, loss_weights: Mapping[str, float] | None = None,
          entropy_coefs: Mapping[str, float] | None = None) -> int:
    """Values decided once `done` steps are finished (tasks not named keep their current value);
    returns the step from which they apply."""
    effective = done + self.lag
    current = dict(zip(KINDS, self.at(effective)))
    for kind, values in zip(KINDS, (loss_weights, entropy_coefs)):
      if values is not None:
        unknown = set(values) - set(self.task_names)
        if unknown:
          raise KeyError(f"{kind}: not tasks of this run: {sorted(unknown)}")
        vector = [float(values.get(n, current[kind][i])) for i, n in enumerate(self.task_names)]
        self.state["feedback"].append([effective, kind, vector])
    return effective
