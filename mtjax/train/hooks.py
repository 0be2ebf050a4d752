"""Hooks: everything the loop does besides next batch -> step. Each runs at its own cadence.

A hook may act before step s (the state holds s finished steps: eval, checkpoint), after a step
(`done` steps finished: log, progress, profile, feedback, preemption), at the end of the loop,
and on close (always, also after an error). `every` is its cadence in steps (0: only where it
says). Hooks run in list order; `default_hooks` gives the order the loop's docstring states.
A hook may feed back sampling rates (`loop.source.set_rates`) and per-task loss weights or entropy
coefficients (`loop.controls.set`): what it decides once s steps are done applies from step
s + data.feedback_lag.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm import tqdm

from mtjax.train import metrics as metrics_lib

if TYPE_CHECKING:
  from mtjax.train.loop import Loop, StepOutput


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps."""


def say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class Hook:
  every: int = 0

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def before_step(self, loop: Loop, step: int) -> None:
    pass

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    pass

  def flush(self, loop: Loop) -> None:
    """Write out anything held back (the loop asks before eval, a save or the end)."""

  def at_end(self, loop: Loop) -> None:
    """The loop finished train.steps (not called when it stopped early)."""

  def close(self, loop: Loop) -> None:
    pass


class LogHook(Hook):
  """metrics.jsonl / TensorBoard rows every train.log_every steps and at the last step.

  Step s's metrics are fetched after step s + 1 was dispatched, so reading them never stalls the
  device; the non-finite guard (train.max_consecutive_skips) is checked on the rows read.
  """

  def __init__(self, every: int, max_consecutive_skips: int):
    self.every, self.max_consecutive_skips = every, max_consecutive_skips
    self._pending: StepOutput | None = None
    self._window_start, self._tokens, self._steps = time.perf_counter(), 0, 0
    self._save_block_s: list[float] = []

  def record_save(self, seconds: float) -> None:
    self._save_block_s.append(seconds)

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    self.flush(loop)  # the previous step's metrics: this step is already dispatched
    self._tokens += out.batch.tokens
    self._steps += 1
    if out.done % self.every == 0 or out.done == loop.total:
      self._pending = out

  def flush(self, loop: Loop) -> None:
    out, self._pending = self._pending, None
    if out is None:
      return
    host = jax.device_get(out.metrics)
    elapsed = time.perf_counter() - self._window_start
    row = metrics_lib.train_row(out.done, host, loop.task_names, out.task_weights, out.entropy_coefs)
    row.update(out.batch.info)
    row["perf/step_time_s"] = elapsed / max(self._steps, 1)
    row["perf/tokens_per_s"] = self._tokens / elapsed
    row["perf/compiles"] = loop.compiles.count
    if self._save_block_s:
      row["perf/checkpoint_block_s"] = float(np.mean(self._save_block_s))
      self._save_block_s.clear()
    loop.write(row)
    self._window_start, self._tokens, self._steps = time.perf_counter(), 0, 0
    skips = int(host["consecutive_skips"])
    if skips >= self.max_consecutive_skips:
      good = loop.checkpointer.latest_step()
      raise TrainingDiverged(
          f"step {out.done}: {skips} consecutive steps had a non-finite loss or gradient norm "
          f"(train.max_consecutive_skips={self.max_consecutive_skips}); last good checkpoint: "
          + (f"step {good} in {loop.checkpointer.directory}" if good is not None else "none"))

  def at_end(self, loop: Loop) -> None:
    self.flush(loop)


class ProgressHook(Hook):
  """A tqdm bar on process 0, with the last logged loss and throughput."""

  def __init__(self, enabled: bool):
    self.enabled = enabled and jax.process_index() == 0
    self._bar: Any = None
    self._shown = -1

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    if not self.enabled:
      return
    if self._bar is None:
      self._bar = tqdm(total=loop.total, initial=loop.start, dynamic_ncols=True, desc="train")
    self._bar.update(1)
    row = loop.last_train_row
    if row and row["step"] != self._shown:
      self._shown = row["step"]
      self._bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")

  def close(self, loop: Loop) -> None:
    if self._bar is not None:
      self._bar.close()


class EvalHook(Hook):
  """Held-out eval (eval/<task>/<metric> rows) every eval.every steps, at step 0 and at the end."""

  def __init__(self, every: int, make_evaluator):
    self.every = every
    self._make_evaluator = make_evaluator  # built on first use: eval data and compiles cost time
    self._evaluator = None

  def _run(self, loop: Loop, step: int) -> None:
    loop.flush()
    if self._evaluator is None:
      self._evaluator = self._make_evaluator()
    loop.write(self._evaluator(loop.state.params, step))

  def before_step(self, loop: Loop, step: int) -> None:
    if self.due(step) and (step > loop.start or step == 0):
      self._run(loop, step)

  def at_end(self, loop: Loop) -> None:
    if self.every and loop.total > loop.start:
      self._run(loop, loop.total)


class CheckpointHook(Hook):
  """Async Orbax saves every checkpoint.every steps and a final one; the best metric (if any) is
  read from the rows logged so far."""

  def __init__(self, every: int, log: LogHook | None = None):
    self.every, self._log = every, log

  def before_step(self, loop: Loop, step: int) -> None:
    if self.due(step) and step > loop.start:
      self.save(loop, step)

  def save(self, loop: Loop, step: int) -> None:
    loop.flush()  # the rows up to `step` (and a divergence they show) come first
    t0 = time.perf_counter()
    loop.save(step)
    if self._log is not None:
      self._log.record_save(time.perf_counter() - t0)

  def at_end(self, loop: Loop) -> None:
    if loop.checkpointer.latest_step() != loop.total:
      self.save(loop, loop.total)


class PreemptionHook(Hook):
  """SIGTERM/SIGINT (all processes agree on the step): save at the step reached, stop; exit 3."""

  def __init__(self, checkpoint: CheckpointHook):
    self._checkpoint = checkpoint

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    if loop.guard.should_stop(out.done) and out.done < loop.total:
      self._checkpoint.save(loop, out.done)
      loop.stop(preempted=True)
      say(f"preempted by signal {loop.guard.received}: saved step {out.done}; run the same "
          "command again to resume")


@dataclasses.dataclass
class ProfileHook(Hook):
  """A JAX profiler trace of steps [start_at, stop_at) in workdir/profile."""

  start_at: int
  stop_at: int
  _active: bool = False

  def before_step(self, loop: Loop, step: int) -> None:
    if step == self.start_at:
      jax.profiler.start_trace(str(loop.workdir / "profile"))
      self._active = True

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    if self._active and out.done in (self.stop_at, loop.total):
      jax.block_until_ready(out.metrics)
      self.close(loop)
      say(f"profile of steps {self.start_at}..{out.done - 1}: {loop.workdir / 'profile'}")

  def close(self, loop: Loop) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
