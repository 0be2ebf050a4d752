"""Task mixing: sampling rates, their schedule over steps, and the sampler that applies them.

This is the one module that decides how often each task is SAMPLED (the loss weights, how much
a task COUNTS, live in the train step).

- Rates: explicit weights, or examples-proportional with a cap and a temperature as in SeqIO:
  rate_t proportional to min(n_t * scale, cap) ** (1 / temperature).
- Schedule: constant; stages [(start_step, weights), ...]; linear interpolation between stages;
  and weights fed back by the trainer, which take effect at a fixed lag (see MixtureLoader).
- Sampler: smooth weighted round-robin. Each draw adds every task's rate to its credit and picks
  the task with the most credit (which then pays 1). Shares follow the rates exactly (within one
  example per task, at any step), react at once to a new rate, need no random numbers, and the
  state is T floats. A task at rate 0 is never drawn.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from mtjax.config import Config


def examples_proportional(sizes: Sequence[int], *, cap: int = 0, temperature: float = 1.0,
                          scale: float = 1.0) -> np.ndarray:
  """SeqIO's examples-proportional rates: min(n * scale, cap) ** (1 / temperature), normalized."""
  n = np.asarray(sizes, np.float64) * scale
  if cap:
    n = np.minimum(n, cap)
  r = n ** (1.0 / temperature)
  return r / r.sum()


def normalized(weights: npt.ArrayLike) -> np.ndarray:
  w = np.maximum(np.asarray(weights, np.float64), 0.0)
  total = w.sum()
  if total <= 0:
    raise ValueError(f"mixture weights must have a positive sum, got {w.tolist()}")
  return w / total


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Sampling rates as a function of step. `points` are (start_step, weights[T]) sorted by step."""

  task_names: tuple[str, ...]
  points: tuple[tuple[int, tuple[float, ...]], ...]
  kind: str = "constant"  # constant | stages | linear

  @classmethod
  def constant(cls, task_names: Sequence[str],
               weights: Mapping[str, float] | Sequence[float] | np.ndarray) -> Schedule:
    return cls(tuple(task_names), ((0, _vector(task_names, weights)),), "constant")

  @classmethod
  def stages(cls, task_names: Sequence[str], stages: Sequence[tuple[int, Mapping[str, float]]],
             *, linear: bool = False) -> Schedule:
    points = tuple((int(s), _vector(task_names, w)) for s, w in stages)
    return cls(tuple(task_names), points, "linear" if linear else "stages")

  def stage_start(self, step: int) -> int:
    """The start step of the stage (or interpolation segment) that `step` falls in."""
    starts = [s for s, _ in self.points]
    return starts[max(bisect.bisect_right(starts, step) - 1, 0)] if step >= starts[0] else 0

  def at(self, step: int) -> np.ndarray:
    starts = [s for s, _ in self.points]
    i = max(bisect.bisect_right(starts, step) - 1, 0)
    w = np.asarray(self.points[i][1], np.float64)
    if self.kind == "linear" and i + 1 < len(self.points) and step >= starts[0]:
      (s0, w0), (s1, w1) = self.points[i], self.points[i + 1]
      frac = (step - s0) / (s1 - s0)
      w = (1 - frac) * np.asarray(w0) + frac * np.asarray(w1)
    return normalized(w)


def _vector(task_names: Sequence[str],
            weights: Mapping[str, float] | Sequence[float] | np.ndarray) -> tuple[float, ...]:
  if isinstance(weights, Mapping):
    return tuple(float(weights.get(n, 0.0)) for n in task_names)
  return tuple(float(w) for w in weights)


class Sampler:
  """Smooth weighted round-robin over tasks; `credits` is its whole (JSON-able) state."""

  def __init__(self, num_tasks: int, credits: Sequence[float] | None = None):
    self.credits = np.zeros(num_tasks) if credits is None else np.asarray(credits, np.float64)

  def draw(self, rates: np.ndarray) -> int:
    self.credits += rates
    masked = np.where(rates > 0, self.credits, -np.inf)
    task = int(np.argmax(masked))  # ties: the lowest task index
    self.credits[task] -= 1.0
    return task

  def state(self) -> list[float]:
    return [float(c) for c in self.credits]


def schedule_from_config(config: Config) -> Schedule:
  """The run's sampling-rate schedule from `data.{mixture, rates, schedule, stages}`."""
  from mtjax import tasks as task_registry
  d = config.data
  if d.schedule in ("stages", "linear"):
    return Schedule.stages(d.tasks, d.stages, linear=d.schedule == "linear")
  if d.rates == "examples_proportional":
    sizes = [len(task_registry.get(n).source.load("train", config.seed, d.on_bad_record).examples)
             for n in d.tasks]
    rates = examples_proportional(sizes, cap=d.rate_cap, temperature=d.rate_temperature,
                                  scale=d.rate_scale)
    return Schedule.constant(d.tasks, rates)
  return Schedule.constant(d.tasks, d.mixture)
