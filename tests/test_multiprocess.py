"""A real multi-process run: 2 processes x 4 CPU devices (jax.distributed, gloo) agree with
1 process x 8 devices for 10 steps, and checkpoints resume across process counts both ways."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO, REPO

pytestmark = [pytest.mark.slow, pytest.mark.multidevice]

ARGS = ["--config", f"{DEMO}:tiny", "--config.train.progress=false", "--config.optimizer.decay_steps=10"]


def _losses(workdir):
  return [json.loads(l)["train/loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _single(workdir, steps):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "mtjax", "train", *ARGS, "--workdir", str(workdir),
                         f"--config.train.steps={steps}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def _multi(workdir, steps):
  env = dict(os.environ, MTJAX=f"{sys.executable} -m mtjax")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(["bash", str(REPO / "launch" / "multiprocess_cpu.sh"), "2", *ARGS,
                         "--workdir", str(workdir), f"--config.train.steps={steps}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_two_processes_match_one_and_resume_across_process_counts(tmp_path):
  multi = tmp_path / "multi"
  proc = _multi(multi, 10)
  assert proc.stdout.count("done: step 10") == 1  # only process 0 reports
  env_json = json.loads((multi / "env.json").read_text())
  assert env_json["process_count"] == 2 and env_json["device_count"] == 8
  straight = tmp_path / "straight"
  _single(straight, 10)
  np.testing.assert_allclose(_losses(multi), _losses(straight), rtol=1e-4)  # 10 steps, 2x4 == 1x8
  _single(straight, 14)
  _single(multi, 14)  # the 2-process checkpoint (and loader state) resumes in 1 process ...
  np.testing.assert_allclose(_losses(multi), _losses(straight), rtol=1e-4)
  one_then_two = tmp_path / "one_then_two"
  _single(one_then_two, 6)
  _multi(one_then_two, 10)  # ... and a 1-process checkpoint resumes in 2 processes
  np.testing.assert_allclose(_losses(one_then_two), _losses(straight)[:10], rtol=1e-4)


def test_dry_run_prints_one_command_per_process():
  env = dict(os.environ, DRY_RUN="1", PORT="23456")
  out = subprocess.run(["bash", str(REPO / "launch" / "multiprocess_cpu.sh"), "4", "--config", "x.py"],
                       env=env, capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 4
  assert all("--num_processes 4" in line and "127.0.0.1:23456" in line for line in out)
  assert "--process_id 3" in out[3] and "device_count=2" in out[0]
