"""The training loop. Order of operations each step:

  1. eval       (held-out, per task, every eval.every steps and at the end; eval/<task>/*)
  2. checkpoint (every checkpoint.every steps, async; and at the end or on preemption)
  3. next batch (from the prefetching mixture loader; host -> global sharded arrays)
  4. step       (THE compiled step; weights and coefficients are array inputs)
  5. log        (every train.log_every steps: the only host sync)
  6. preempted? (SIGTERM/SIGINT: save at this step, wait for it, stop; exit code 3)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from mtjax.config import Config, entropy_coef_at
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.data.loader import MixtureLoader
from mtjax.errors import BadInputError
from mtjax.model import ModelSpec
from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.mesh import make_mesh
from mtjax.train import checkpoint as checkpoint_lib
from mtjax.train import metrics as metrics_lib
from mtjax.train import optimizer, rundir
from mtjax.train import step as step_lib
from mtjax.train.preemption import PreemptionGuard


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps."""


@dataclasses.dataclass
class RunResult:
  state: step_lib.TrainState
  history: list[dict[str, Any]]  # the metric rows logged by this call
  workdir: epath.Path
  plots: list[epath.Path]
  compiles: int
  preempted: bool = False  # stopped by a signal after saving; run again to resume


def check_divisibility(config: Config, mesh: jax.sharding.Mesh) -> None:
  shards = mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]
  per_micro = config.data.batch_size // config.optimizer.grad_accum
  if per_micro % shards:
    raise BadInputError("data.batch_size", f"{config.data.batch_size} rows / grad_accum "
                        f"{config.optimizer.grad_accum} must be divisible by mesh dcn*data*fsdp = {shards}")


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def run(config: Config, workdir: str | epath.PathLike, *,
        devices: Sequence[jax.Device] | None = None, resume_from: int | None = None,
        profile: tuple[int, int] | None = None) -> RunResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint (or `resume_from`).

  profile=(start, stop): a JAX profiler trace of steps [start, stop) in workdir/profile.
  """
  workdir = rundir.resolve(workdir)
  devices = list(devices) if devices is not None else jax.devices()
  mesh = make_mesh(config.mesh, devices)
  check_divisibility(config, mesh)
  tokenizer = tokenizer_lib.get(config.data.tokenizer)
  spec = ModelSpec.from_config(config.model, tokenizer.vocab_size, devices[0].platform)
  task_names = config.data.tasks
  is_writer = jax.process_index() == 0

  # Where to start: the latest checkpoint, or the one asked for (later ones are set aside).
  if resume_from is not None:
    _resume_target_exists(workdir, resume_from)
    if is_writer:
      moved = checkpoint_lib.set_aside_later_checkpoints(workdir, resume_from)
      if moved:
        _say(f"resume_from {resume_from}: moved checkpoints {moved} to {workdir / 'abandoned_checkpoints'}")
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  latest = checkpointer.latest_step()
  run_facts = {"decay_steps": config.optimizer.decay_steps or config.train.steps}
  changes = {}
  if latest is not None:
    changes = checkpointer.check_compatible(latest, config)
    run_facts = checkpointer.read_facts(latest)[1]  # the LR schedule is fixed at the first start

  tx, schedule = optimizer.make_optimizer(config.optimizer, run_facts["decay_steps"])
  graphdef, state, shardings = step_lib.init_state(mesh, spec, tx, config.seed)
  loader_state = None
  if latest is not None:
    state, loader_state = checkpointer.restore(latest, state)
    _say(f"resumed from step {latest} in {checkpointer.directory}" + (
        "; changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        if changes else ""))
  start = int(state.step)
  if is_writer:
    rundir.write_run_files(workdir, config, devices,
                           {"mesh": dict(mesh.shape), "model": dataclasses.asdict(spec)})
    rundir.set_aside_metrics(workdir, after_step=start)

  step_fn = step_lib.jit_step(
      step_lib.make_step_fn(graphdef, tx, schedule, num_tasks=len(task_names),
                            grad_accum=config.optimizer.grad_accum, z_loss=config.model.z_loss),
      mesh, shardings)
  batch_sharding = sharding_lib.named(mesh, step_lib.BATCH_AXES)
  loader = MixtureLoader.from_config(config, process_index=jax.process_index(),
                                    process_count=jax.process_count(), state=loader_state)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_writer)
  compiles = step_lib.CompileCounter()
  loss_weights = np.array([config.train.loss_weights.get(n, 1.0) for n in task_names], np.float32)
  history: list[dict[str, Any]] = []
  total = config.train.steps
  last_row: dict[str, Any] = {}
  save_block_s: list[float] = []

  def save(at_step: int) -> None:
    t0 = time.perf_counter()
    best = config.checkpoint.best_metric
    metrics = {best: last_row[best]} if best in last_row else None
    checkpointer.save(at_step, state, loader.state, config, run_facts, metrics)
    save_block_s.append(time.perf_counter() - t0)

  evaluator = None

  def evaluate(at_step: int) -> None:
    nonlocal evaluator
    if evaluator is None:
      from mtjax.eval.evaluate import Evaluator
      evaluator = Evaluator(config, graphdef, spec, mesh, tokenizer)
    row = evaluator(state.params, at_step)
    writer.write(row)
    history.append(row)
    last_row.update(row)  # eval metrics can pick the best checkpoint

  bar = tqdm(total=total, initial=start, disable=not (config.train.progress and is_writer),
             dynamic_ncols=True, desc="train")
  window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
  preempted = False
  profiling = False
  try:
    with jax.set_mesh(mesh), PreemptionGuard() as guard:
      for step in range(start, total):
        if config.eval.every and step % config.eval.every == 0 and (step > start or step == 0):
          evaluate(step)
        if checkpointer.should_save(step) and step > start:
          save(step)
        if profile and step == profile[0]:
          jax.profiler.start_trace(str(workdir / "profile"))
          profiling = True
        host_batch = next(loader)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                 for k, v in host_batch.arrays.items()}
        entropy_coefs = np.array([entropy_coef_at(config.train.entropy_coefs.get(n, 0.0), step, total)
                                  for n in task_names], np.float32)
        with compiles:
          state, metrics = step_fn(state, batch, loss_weights, entropy_coefs)
        window_tokens += int(np.count_nonzero(host_batch.arrays["segment_ids"])) * jax.process_count()
        window_steps += 1
        bar.update(1)
        done = step + 1
        if profiling and (done == profile[1] or done == total):
          jax.block_until_ready(metrics)
          jax.profiler.stop_trace()
          profiling = False
          _say(f"profile of steps {profile[0]}..{done - 1}: {workdir / 'profile'}")
        if done % config.train.log_every == 0 or done == total:
          host = jax.device_get(metrics)  # the one sync per log interval
          elapsed = time.perf_counter() - window_start
          row = metrics_lib.train_row(done, host, task_names, loss_weights, entropy_coefs)
          for i, name in enumerate(task_names):
            row[f"data/{name}/rate"] = float(host_batch.rates[i])  # as used for this step
            row[f"data/{name}/truncated"] = host_batch.state_after["truncated"][name]
            row[f"data/{name}/skipped"] = host_batch.state_after["skipped"][name]
          row["data/packing_efficiency"] = host_batch.packing_efficiency
          row["perf/step_time_s"] = elapsed / window_steps
          row["perf/tokens_per_s"] = window_tokens / elapsed
          row["perf/compiles"] = compiles.count
          if save_block_s:
            row["perf/checkpoint_block_s"] = float(np.mean(save_block_s))
            save_block_s.clear()
          writer.write(row)
          history.append(row)
          last_row.update(row)
          bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")
          window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
          if int(host["consecutive_skips"]) >= config.train.max_consecutive_skips:
            good = checkpointer.latest_step()
            raise TrainingDiverged(
                f"step {done}: {int(host['consecutive_skips'])} consecutive steps had a non-finite "
                f"loss or gradient norm (train.max_consecutive_skips="
                f"{config.train.max_consecutive_skips}); last good checkpoint: "
                + (f"step {good} in {checkpointer.directory}" if good is not None else "none"))
        if guard.should_stop(done) and done < total:
          save(done)
          preempted = True
          _say(f"preempted by signal {guard.received}: saved step {done}; run the same command "
               "again to resume")
          break
      else:
        if config.eval.every and total > start:
          evaluate(total)
        if checkpointer.latest_step() != total:
          save(total)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    bar.close()
    loader.close()
    writer.close()
    checkpointer.close()  # waits for any save in flight
  plots = []
  if is_writer:
    plots = metrics_lib.plot_per_task(metrics_lib.read_rows(writer.path), task_names,
                                      workdir / "plots")
  return RunResult(state=state, history=history, workdir=workdir, plots=plots,
                   compiles=compiles.count, preempted=preempted)


def _resume_target_exists(workdir: epath.Path, step: int) -> None:
  directory = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
      if directory.exists() else []
  if step not in steps:
    raise BadInputError("--resume_from", f"no checkpoint at step {step} in {directory} "
                        f"(available: {steps or 'none'})")
