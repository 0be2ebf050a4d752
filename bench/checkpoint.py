"""How long the training loop blocks per async checkpoint save, as a ratio to the step time.

Side by side in one run: the demo model trains with a save every --every steps; the loop's
blocking time per save (perf/checkpoint_block_s) is compared with the median step time, and with
the time of a full synchronous save (write and commit) of the same state.

  python bench/checkpoint.py --out bench/results/checkpoint.json
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
  parser.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--every", type=int, default=10)
  parser.add_argument("--out", default=str(REPO / "bench" / "results" / "checkpoint.json"))
  args = parser.parse_args()

  import jax
  from etils import epath
  from mtjax import config as config_lib
  from mtjax import recipes
  from mtjax.train.checkpoint import Checkpointer

  cfg = config_lib.load(args.config, [f"--config.train.steps={args.steps}",
                                      "--config.train.log_every=1", "--config.train.progress=false",
                                      f"--config.checkpoint.every={args.every}"])
  with tempfile.TemporaryDirectory() as tmp:
    result = recipes.run(cfg, pathlib.Path(tmp) / "run")
    rows = result.history[2:]  # past compilation
    step_s = statistics.median(r["perf/step_time_s"] for r in rows if "perf/checkpoint_block_s" not in r)
    block_s = [r["perf/checkpoint_block_s"] for r in rows if "perf/checkpoint_block_s" in r]
    ck = Checkpointer(epath.Path(tmp) / "sync", cfg.checkpoint)
    t0 = time.perf_counter()
    ck.save(1, result.state, {"next_example": 0}, cfg, {"decay_steps": args.steps})
    ck.wait()
    sync_s = time.perf_counter() - t0
    ck.close()
  n_params = sum(x.size for x in jax.tree.leaves(result.state.params))
  report = {
      "benchmark": "checkpoint",
      "config": args.config, "steps": args.steps, "save_every": args.every,
      "params": int(n_params), "devices": jax.device_count(), "backend": jax.default_backend(),
      "step_time_s_median": step_s,
      "async_save_block_s": block_s,
      "async_save_block_s_median": statistics.median(block_s),
      "block_over_step_time": statistics.median(block_s) / step_s,
      "sync_save_s": sync_s,
      "block_over_sync_save": statistics.median(block_s) / sync_s,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps({k: v for k, v in report.items() if k != "async_save_block_s"}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
