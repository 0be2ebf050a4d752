"""Hooks: everything the loop does besides next batch -> step. Each runs at its own cadence.

A hook may act before step s (the state holds s finished steps: eval, checkpoint), after a step
(`done` steps finished: log, progress, profile, feedback, preemption), at the end of the loop,
and on close (always, also after an error). `every` is its cadence in steps (0: only where it
says). Hooks run in list order; a recipe's hook list (mtjax.recipes) gives the order the loop's
docstring states.
A hook may feed back sampling rates (`loop.source.set_rates`) and per-task loss weights or entropy
coefficients (`loop.controls.set`): what it decides once s steps are done applies from step
s + data.feedback_lag.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from tqdm import tqdm

from mtjax.train import metrics as metrics_lib
from mtjax.train.batches import Batch


@dataclasses.dataclass
class StepOutput:
  """What a hook sees after a step: the loop hands it over, the metrics still on the device."""

  done: int  # finished steps, this one included
  metrics: Any  # on device until a hook fetches them
  batch: Batch
  task_weights: np.ndarray
  entropy_coefs: np.ndarray


class Loop(Protocol):
  """The loop as hooks see it (mtjax.train.loop.Loop implements it): the run's setup and state,
  the batch source and controls a hook may feed back to, and the rows and saves it may ask for."""

  setup: Any  # mtjax.train.setup.Setup
  config: Any  # mtjax.config.Config (resolved)
  workdir: Any  # epath.Path
  checkpointer: Any  # mtjax.train.checkpoint.Checkpointer
  state: Any  # TrainState
  source: Any  # BatchSource
  controls: Any  # mtjax.train.controls.Controls
  compiles: Any  # mtjax.monitoring.CompileCounter
  guard: Any  # mtjax.train.preemption.PreemptionGuard
  task_names: Any  # Sequence[str]
  start: int
  total: int
  last_row: dict[str, Any]
  last_train_row: dict[str, Any]

  def write(self, row: dict[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def save(self, step: int) -> None: ...
  def stop(self, *, preempted: bool = False) -> None: ...


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
  Per-task loss, entropy and accuracy are token-weighted means over the whole log window
  (mtjax.train.metrics): every step's per-task metrics (a few [T] arrays, already computed by the
  step) are kept by reference, on the device, and fetched together with the logged step's, so the
  window costs no host sync per step. A task sampled at a rate > 0 whose loss tokens are 0 in
  `no_tokens_rows` logged windows in a row gets a warning (one stderr line) and
  `warn/<task>/no_tokens` = 1 in each such row from then on.
  """

  def __init__(self, every: int, max_consecutive_skips: int, no_tokens_rows: int = 3, *,
               mfu: bool = True):
    """mfu: log perf/model_flops_per_s and perf/mfu (a step that is one supervised batch's
    forward and backward; not an RL step, which samples and takes several updates)."""
    self.every, self.max_consecutive_skips = every, max_consecutive_skips
    self.mfu = mfu
    self.no_tokens_rows = no_tokens_rows
    self._pending: StepOutput | None = None
    self._window: list[Any] = []  # per_task metrics (device arrays) of the steps since the last row
    self._pending_window: list[Any] = []  # the window that ends at the pending step
    self._window_start, self._tokens, self._steps = time.perf_counter(), 0, 0
    self._save_block_s: list[float] = []
    self._no_tokens: dict[str, int] = {}  # task -> logged rows in a row without loss tokens

  def _mfu(self, loop: Loop, step_time: float) -> dict[str, float]:
    """perf/model_flops_per_s and, where the device's spec peak is known, perf/mfu (mtjax.perf:
    causal attention at half, over the spec peak of every device of the run)."""
    from mtjax import perf
    if not self.mfu:
      return {}
    if not hasattr(self, "_flops_per_step"):
      setup, d = loop.setup, loop.config.data
      self._flops_per_step = perf.model_flops_per_token(setup.spec, d.seq_len) * d.batch_size * d.seq_len
      peak = perf.spec_peak_flops(setup.devices[0].device_kind, setup.spec.dtype)
      self._peak = None if peak is None else peak * jax.device_count()
    flops = self._flops_per_step / max(step_time, 1e-12)
    row = {"perf/model_flops_per_s": flops}
    if self._peak:
      row["perf/mfu"] = flops / self._peak
    return row

  def record_save(self, seconds: float) -> None:
    self._save_block_s.append(seconds)

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    self.flush(loop)  # the previous step's metrics: this step is already dispatched
    self._tokens += out.batch.tokens
    self._steps += 1
    self._window.append(out.metrics["per_task"])  # a reference: nothing is read here
    if out.done % self.every == 0 or out.done == loop.total:
      self._pending, self._pending_window, self._window = out, self._window, []

  def flush(self, loop: Loop) -> None:
    out, self._pending = self._pending, None
    window, self._pending_window = self._pending_window, []
    if out is None:
      return
    host = jax.device_get(out.metrics)
    # The window's earlier steps finished before the logged one: fetching them never waits longer.
    sums = metrics_lib.window_sums(jax.device_get(window[:-1]) + [host["per_task"]])
    elapsed = time.perf_counter() - self._window_start
    row = metrics_lib.train_row(out.done, host, loop.task_names, out.task_weights, out.entropy_coefs,
                                window=sums)
    row.update(out.batch.info)
    row["perf/step_time_s"] = elapsed / max(self._steps, 1)
    row["perf/tokens_per_s"] = self._tokens / elapsed
    row["perf/compiles"] = loop.compiles.count
    row.update(self._mfu(loop, row["perf/step_time_s"]))
    if self._save_block_s:
      row["perf/checkpoint_block_s"] = float(np.mean(self._save_block_s))
      self._save_block_s.clear()
    self._warn_no_tokens(loop, row)
    loop.write(row)
    self._window_start, self._tokens, self._steps = time.perf_counter(), 0, 0
    skips = int(host["consecutive_skips"])
    if skips >= self.max_consecutive_skips:
      raise TrainingDiverged(
          f"step {out.done}: {skips} consecutive steps had a non-finite loss, gradient norm, "
          f"update or new parameters (train.max_consecutive_skips={self.max_consecutive_skips}); "
          f"last good checkpoint: {last_finite_checkpoint(loop.checkpointer)}")

  def _warn_no_tokens(self, loop: Loop, row: dict[str, Any]) -> None:
    for name in loop.task_names:
      rate = row.get(f"data/{name}/rate")  # unknown for sources without rates: warn as if > 0
      if row.get(f"train/{name}/tokens") != 0 or (rate is not None and rate <= 0):
        self._no_tokens[name] = 0
        continue
      n = self._no_tokens[name] = self._no_tokens.get(name, 0) + 1
      if n >= self.no_tokens_rows:
        row[f"warn/{name}/no_tokens"] = 1
      if n == self.no_tokens_rows:
        say(f"warning: task {name!r} had no loss tokens in {n} log windows in a row (up to step "
            f"{row['step']}) although it is sampled" + (f" at rate {rate:.3g}" if rate else "")
            + f": see data/{name}/skipped, data/{name}/truncated and data/{name}/too_long "
            "(examples longer than data.seq_len are cut or skipped as data.truncate says; raise "
            "data.seq_len) or raise its data.mixture weight")

  def at_end(self, loop: Loop) -> None:
    self.flush(loop)


