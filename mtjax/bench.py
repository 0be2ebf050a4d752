"""`mtjax bench --out FILE`: the trainer's speed, as ratios measured side by side in one run.

- step_overhead: the trainer's steady-state step time (the real `mtjax.recipes.run` loop: Grain
  mixture loader, host->device transfer, the sharded step, logging) over a bare jitted step of the
  same model, batch, optimizer and loss terms written with plain JAX + optax on a batch already on
  the device. Rounds interleave the two arms; the ratio is the median over rounds, with min/max.
- loader_headroom[n]: batches/s the mixture loader produces with n tasks, times the trainer's
  step time (= examples produced per example consumed), for n = 1, 4, 64.
- compile: count and backend compile time of the train step and of the eval step.
- mfu: model FLOPs per step (mtjax.perf: 6N + attention, causal attention at half, as MaxText
  counts) / step time, over the device's dense spec peak (mtjax.perf.SPEC_PEAK_FLOPS; null on
  CPU) and, as mfu_measured_peak, over the matmul peak measured in the same run.
- torch_eager_cpu: the same model, batch and loss terms in PyTorch eager on CPU (if installed).
- weighting: the compiled step of every train.weighting.method against static's on the same
  device batch, the two taking turns step by step; each round's step-time ratio and their median (loss-based methods: O(T) extra work; gradient-based ones: T backward
  passes and a [T, T] Gram matrix).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtjax.config import Config


def register_copies(n: int) -> list[str]:
  """n tasks: copies of the in-memory synthetic tasks under new names (independent streams)."""
  from mtjax import tasks
  base = ["reverse", "addition", "grammar"]
  names = []
  for i in range(n):
    src = tasks.get(base[i % 3])
    name = f"bench{i}_{src.name}"
    tasks.register(tasks.Task(name, src.source, src.is_correct), replace=True)
    names.append(name)
  return names


def with_tasks(cfg: Config, names: Sequence[str]) -> Config:
  return cfg.replace(**{"data.mixture_name": "", "data.tasks": tuple(names),
                        "data.mixture": {t: 1.0 for t in names}, "train.loss_weights": {},
                        "train.entropy_coefs": {t: 0.01 for t in names}, "eval.tasks": ()})


# ---------------------------------------------------------------- the bare JAX + optax arm

def make_bare_step(graphdef, tx: optax.GradientTransformation, num_tasks: int, z_loss: float,
                   loss_chunk: int = 0):
  """The same model, optimizer and loss terms as the trainer, with none of the trainer.
  loss_chunk > 0: the loss over token chunks as the trainer computes it (train.loss_chunk; the
  chunked loss is part of the model's computation, not trainer overhead)."""

  def objective(params, batch, w, c):
    model = nnx.merge(graphdef, params)
    if loss_chunk:
      from mtjax.train import losses
      hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"],
                              adapter_ids=batch.get("task_ids"))
      head, tied = model.head()
      return losses.multitask_objective_chunked(hidden, head.astype(hidden.dtype), batch, w, c,
                                                tied=tied, z_loss=z_loss, chunk=loss_chunk)[0]
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    onehot = jax.nn.one_hot(batch["task_ids"], num_tasks) * batch["loss_mask"][..., None]
    count = jnp.maximum(onehot.sum((0, 1)), 1.0)
    loss_t = jnp.einsum("bl,blt->t", ce, onehot) / count
    entropy_t = jnp.einsum("bl,blt->t", entropy, onehot) / count
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    z = z_loss * jnp.sum(lse ** 2 * batch["loss_mask"]) / jnp.maximum(batch["loss_mask"].sum(), 1)
    return jnp.sum(w * loss_t) - jnp.sum(c * entropy_t) + z

  def step(params, opt_state, batch, w, c):
    loss, grads = jax.value_and_grad(objective)(params, batch, w, c)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


# ---------------------------------------------------------------- pieces

def _trainer_round(cfg: Config, steps: int) -> dict[str, Any]:
  """One real training run of 2 x steps; the second logging window is the steady state."""
  from mtjax import recipes
  cfg = cfg.replace(**{"train.steps": 2 * steps, "train.log_every": steps, "eval.every": 0,
                       "checkpoint.every": 0, "train.progress": False})
  with tempfile.TemporaryDirectory() as workdir:
    result = recipes.run(cfg, workdir)
  rows = [r for r in result.history if "train/loss" in r]
  return {"step_time_s": rows[-1]["perf/step_time_s"], "compiles": result.compiles}


