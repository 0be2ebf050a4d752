"""Loader headroom: rows/s the mixture loader produces over rows/s the demo's train step consumes,
with 1, 4 and 64 tasks (the per-row cost must stay flat as tasks grow). Side by side, one run.

  python bench/loader.py --out bench/results/loader.json
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _register_bench_tasks(n: int) -> list[str]:
  """n copies of the synthetic tasks under new names (same lengths, independent streams)."""
  from mtjax import tasks
  base = ["reverse", "addition", "grammar"]
  names = []
  for i in range(n):
    src = tasks.get(base[i % 3])
    name = f"bench{i}_{src.name}"
    tasks.register(tasks.Task(name, src.source, src.is_correct), replace=True)
    names.append(name)
  return names


def produced_rows_per_s(cfg, seconds: float) -> float:
  from mtjax.data.loader import MixtureLoader
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  next(loader)  # warm caches
  rows, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    rows += next(loader).arrays["inputs"].shape[0]
  return rows / (time.perf_counter() - t0)


def consumed_rows_per_s(cfg, steps: int) -> float:
  import jax
  import numpy as np
  from mtjax.data.loader import MixtureLoader
  from mtjax.model import ModelSpec
  from mtjax.parallel import sharding
  from mtjax.parallel.mesh import make_mesh
  from mtjax.train import optimizer
  from mtjax.train import step as step_lib
  mesh = make_mesh(cfg.mesh)
  spec = ModelSpec.from_config(cfg.model, 259, jax.devices()[0].platform)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
  graphdef, state, shardings = step_lib.init_state(mesh, spec, tx, 0)
  fn = step_lib.jit_step(step_lib.make_step_fn(graphdef, tx, schedule, num_tasks=cfg.num_tasks),
                         mesh, shardings)
  batch = next(MixtureLoader.from_config(cfg, prefetch=0)).arrays
  batch = {k: jax.device_put(v, sharding.named(mesh, step_lib.BATCH_AXES)) for k, v in batch.items()}
  w = np.ones(cfg.num_tasks, np.float32)
  c = np.zeros(cfg.num_tasks, np.float32)
  with jax.set_mesh(mesh):
    state, m = fn(state, batch, w, c)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = fn(state, batch, w, c)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  return cfg.data.batch_size / statistics.median(times)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
  parser.add_argument("--seconds", type=float, default=3.0, help="loader timing per task count")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loader.json"))
  args = parser.parse_args()

  from mtjax import config as config_lib
  base = config_lib.load(args.config, ["--config.train.progress=false"])
  consumed = consumed_rows_per_s(base, args.steps)
  produced = {}
  for n in (1, 4, 64):
    names = _register_bench_tasks(n)
    cfg = base.replace(**{"data.tasks": names, "data.mixture": {t: 1.0 for t in names},
                          "train.loss_weights": {}, "train.entropy_coefs": {}})
    produced[str(n)] = produced_rows_per_s(cfg, args.seconds)
  report = {
      "benchmark": "loader",
      "batch_size": base.data.batch_size, "seq_len": base.data.seq_len,
      "rows_per_s_consumed_by_step": consumed,
      "rows_per_s_produced": produced,
      "loader_headroom": {k: v / consumed for k, v in produced.items()},
      "cost_per_row_64_over_1": produced["1"] / produced["64"],
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
