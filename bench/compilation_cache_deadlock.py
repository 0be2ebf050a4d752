"""A repro of the XLA:CPU deadlock seen with JAX's persistent compilation cache on several fake
devices: an executable loaded back from the cache hangs, now and then, in a collective inside a
scanned loop (a rendezvous timeout that aborts the process), while a freshly compiled one never
did. Why mtjax turns the cache off for multi-device CPU runs (train.compilation_cache=auto) and
the multidevice test tier runs without it; docs/compilation_cache_deadlock.md has the report.

  python bench/compilation_cache_deadlock.py --trials 20 --out bench/results/cache_deadlock.json

Each trial is a fresh process on D fake CPU devices (--devices, default 8) that jits one train
step and runs it --steps times: --model bare, a bare JAX model (no mtjax code: layers under
lax.scan, weights sharded over every device on a "fsdp" axis, so every layer all-gathers inside
the loop, plus a backward pass); --model mtjax, mtjax's own step (configs/demo.py, mesh fsdp=D,
data.seq_len --seq_len: where the deadlock was seen). The first trial compiles into an empty cache directory; every later trial loads
the executable back from it (jax_persistent_cache_min_compile_time_secs=0). A trial that does not
finish within --timeout seconds, or dies, counts as a hang. The same trials with the cache off are
the control. Prints and writes (--out) the counts per arm as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

TRIAL = r"""
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
layers, d, seq, batch, steps = (int(x) for x in sys.argv[1:6])
auto = (jax.sharding.AxisType.Auto,)
mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=auto)
w_sh = NamedSharding(mesh, P(None, "fsdp", None))  # [layers, d, d]: sharded rows
x_sh = NamedSharding(mesh, P("fsdp", None, None))  # [batch, seq, d]

def loss(w, x):
  def layer(h, wl):  # the weight is all-gathered inside the loop (a collective per layer)
    wl = jax.lax.with_sharding_constraint(wl, NamedSharding(mesh, P("fsdp", None)))
    return jnp.tanh(h @ wl) + h, None
  h, _ = jax.lax.scan(layer, x, w)
  return jnp.mean(h * h)

@jax.jit
def step(w, x):
  g = jax.grad(loss)(w, x)
  return w - 1e-3 * g

rng = np.random.default_rng(0)
w = jax.device_put(jnp.asarray(rng.normal(size=(layers, d, d)) / np.sqrt(d), jnp.float32), w_sh)
x = jax.device_put(jnp.asarray(rng.normal(size=(batch, seq, d)), jnp.float32), x_sh)
t0 = time.time()
for _ in range(steps):
  w = step(w, x)
jax.block_until_ready(w)
print("ok", round(time.time() - t0, 2))
"""

MTJAX_TRIAL = r"""
import sys, time
import jax, numpy as np
from mtjax import config as config_lib
from mtjax.data.loader import MixtureLoader
from mtjax.train import setup as setup_lib
seq, batch, steps = (int(x) for x in sys.argv[1:4])
cfg = config_lib.load("configs/demo.py", [f"--config.data.seq_len={seq}",
    f"--config.data.batch_size={batch}", "--config.mesh.fsdp=-1", "--config.train.progress=false",
    "--config.train.compilation_cache=on"])
run = setup_lib.build(cfg, decay_steps=100)
batch_arrays = next(MixtureLoader.from_config(run.config, prefetch=0)).arrays
step, state = run.jit_step(), run.state
T = cfg.num_tasks
t0 = time.time()
with jax.set_mesh(run.mesh):
  arrays = {k: jax.device_put(v, run.batch_sharding) for k, v in batch_arrays.items()}
  for _ in range(steps):
    state, m = step(state, arrays, np.ones(T, np.float32), np.zeros(T, np.float32))
  jax.block_until_ready(m)
print("ok", round(time.time() - t0, 2))
"""


def trial(args: argparse.Namespace, cache: str | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
  if cache is None:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  else:
    env.update(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if args.model == "mtjax":
    cmd = [sys.executable, "-c", MTJAX_TRIAL, str(args.seq_len), str(args.batch), str(args.steps)]
  else:
    cmd = [sys.executable, "-c", TRIAL, str(args.layers), str(args.d_model), str(args.seq_len),
           str(args.batch), str(args.steps)]
  t0 = time.time()
  try:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  except subprocess.TimeoutExpired:
    return {"outcome": "hang (timeout)", "seconds": round(time.time() - t0, 1)}
  if done.returncode != 0:
    lines = (done.stderr or "").splitlines()
    # XLA's rendezvous names the collective each device thread waits in: threads that disagree on
    # the next collective (one in an all-gather, the rest in an all-reduce) are the deadlock.
    waits = sorted({line.split("for `")[1].split(" RendezvousKey")[0] + " op_id=" +
                    line.split("op_id=")[1].split("}")[0]
                    for line in lines if "Termination timeout for `" in line and "op_id=" in line})
    fatal = next((line for line in lines if line.startswith("F")), lines[-1] if lines else "")
    return {"outcome": f"died (exit {done.returncode})", "seconds": round(time.time() - t0, 1),
            "fatal": fatal[:300], "waiting_in": waits}
  return {"outcome": "ok", "seconds": round(time.time() - t0, 1)}


def main() -> int:
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("--trials", type=int, default=10, help="processes per arm (cache on, cache off)")
  p.add_argument("--model", choices=("bare", "mtjax"), default="bare")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--timeout", type=float, default=120.0, help="seconds before a trial counts as hung")
  p.add_argument("--out", default="", help="write the result JSON here too")
  args = p.parse_args()
  if args.trials < 2 or args.devices < 1:
    print("error: --trials: expected at least 2 (the first fills the cache)", file=sys.stderr)
    return 2
  result: dict = {"settings": vars(args), "arms": {}}
  with tempfile.TemporaryDirectory(prefix="jax-cache-") as cache:
    for arm, where in (("cache_on", cache), ("cache_off", None)):
      runs = []
      for i in range(args.trials):
        runs.append(trial(args, where))
        print(f"{arm} trial {i}: {runs[-1]['outcome']} ({runs[-1]['seconds']} s)", flush=True)
      result["arms"][arm] = {
          "trials": len(runs), "hung_or_died": sum(r["outcome"] != "ok" for r in runs),
          "runs": runs}
    result["cache_entries"] = len(list(pathlib.Path(cache).iterdir()))
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