def matmul_peak_flops(dtype: str, n: int, repeats: int = 5) -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def model_flops_per_step(spec, params, batch_size: int, seq_len: int, *,
                         causal: bool = False) -> float:
  """Model FLOPs per step (mtjax.perf): 6N per token for the matmuls (forward + backward; the
  embedding lookup excluded unless tied) plus 12 * layers * heads * head_dim * seq_len per token
  for attention (PaLM); causal=True halves attention (MaxText's convention, used for MFU).
  causal=False counts what the reference kernel computes (the full score matrix)."""
  del params  # the count comes from the spec's abstract parameters
  from mtjax import perf
  return perf.model_flops_per_token(spec, seq_len, causal=causal) * batch_size * seq_len


def loader_batches_per_s(cfg: Config, seconds: float) -> float:
  from mtjax.data.loader import MixtureLoader
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  try:
    next(loader)  # warm caches
    batches, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      next(loader)
      batches += 1
    return batches / (time.perf_counter() - t0)
  finally:
    loader.close()


def eval_compile(cfg: Config, graphdef, spec, mesh, params) -> dict[str, float]:
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.eval.evaluate import Evaluator
  cfg = cfg.replace(**{"eval.num_generate": 0, "eval.num_samples": 0})
  evaluator = Evaluator(cfg, graphdef, spec, mesh, tokenizer_lib.for_config(cfg))
  evaluator.teacher_forced(params)
  evaluator.teacher_forced(params)  # a second pass must not compile again
  return {"count": evaluator.eval_compiles.count, "seconds": evaluator.eval_compiles.seconds}


def torch_eager_step_time(spec, batch: dict[str, np.ndarray], num_tasks: int, steps: int) -> float | None:
  try:
    import torch  # noqa: F401  # pyright: ignore[reportMissingImports]
  except ImportError:
    return None
  from mtjax import torch_reference
  return torch_reference.step_time(spec, batch, num_tasks, steps)


