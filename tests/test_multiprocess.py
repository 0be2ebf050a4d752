"""A real multi-process run: 2 processes x 4 CPU devices (jax.distributed, gloo) agree with
1 process x 8 devices, and a checkpoint written by 2 processes resumes in 1."""

import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO, REPO

pytestmark = pytest.mark.slow

ARGS = ["--config", f"{DEMO}:tiny", "--config.train.progress=false", "--config.optimizer.decay_steps=10"]


def _losses(workdir):
  return [json.loads(l)["train/loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _single(workdir, steps):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "mtjax", "train", *ARGS, "--workdir", str(workdir),
                         f"--config.train.steps={steps}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_two_processes_match_one_and_resume_across_process_counts(tmp_path):
  env = dict(os.environ, MTJAX=f"{sys.executable} -m mtjax")
  env.pop("XLA_FLAGS", None)
  multi = tmp_path / "multi"
  proc = subprocess.run(["bash", str(REPO / "launch" / "multiprocess_cpu.sh"), "2", *ARGS,
                         "--workdir", str(multi), "--config.train.steps=6"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("done: step 6") == 1  # only process 0 reports
  env_json = json.loads((multi / "env.json").read_text())
  assert env_json["process_count"] == 2 and env_json["device_count"] == 8
  straight = tmp_path / "straight"
  _single(straight, 10)
  assert _losses(multi) == _losses(straight)[:6]  # same global batches, same math
  _single(multi, 10)  # the 2-process checkpoint (and loader state) resumes in 1 process
  assert _losses(multi) == _losses(straight)


def test_dry_run_prints_one_command_per_process():
  env = dict(os.environ, DRY_RUN="1", PORT="23456")
  out = subprocess.run(["bash", str(REPO / "launch" / "multiprocess_cpu.sh"), "4", "--config", "x.py"],
                       env=env, capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 4
  assert all("--num_processes 4" in line and "127.0.0.1:23456" in line for line in out)
  assert "--process_id 3" in out[3] and "device_count=2" in out[0]