def _params_finite(state_dir: Any) -> bool:
  """Whether every parameter saved in an Orbax `state` item is finite (read one array at a time,
  on the host, so the check never needs another copy of the model on the devices)."""
  import orbax.checkpoint as ocp
  reader = ocp.PyTreeCheckpointer()
  meta: Any = reader.metadata(state_dir)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)  # orbax 0.12: StepMetadata
  for path, _ in jax.tree_util.tree_flatten_with_path(tree["params"])[0]:
    item: Any = 0
    for key in reversed(path):
      item = {getattr(key, "key", getattr(key, "idx", key)): item}
    restored = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": item}, partial_restore=True,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  {"params": item})))
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored)):
      return False
  return True


def last_finite_checkpoint(checkpointer: Any) -> str:
  """'step S in DIR' for the latest committed checkpoint whose parameters are all finite (saves in
  flight are waited for), naming later non-finite ones; 'none' if there is none."""
  checkpointer.wait()
  bad = []
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      finite = _params_finite(checkpointer.directory / str(step) / "state")
    except Exception as e:  # unreadable: not a good checkpoint either
      say(f"note: could not read checkpoint {step} to check it is finite: {type(e).__name__}: {e}")
      finite = False
    if finite:
      return f"step {step} in {checkpointer.directory}" + (
          f" (later: step {', '.join(map(str, bad))} not finite or unreadable)" if bad else "")
    bad.append(step)
  return "none" + (f" (step {', '.join(map(str, bad))} in {checkpointer.directory}: not finite "
                   "or unreadable)" if bad else "")


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
      # The mean of the per-task losses, as the end line reports it; train/loss in the metrics is
      # the objective, a weighted SUM over tasks, and is labelled as such.
      tasks = loop.config.data.tasks
      losses = [row[f"train/{n}/loss"] for n in tasks
                if f"train/{n}/loss" in row and row.get(f"train/{n}/tokens", 1) > 0]
      shown = {"mean_loss": f"{sum(losses) / len(losses):.3f}"} if losses else {}
      self._bar.set_postfix(**shown, objective_sum=f"{row['train/loss']:.3f}",
                            tok_s=f"{row['perf/tokens_per_s']:.0f}")

  def close(self, loop: Loop) -> None:
    if self._bar is not None:
      self._bar.close()


