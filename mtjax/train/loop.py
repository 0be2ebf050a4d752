"""The training loop. Order of operations for each step s (the state holds s finished steps):

  1. hooks before s  eval (every eval.every steps, and at step 0), checkpoint (every
                     checkpoint.every steps, async; never the step just restored)
  2. next batch      from the batch source (it may read the state: on-policy sampling)
  3. step            THE compiled step, with step s's task weights and entropy coefficients
  4. hooks after     log (step s's metrics are read after step s + 1 is dispatched: no host sync
                     on the step's critical path; per-task metrics are token-weighted means over
                     the log window, see mtjax.train.metrics), progress, profile, feedback,
                     preemption (save at the step reached and stop: exit code 3; in a
                     single-process run the preemption hook also waits, before each step, for
                     the one in flight and looks at the flag: a signal stops at the next step
                     boundary, the host never more than one step ahead of the device)
At the end: flush the log, eval, save the last step; then close everything and draw the plots.
Signals (preemption.py): the guard is in place from the start of `Loop.run` (or earlier, when the
run entered it before setup) until the last save is committed; a signal before the first step
stops the loop after 2. with nothing new to save (exit 3), one during the last step or after it
lets the run complete (exit 0), and repeated signals are logged and ignored.
The loop is generic over the step function and the batch source; hooks do the rest (hooks.py).
`run` is the generic run around it (checks, the workdir's lock, setup, run files, the loop,
plots); what a kind of training brings (its step, batch source and hooks) comes from a Recipe:
mtjax.recipes has the supervised and GRPO ones, and `mtjax.recipes.run` is what `mtjax train`
calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
from etils import epath

from mtjax.config import Config
from mtjax.monitoring import CompileCounter
from mtjax.parallel.mesh import Device
from mtjax.train import checkpoint as checkpoint_lib
from mtjax.train import hooks as hooks_lib
from mtjax.train import lock as lock_lib
from mtjax.train import metrics as metrics_lib
from mtjax.train import preemption
from mtjax.train import rundir
from mtjax.train import setup as setup_lib
from mtjax.train.batches import BatchSource
from mtjax.train.controls import Controls
from mtjax.train.hooks import StepOutput, TrainingDiverged  # noqa: F401  (re-exported)
from mtjax.train.preemption import PreemptionGuard
from mtjax.train.state import TrainState


@dataclasses.dataclass
class RunResult:
  state: TrainState
  history: list[dict[str, Any]]  # the metric rows logged by this call
  workdir: epath.Path
  plots: list[epath.Path]
  compiles: int
  preempted: bool = False  # stopped by a signal after saving; run again to resume


class Recipe(Protocol):
  """What a kind of training brings to the generic `run` (mtjax.recipes: supervised, GRPO)."""

  def check(self, config: Config) -> None:
    """Checks that need no setup, before the workdir is touched (BadInputError: exit 2)."""
    ...

  def build(self, setup: setup_lib.Setup,
            workdir: epath.Path) -> tuple[Callable, BatchSource, list[hooks_lib.Hook]]:
    """(the jitted step, the batch source, the hooks in the order they run) of a built Setup."""
    ...


class Loop:
  """One run of steps [start, total) of a built Setup; `run()` executes the order above."""

  def __init__(self, setup: setup_lib.Setup, workdir: epath.Path, step_fn: Callable,
               source: BatchSource, hooks: Sequence[hooks_lib.Hook]):
    self.setup, self.config, self.workdir = setup, setup.config, workdir
    self.checkpointer: checkpoint_lib.Checkpointer = setup.checkpointer  # type: ignore[assignment]
    self.task_names = setup.config.data.tasks
    self.state, self.start, self.total = setup.state, int(setup.state.step), setup.config.train.steps
    self.step_fn, self.source, self.hooks = step_fn, source, list(hooks)
    self.controls = Controls.from_config(setup.config, setup.controls_state)
    self.compiles = CompileCounter()
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    self.history: list[dict[str, Any]] = []
    self.last_row: dict[str, Any] = {}  # the latest value of every key (best-checkpoint metric)
    self.last_train_row: dict[str, Any] = {}
    # The guard a run entered before its setup (signals during setup count), else a new one.
    self.guard: PreemptionGuard = preemption.guard()
    self.preempted = self._stopping = False

  def write(self, row: dict[str, Any]) -> None:
    self.writer.write(row)
    self.history.append(row)
    self.last_row.update(row)
    if "train/loss" in row:
      self.last_train_row = row

  def flush(self) -> None:
    for hook in self.hooks:
      hook.flush(self)

  def save(self, step: int) -> None:
    best = self.config.checkpoint.best_metric
    metrics = {best: self.last_row[best]} if best in self.last_row else None
    self.checkpointer.save(step, self.state, self.source.state, self.config, self.setup.run_facts,
                           metrics, controls=self.controls.state)

  def stop(self, *, preempted: bool = False) -> None:
    self._stopping, self.preempted = True, preempted

  def run(self) -> None:
    # The guard stays installed until the last save is committed (checkpointer.close() waits for
    # it): a second signal meanwhile is logged and ignored, never cutting the save short.
    with self.guard:
      try:
        with jax.set_mesh(self.setup.mesh):
          self._run_steps()
      finally:
        for hook in reversed(self.hooks):
          hook.close(self)
        self.source.close()
        self.writer.close()
        self.checkpointer.close()  # waits for any save in flight

  def _run_steps(self) -> None:
    for step in range(self.start, self.total):
      # Once the last step is under way the run completes: a signal no longer stops it.
      self.guard.finishing = step == self.total - 1 and step > self.start
      for hook in self.hooks:
        hook.before_step(self, step)
      if self._stopping:  # a signal seen before this step was dispatched (preemption hook)
        return
      batch = self.source.next(self.state)
      if step == self.start:
        if self.guard.should_stop(step):  # a signal during setup (or eval at step 0, or the batch)
          self._stop_before_first_step()
          return
        self.guard.finishing = step == self.total - 1
      weights, coefs = self.controls.at(step)
      with self.compiles:
        self.state, metrics = self.step_fn(self.state, batch.arrays, weights, coefs)
      out = StepOutput(step + 1, metrics, batch, weights, coefs)
      for hook in self.hooks:
        hook.after_step(self, out)
      if self._stopping:
        return
    self.guard.finishing = True
    for hook in self.hooks:
      hook.at_end(self)

  def _stop_before_first_step(self) -> None:
    """A signal came before any step ran here: nothing new to save; the workdir stays as it was."""
    self.stop(preempted=True)
    latest = self.checkpointer.latest_step()
    hooks_lib.say(f"preempted by {self.guard.name or 'a signal'} before the first step: nothing new "
                  "to save (" + (f"the latest checkpoint is step {latest}" if latest is not None
                                 else "no checkpoint yet") +
                  "); run the same command again to resume")


def run(config: Config, workdir: str | epath.PathLike, recipe: Recipe, *,
        devices: Sequence[Device] | None = None, resume_from: int | None = None,
        force_unlock: bool = False) -> RunResult:
  """Trains `config` in `workdir` the recipe's way, resuming from its latest checkpoint (or
  `resume_from`).

  The workdir's lock (mtjax.train.lock) is held throughout: a second run on the same workdir
  gets BadInputError naming the holder; force_unlock takes the lock over regardless.
  """
  recipe.check(config)
  workdir = rundir.resolve(workdir)
  # The signal guard first: a signal while waiting for the lock, in setup or in the plots counts.
  with preemption.guard(), lock_lib.hold(workdir, force=force_unlock) as lock:  # before anything is read or moved
    if lock is not None:
      removed = checkpoint_lib.remove_stale_temporaries(workdir)
      if removed:
        hooks_lib.say(f"note: removed {len(removed)} unfinished checkpoint save(s) in "
                      f"{workdir / 'checkpoints'}: {', '.join(removed)}")
    return _run_locked(config, workdir, recipe, devices=devices, resume_from=resume_from)


def _run_locked(config: Config, workdir: epath.Path, recipe: Recipe, *,
                devices: Sequence[Device] | None, resume_from: int | None) -> RunResult:
  """`run` once the workdir is locked: setup (every check), then the run files, then the loop."""
  setup = setup_lib.build(config, devices=devices, workdir=workdir, resume_from=resume_from)
  config = setup.config
  if setup.restored_step is not None:
    hooks_lib.say(f"resumed from step {setup.restored_step} in {workdir / 'checkpoints'}" + (
        "; changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in setup.changes.items())
        if setup.changes else ""))
  if jax.process_index() == 0:  # metrics first: a bad metrics file stops before config.json changes
    rundir.set_aside_metrics(workdir, after_step=int(setup.state.step))
    rundir.write_run_files(workdir, config, setup.devices,
                           {"mesh": dict(setup.mesh.shape), "model": dataclasses.asdict(setup.spec),
                            "compilation_cache": setup.compilation_cache})
  step_fn, source, hooks = recipe.build(setup, workdir)
  loop = Loop(setup, workdir, step_fn, source, hooks)
  loop.run()
  plots = []
  if jax.process_index() == 0:
    plots = metrics_lib.plot_per_task(metrics_lib.read_rows(loop.writer.path), config.data.tasks,
                                      workdir / "plots")
  return RunResult(state=loop.state, history=loop.history, workdir=workdir, plots=plots,
                   compiles=loop.compiles.count, preempted=loop.preempted)
