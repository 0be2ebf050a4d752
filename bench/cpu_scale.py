"""CPU scaling figures of the performance issue, side by side in one run, as JSON.

  python bench/cpu_scale.py --out docs/bench/cpu_scale.json [--rounds 5]

- depth: wall seconds of a whole 1-step `mtjax train` run (a fresh process: import, setup,
  compile, one step, checkpoint, plots) at the tiny config's shapes with 2 and 24 layers,
  interleaved rounds, median ratio (layers run under a scan, so compile time should not grow with
  depth); and the train step's compile seconds by depth (2, 8, 24) in one process.
- vocab: peak RSS (VmHWM) of a 2-step run at d_model 256, batch 8 x 512, vocab 512 vs 131072, one
  fresh process each; the chunked loss never materializes [B, L, V] float32 logits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "demo.py") + ":tiny"

# Runs one training in this fresh process and prints its peak RSS (VmHWM) as JSON.
_CHILD = """
import json, sys
from mtjax import cli
code = cli.main(sys.argv[1:])
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("RESULT " + json.dumps({"code": code, "peak_rss_bytes": hwm}))
"""


def _train(args: list[str]) -> tuple[float, dict]:
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, "-c", _CHILD, "train", "--config", TINY, "--workdir", work,
           "--config.train.progress=false", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    seconds = time.perf_counter() - start
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
  return seconds, json.loads(lines[-1].removeprefix("RESULT "))


def compile_seconds(depths: list[int]) -> dict[str, float]:
  """The real train step's backend compile time per depth, in this process."""
  import numpy as np

  from mtjax import config as config_lib
  from mtjax.monitoring import CompileCounter
  from mtjax.train import setup as setup_lib
  out = {}
  for depth in depths:
    cfg = config_lib.load(TINY, [f"--config.model.num_layers={depth}"])
    run = setup_lib.build(cfg, decay_steps=10)
    step = run.jit_step()
    from mtjax.data.loader import MixtureLoader
    loader = MixtureLoader.from_config(run.config, prefetch=0)
    batch = next(loader).arrays
    loader.close()
    t = np.ones(run.config.num_tasks, np.float32)
    import jax
    counter = CompileCounter()
    with jax.set_mesh(run.mesh), counter:
      state, metrics = step(run.state, batch, t, 0 * t)
      jax.block_until_ready(metrics)
    out[str(depth)] = counter.seconds
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)

  walls: dict[str, list[float]] = {"2": [], "24": []}
  for r in range(args.rounds):  # interleaved: machine noise hits both depths alike
    for depth in walls:
      seconds, _ = _train([f"--config.model.num_layers={depth}", "--config.train.steps=1"])
      walls[depth].append(seconds)
    print(f"round {r + 1}: 2 layers {walls['2'][-1]:.1f}s, 24 layers {walls['24'][-1]:.1f}s",
          file=sys.stderr)
  ratios = [b / a for a, b in zip(walls["2"], walls["24"])]

  shape = ["--config.model.d_model=256", "--config.model.num_heads=4",
           "--config.model.num_kv_heads=2", "--config.model.mlp_dim=1024",
           "--config.data.batch_size=8", "--config.data.seq_len=512", "--config.train.steps=2",
           "--config.checkpoint.every=0", "--config.eval.every=0"]
  rss = {}
  for vocab in (512, 131072):
    _, result = _train([*shape, f"--config.model.vocab_size={vocab}"])
    rss[str(vocab)] = result["peak_rss_bytes"]
    print(f"vocab {vocab}: peak RSS {rss[str(vocab)] / 1e9:.2f} GB", file=sys.stderr)

  import jax
  result = {
      "benchmark": "cpu_scale",
      "machine": {"cpus": os.cpu_count(), "host": platform.processor() or platform.machine(),
                  "jax": jax.__version__, "load_average": os.getloadavg()},
      "depth_wall_s": walls, "depth_ratio_24_over_2": statistics.median(ratios),
      "depth_ratios": ratios,
      "compile_s_by_depth": compile_seconds([2, 8, 24]),
      "peak_rss_bytes_by_vocab": rss,
      "peak_rss_131072_minus_512_bytes": rss["131072"] - rss["512"],
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: result[k] for k in ("depth_ratio_24_over_2", "compile_s_by_depth",
                                           "peak_rss_131072_minus_512_bytes")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