def weighting_overhead(cfg: Config, host_batch: dict[str, np.ndarray], *, rounds: int,
                       steps: int, progress=print) -> dict[str, Any]:
  """Step time of each weighting method over static's: the compiled step alone (no loader), on
  one device batch, each step waited for. Static and one method at a time are held (two train
  states on the device, not seven) and take turns step by step, `steps` each per round, so noise
  from other work on the machine lands on both alike."""
  from mtjax.config import WEIGHTING_METHODS
  from mtjax.train import setup as setup_lib
  T = cfg.num_tasks
  w, c = np.ones(T, np.float32), np.full(T, 0.01, np.float32)

  def build(method: str) -> list[Any]:
    run = setup_lib.build(cfg.replace(**{"train.weighting.method": method}), decay_steps=1000)
    with jax.set_mesh(run.mesh):
      batch = {k: jax.device_put(v, run.batch_sharding) for k, v in host_batch.items()}
      fn, state = run.jit_step(), run.state
      for _ in range(2):
        state, m = fn(state, batch, w, c)
      jax.block_until_ready(m)
    return [run.mesh, fn, state, batch]

  def one_step(arm: list[Any]) -> float:
    mesh, fn, state, batch = arm
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      state, m = fn(state, batch, w, c)
      jax.block_until_ready(m)
    arm[2] = state
    return time.perf_counter() - t0

  static = build("static")
  result: dict[str, Any] = {}
  static_times: list[float] = []
  for method in (m for m in WEIGHTING_METHODS if m != "static"):
    arm = build(method)
    pairs = []
    for _ in range(rounds):
      a = b = 0.0
      for _ in range(steps):
        a += one_step(static)
        b += one_step(arm)
      pairs.append((b / steps, a / steps))
    del arm
    static_times += [a for _, a in pairs]
    ratios = [b / a for b, a in pairs]
    result[method] = {"step_time_s": statistics.median(b for b, _ in pairs),
                      "over_static": statistics.median(ratios), "over_static_rounds": ratios}
    progress(f"bench: weighting {method}: {result[method]['over_static']:.3f} x static "
             f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")
  result = {"static": {"step_time_s": statistics.median(static_times), "over_static": 1.0,
                       "over_static_rounds": [1.0] * rounds}, **result}
  return result


# ---------------------------------------------------------------- the benchmark

def check_args(*, rounds: int, steps: int, loader_seconds: float, torch_steps: int,
               out: str | None = None) -> None:
  """The benchmark's arguments, checked before it runs (a BadInputError naming the flag)."""
  import math
  import os

  from mtjax.errors import BadInputError
  for flag, value in (("--rounds", rounds), ("--steps", steps)):
    if value <= 0:
      raise BadInputError(flag, f"expected a positive integer, got {value}")
  if not (math.isfinite(loader_seconds) and loader_seconds > 0):
    raise BadInputError("--loader_seconds", f"expected a number of seconds > 0, got {loader_seconds}")
  if torch_steps < 0:
    raise BadInputError("--torch_steps", f"expected a count >= 0 (0: skip), got {torch_steps}")
  if out is None or "://" in out:
    return
  if os.path.isdir(out):
    raise BadInputError("--out", f"{out} is a directory, expected the path of a JSON file")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.lexists(parent) and parent != os.path.dirname(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise BadInputError("--out", f"cannot write {out}: {parent} is not a writable directory")


def run(cfg: Config, *, rounds: int = 5, steps: int = 10, loader_seconds: float = 2.0,
        matmul_n: int | None = None, torch_steps: int = 5, progress=print) -> dict[str, Any]:
  check_args(rounds=rounds, steps=steps, loader_seconds=loader_seconds, torch_steps=torch_steps)
  from mtjax.data.loader import MixtureLoader
  from mtjax.monitoring import CompileCounter
  from mtjax.train import setup as setup_lib

  cfg = with_tasks(cfg, register_copies(len(cfg.data.tasks)))
  run = setup_lib.build(cfg, decay_steps=2 * steps)
  cfg, devices, mesh, spec, tx = run.config, run.devices, run.mesh, run.spec, run.tx
  T = cfg.num_tasks

  # Train-step compile count and time (the real jitted step; lowered and compiled once).
  graphdef, state = run.graphdef, run.state
  step_fn = run.jit_step()
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  host_batch = next(loader).arrays
  loader.close()
  w, c = np.ones(T, np.float32), np.full(T, 0.01, np.float32)
  counter = CompileCounter()
  with jax.set_mesh(mesh):
    batch = {k: jax.device_put(v, run.batch_sharding) for k, v in host_batch.items()}
    with counter:
      for _ in range(3):
        state, m = step_fn(state, batch, w, c)
      jax.block_until_ready(m)
  train_compile = {"count": counter.count, "seconds": counter.seconds}
  progress(f"bench: train step compiled {counter.count}x in {counter.seconds:.2f}s")
  evaluation = eval_compile(cfg, graphdef, spec, mesh, state.params)
  progress(f"bench: eval step compiled {evaluation['count']}x in {evaluation['seconds']:.2f}s")

  # Bare arm: same model and optimizer; params on device, batch on device, nothing else.
  bare = make_bare_step(graphdef, tx, T, cfg.model.z_loss, cfg.train.loss_chunk)
  params = jax.tree.map(jnp.copy, state.params)
  opt_state = tx.init(params)
  dev_batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
  del state
  for _ in range(2):  # the second call sees the first's output placement: compile both now
    params, opt_state, loss = bare(params, opt_state, dev_batch, w, c)
  loss.block_until_ready()

  def bare_round() -> float:
    nonlocal params, opt_state
    t0 = time.perf_counter()
    for _ in range(steps):
      params, opt_state, loss = bare(params, opt_state, dev_batch, w, c)
    loss.block_until_ready()
    return (time.perf_counter() - t0) / steps

  trainer_times, bare_times = [], []
  for r in range(rounds):  # interleaved: noise on a shared machine hits both arms alike
    trainer_times.append(_trainer_round(cfg, steps)["step_time_s"])
    bare_times.append(bare_round())
    progress(f"bench: round {r + 1}/{rounds}: trainer {trainer_times[-1] * 1e3:.1f} ms/step, "
             f"bare {bare_times[-1] * 1e3:.1f} ms/step")
  ratios = [t / b for t, b in zip(trainer_times, bare_times)]
  step_time = statistics.median(trainer_times)

  headroom, batches_per_s = {}, {}
  for n in (1, 4, 64):
    batches_per_s[str(n)] = loader_batches_per_s(with_tasks(cfg, register_copies(n)), loader_seconds)
    headroom[str(n)] = batches_per_s[str(n)] * step_time
  progress("bench: loader headroom " + ", ".join(f"{k} tasks {v:.1f}x" for k, v in headroom.items()))

  dtype = spec.dtype  # the peak in the precision the model computes in
  n = matmul_n or (2048 if devices[0].platform == "cpu" else 8192)
  peak = matmul_peak_flops(dtype, n)
  from mtjax import perf
  spec_peak = perf.spec_peak_flops(devices[0].device_kind, dtype)
  flops = model_flops_per_step(spec, params, cfg.data.batch_size, cfg.data.seq_len, causal=True)
  achieved = flops / step_time
  torch_time = torch_eager_step_time(spec, host_batch, T, torch_steps) if torch_steps else None
  torch_note = ("skipped: --torch_steps 0" if not torch_steps else "skipped: torch is not installed")
  bare_step_time = statistics.median(bare_times)
  weighting = weighting_overhead(cfg, host_batch, rounds=rounds, steps=steps, progress=progress)
  return {
      "benchmark": "mtjax",
      "machine": {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
                  "devices": len(devices), "host": platform.processor() or platform.machine(),
                  "jax": jax.__version__},
      "model": dataclasses.asdict(spec),
      "batch": {"batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "tasks": T},
      "step_overhead": statistics.median(ratios),
      "step_overhead_spread": {"min": min(ratios), "max": max(ratios), "rounds": ratios},
      "trainer_step_time_s": step_time, "bare_step_time_s": bare_step_time,
      "trainer_step_times_s": trainer_times, "bare_step_times_s": bare_times,
      "loader_headroom": headroom, "loader_batches_per_s": batches_per_s,
      "loader_cost_per_batch_64_over_1": batches_per_s["1"] / batches_per_s["64"],
      "compile": {"train_step": train_compile, "eval_step": evaluation},
      # MFU with causal attention counted at half: against the device's dense spec peak (null
      # where the table has none, e.g. CPU) and against the matmul peak measured in this run.
      "mfu": perf.mfu(achieved, spec_peak), "mfu_measured_peak": achieved / peak,
      "spec_peak_flops_per_s": spec_peak,
      "model_flops_per_step": flops, "achieved_flops_per_s": achieved,
      "matmul_peak_flops_per_s": peak, "matmul_peak": {"n": n, "dtype": dtype},
      "torch_eager_cpu": ({"note": torch_note} if torch_time is None else
                          {"step_time_s": torch_time, "over_trainer": torch_time / step_time}),
      "weighting": weighting,
  }


def write(result: dict[str, Any], out: str) -> None:
  from etils import epath
  path = epath.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def table(result: dict[str, Any]) -> str:
  m = result["machine"]
  spread = result["step_overhead_spread"]
  lines = [
      f"machine: {m['device_kind']} x{m['devices']} ({m['platform']}), jax {m['jax']}",
      f"step_overhead     {result['step_overhead']:.3f}  (min {spread['min']:.3f}, max {spread['max']:.3f}; "
      f"trainer {result['trainer_step_time_s'] * 1e3:.1f} ms, bare {result['bare_step_time_s'] * 1e3:.1f} ms)",
      "loader_headroom   " + ", ".join(f"{k} tasks: {v:.1f}x" for k, v in result["loader_headroom"].items()),
      f"compile           train {result['compile']['train_step']['count']}x "
      f"{result['compile']['train_step']['seconds']:.2f}s, eval {result['compile']['eval_step']['count']}x "
      f"{result['compile']['eval_step']['seconds']:.2f}s",
      f"mfu               {_fmt(result['mfu'])} of the spec peak, "
      f"{result['mfu_measured_peak']:.3f} of the measured matmul peak "
      f"({result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s of "
      f"{result['matmul_peak_flops_per_s'] / 1e9:.1f}; causal attention counted at half)",
  ]
  t = result["torch_eager_cpu"]
  lines.append("torch eager cpu   " + (t["note"] if "note" in t else
                                     f"{t['step_time_s'] * 1e3:.1f} ms/step = {t['over_trainer']:.2f}x the trainer"))
  if "weighting" in result:
    lines.append("weighting         step time over static: " + ", ".join(
        f"{m} {v['over_static']:.3f}" for m, v in result["weighting"].items() if m != "static"))
  return "\n".join(lines)