class EvalHook(Hook):
  """Held-out eval (eval/<task>/<metric> rows) every eval.every steps and at eval.steps, at step
  0 and at the end. Each row also has eval/<task>/forgetting: the task's best score at an earlier
  eval of the run (also before a resume) minus its score now (accuracy where generated, else
  token_accuracy; 0 at the first eval)."""

  def __init__(self, every: int, make_evaluator, steps: Sequence[int] = ()):
    self.every = every
    self.steps = frozenset(int(s) for s in steps)
    self._make_evaluator = make_evaluator  # built on first use: eval data and compiles cost time
    self._evaluator = None
    self._best: dict[str, float] | None = None  # per eval/<task>/<metric> key: its best so far

  def _run(self, loop: Loop, step: int) -> None:
    loop.flush()
    if self._evaluator is None:
      self._evaluator = self._make_evaluator()
    loader = getattr(loop.source, "loader", None)
    if hasattr(loader, "instructions_at") and hasattr(self._evaluator, "set_instructions"):
      # The instruction search's texts in effect at this step, as in training.
      self._evaluator.set_instructions(loader.instructions_at(step))  # type: ignore[union-attr]
    reference = loop.state.extra.get("reference") if loop.config.eval.drift else None
    row = self._evaluator(loop.state.params, step, reference=reference)
    if self._best is None:
      self._best = _best_scores(loop, step)
    loop.write({**row, **_forgetting(row, self._best)})

  def due(self, step: int) -> bool:
    return super().due(step) or step in self.steps

  def before_step(self, loop: Loop, step: int) -> None:
    if self.due(step) and (step > loop.start or step == 0):
      self._run(loop, step)

  def at_end(self, loop: Loop) -> None:
    if (self.every or self.steps) and loop.total > loop.start:
      self._run(loop, loop.total)


FORGETTING_METRICS = ("accuracy", "token_accuracy")  # the first a task's row has is its score


def _forgetting(row: dict[str, Any], best: dict[str, float]) -> dict[str, float]:
  """eval/<task>/forgetting of an eval row, updating `best` (per score key) in place."""
  out = {}
  tasks = {k.split("/")[1] for k in row if k.startswith("eval/") and k.count("/") == 2}
  for task in sorted(tasks):
    key = next((f"eval/{task}/{m}" for m in FORGETTING_METRICS if f"eval/{task}/{m}" in row), None)
    if key is None:
      continue
    now = float(row[key])
    out[f"eval/{task}/forgetting"] = max(0.0, best.get(key, now) - now)
    best[key] = max(best.get(key, now), now)
  return out


def _best_scores(loop: Loop, step: int) -> dict[str, float]:
  """Each score key's best over the eval rows a resumed run logged before `step`."""
  best: dict[str, float] = {}
  if loop.workdir is None or step == 0:
    return best
  try:
    rows = metrics_lib.read_rows(metrics_lib.log_path(loop.workdir))
  except FileNotFoundError:
    return best
  for row in rows:
    if row.get("step", step) < step:
      _forgetting(row, best)
  return best


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
  """SIGTERM/SIGINT (all processes agree on the step): save at the step reached, stop; exit 3.
  A signal during the last step stops nothing: the run completes (final save at the end)."""

  def __init__(self, checkpoint: CheckpointHook, every: int = 1):
    self._checkpoint, self.every = checkpoint, every  # every: multi-process agreement cadence

  def before_step(self, loop: Loop, step: int) -> None:
    """Single process: the step in flight finishes before the next one is dispatched, and the
    flag is looked at then, so a signal stops the run at the next step boundary. Left to itself
    the host dispatches steps ahead of the device (up to a log window), and a stop came several
    steps (~50 s on SmolLM2) after the signal. Multi-process runs keep their gather cadence
    (`every`, in after_step): the gather itself waits for the step in flight."""
    if jax.process_count() > 1 or step == loop.start:
      return
    jax.block_until_ready(loop.state.step)
    if loop.guard.should_stop(step) and not loop.guard.finishing:
      self._stop(loop, step)

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    if loop.guard.should_stop(out.done, self.every) and out.done < loop.total:
      self._stop(loop, out.done)

  def _stop(self, loop: Loop, step: int) -> None:
    self._checkpoint.save(loop, step)
    loop.stop(preempted=True)  # the loop's close waits until the save is committed
    say(f"preempted by {loop.guard.name or 'a signal'}: saved step {step}; run the same "
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
