"""Loader tokens/s at 64 x 1024 with 1, 4 and 64 tasks: this working tree against a previous commit.

  .venv/bin/python bench/loader_speed.py [--rev HEAD] [--rounds 5] [--seconds 2]
      [--workers 0,2] [--out docs/bench/loader_speed_cpu.json]

Each arm is a child process with its own `mtjax` on PYTHONPATH: the previous commit's package
(`git archive REV mtjax configs` into a temp directory) or this working tree's, with data.workers
= w for each w of --workers. Rounds interleave the arms (the order alternates each round), so
noise on a shared machine hits all alike; each arm keeps one loader per task count across rounds
(the stream continues, as in training). Tokens/s = batches/s x batch_size x seq_len (the slots the
step consumes; packing is identical in every arm: the first batches' digests must agree). The
ratio is the median current over the median previous, per task count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_COUNTS = (1, 4, 64)
DIGEST_STEPS = 3


# ---------------------------------------------------------------- the child (one arm)

def _loader(n: int, batch_size: int, seq_len: int, prefetch: int, workers: int | None):
  from mtjax import bench, config
  from mtjax.data.loader import MixtureLoader
  cfg = config.load(os.path.join(os.environ["ARM_ROOT"], "configs", "demo.py") + ":tiny",
                    ["--config.train.progress=false"])
  cfg = bench.with_tasks(cfg, bench.register_copies(n))
  cfg = cfg.replace(**{"data.batch_size": batch_size, "data.seq_len": seq_len})
  if workers is not None:
    cfg = cfg.replace(**{"data.workers": workers})
  return MixtureLoader.from_config(cfg, prefetch=prefetch)


def _arm(batch_size: int, seq_len: int, prefetch: int, workers: int | None) -> None:
  import mtjax
  print(json.dumps({"mtjax": mtjax.__file__}), flush=True)
  loaders: dict[int, Any] = {}
  for line in sys.stdin:
    cmd = json.loads(line)
    n = cmd["tasks"]
    if cmd["op"] == "digest":  # the first batches of a fresh loader
      fresh = _loader(n, batch_size, seq_len, 0, workers)
      h = hashlib.sha256()
      for _ in range(DIGEST_STEPS):
        b = next(fresh)
        for k in sorted(b.arrays):
          h.update(k.encode() + b.arrays[k].tobytes())
        # Keys both arms have: a revision before data.truncate has no "too_long" count.
        state = {k: v for k, v in b.state_after.items() if k != "too_long"}
        h.update(json.dumps(state, sort_keys=True).encode())
      fresh.close()
      print(json.dumps({"digest": h.hexdigest()}), flush=True)
      continue
    if n not in loaders:
      loaders[n] = _loader(n, batch_size, seq_len, prefetch, workers)
      next(loaders[n])  # start-up (threads, workers) is not timed
    loader, batches, t0 = loaders[n], 0, time.perf_counter()
    while time.perf_counter() - t0 < cmd["seconds"]:
      next(loader)
      batches += 1
    dt = time.perf_counter() - t0
    print(json.dumps({"batches_per_s": batches / dt,
                      "tokens_per_s": batches * batch_size * seq_len / dt}), flush=True)
  for loader in loaders.values():
    loader.close()


# ---------------------------------------------------------------- the parent

class Arm:
  def __init__(self, name: str, root: str, args: argparse.Namespace, workers: int | None):
    env = dict(os.environ, PYTHONPATH=root, ARM_ROOT=root, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--arm", "--batch_size", str(args.batch_size),
           "--seq_len", str(args.seq_len), "--prefetch", str(args.prefetch)]
    if workers is not None:
      cmd += ["--arm_workers", str(workers)]
    self.name = name
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=root)
    where = json.loads(self._line())["mtjax"]
    if not where.startswith(root):
      raise RuntimeError(f"{name}: imported mtjax from {where}, not from {root}")

  def _line(self) -> str:
    assert self.proc.stdout is not None
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"arm {self.name} exited ({self.proc.wait()})")
    return line

  def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
    assert self.proc.stdin is not None
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return json.loads(self._line())

  def close(self) -> None:
    if self.proc.stdin is not None:
      self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                        text=True).stdout.strip()


def _machine() -> dict[str, Any]:
  import numpy as np
  facts: dict[str, Any] = {"host": platform.node(), "processor": platform.processor() or
                           platform.machine(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "numpy": np.__version__,
                           "platform": platform.platform()}
  try:
    with open("/proc/cpuinfo") as f:
      facts["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                 if ln.startswith("model name")), "")
  except OSError:
    pass
  if hasattr(os, "getloadavg"):
    facts["loadavg_at_start"] = list(os.getloadavg())
  return facts


def main() -> None:
  p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  p.add_argument("--rev", default="HEAD", help="the previous commit")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--seconds", type=float, default=2.0)
  p.add_argument("--workers", default="0,2", help="data.workers of the current arms")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--prefetch", type=int, default=2)
  p.add_argument("--out", default=os.path.join(REPO, "docs", "bench", "loader_speed_cpu.json"))
  p.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--arm_workers", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.arm:
    _arm(args.batch_size, args.seq_len, args.prefetch, args.arm_workers)
    return

  rev = _git("rev-parse", args.rev)
  dirty = bool(_git("status", "--porcelain", "--", "mtjax"))
  with tempfile.TemporaryDirectory(prefix="mtjax-prev-") as prev_root:
    archive = os.path.join(prev_root, "prev.tar")
    _git("archive", "-o", archive, rev, "mtjax", "configs")
    with tarfile.open(archive) as tar:
      tar.extractall(prev_root, filter="data")
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    arms = [Arm("previous", prev_root, args, None)]
    arms += [Arm(f"current_workers{w}", REPO, args, w) for w in workers]
    try:
      digests = {a.name: {n: a.ask({"op": "digest", "tasks": n})["digest"] for n in TASK_COUNTS}
                 for a in arms}
      same = {str(n): len({d[n] for d in digests.values()}) == 1 for n in TASK_COUNTS}
      print(f"loader_speed: first {DIGEST_STEPS} batches identical across arms: {same}")
      rates: dict[str, dict[str, list[float]]] = {a.name: {str(n): [] for n in TASK_COUNTS}
                                                  for a in arms}
      for r in range(args.rounds):
        for n in TASK_COUNTS:
          for a in (arms if r % 2 == 0 else arms[::-1]):
            got = a.ask({"op": "measure", "tasks": n, "seconds": args.seconds})
            rates[a.name][str(n)].append(got["tokens_per_s"])
        print(f"loader_speed: round {r + 1}/{args.rounds}: " + "; ".join(
            f"{n} tasks " + ", ".join(f"{a.name} {rates[a.name][str(n)][-1] / 1e6:.2f}M"
                                      for a in arms) for n in TASK_COUNTS) + " tokens/s")
    finally:
      for a in arms:
        a.close()
  median = {name: {n: statistics.median(v) for n, v in per.items()} for name, per in rates.items()}
  ratios = {a.name: {str(n): median[a.name][str(n)] / median["previous"][str(n)]
                     for n in TASK_COUNTS} for a in arms if a.name != "previous"}
  result = {
      "benchmark": "loader_speed",
      "what": f"MixtureLoader tokens/s (batches/s x {args.batch_size} x {args.seq_len}), demo "
              "tiny config with bench.register_copies(n) tasks, prefetch "
              f"{args.prefetch}, median of {args.rounds} interleaved rounds of {args.seconds} s",
      "previous_commit": rev, "current_commit": _git("rev-parse", "HEAD"),
      "current_is_working_tree": True, "working_tree_mtjax_dirty": dirty,
      "machine": _machine(),
      "batch": {"batch_size": args.batch_size, "seq_len": args.seq_len, "prefetch": args.prefetch},
      "identical_batches": same, "digests": {k: {str(n): v for n, v in d.items()}
                                             for k, d in digests.items()},
      "tokens_per_s_median": median, "tokens_per_s_rounds": rates,
      "ratio_over_previous": ratios,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(json.dumps(result, indent=2) + "\n")
  for name, per in ratios.items():
    print(f"loader_speed: {name} over previous: " +
          ", ".join(f"{n} tasks {v:.2f}x" for n, v in per.items()))
  print(f"loader_speed: wrote {args.out}")
  if not all(same.values()):
    sys.exit("loader_speed: the arms made different batches")


if __name__ == "__main__":
  main()
