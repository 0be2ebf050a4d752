"""Kill, preemption and save-interruption: the run resumes with nothing lost and the same result.

Every arm is a subprocess launched the same way (same device count and threads), so bitwise
comparisons between them are fair.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import DEMO, REPO

pytestmark = pytest.mark.slow

DRIVER = str(REPO / "tests" / "fault_driver.py")
STEPS = 40
ARGS = ["--config", f"{DEMO}:tiny", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.checkpoint.every=20", "--config.checkpoint.keep=5"]


def _cmd(workdir, *hooks, extra=()):
  return [sys.executable, DRIVER, *hooks, "--", "train", *ARGS, "--workdir", str(workdir), *extra]


def _rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir, step):
  tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return tree["params"]


def _wait_for(predicate, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert proc.poll() is None, "the run ended before the fault could be injected"
    time.sleep(0.05)
  raise TimeoutError


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  proc = subprocess.run(_cmd(workdir), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def _assert_same_run(a, b):
  rows_a, rows_b = _rows(a), _rows(b)
  assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))  # no duplicates, no gaps
  assert [r["train/loss"] for r in rows_b] == [r["train/loss"] for r in rows_a]  # bitwise
  for x, y in zip(_leaves(_params(a, STEPS)), _leaves(_params(b, STEPS))):
    np.testing.assert_array_equal(x, y)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigkill_after_checkpoint_then_resume_is_bitwise_identical(straight, tmp_path):
  proc = subprocess.Popen(_cmd(tmp_path, "--step-delay", "0.1"), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: (tmp_path / "checkpoints" / "20").is_dir(), proc)
  time.sleep(0.5)  # a few steps past the checkpoint, so there are metric rows to de-duplicate
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert max(r["step"] for r in _rows(tmp_path)) > 20
  resumed = subprocess.run(_cmd(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _assert_same_run(straight, tmp_path)


def test_sigterm_saves_exits_3_and_resumes(straight, tmp_path):
  proc = subprocess.Popen(_cmd(tmp_path, "--step-delay", "0.1"), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(_rows(tmp_path)) >= 8, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err[-2000:]
  reached = max(r["step"] for r in _rows(tmp_path))
  assert 8 <= reached < STEPS
  assert (tmp_path / "checkpoints" / str(reached)).is_dir()  # saved at the step it reached
  assert f"saved step {reached}" in err
  resumed = subprocess.run(_cmd(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _assert_same_run(straight, tmp_path)


def test_kill_during_save_restores_previous_complete_checkpoint(straight, tmp_path):
  # Checkpoints every 4 steps; the commit of step 8 (and later) is held, and we kill meanwhile.
  extra = ["--config.checkpoint.every=4"]
  proc = subprocess.Popen(_cmd(tmp_path, "--finalize-delay", "60", "--finalize-from", "8",
                               extra=extra), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "checkpoints"
  _wait_for(lambda: ckpts.is_dir() and any(p.name.startswith("8.") for p in ckpts.iterdir()), proc)
  time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (ckpts / "8").exists()  # half-written: only the temporary directory is there
  manager = ocp.CheckpointManager(ckpts)
  assert manager.latest_step() == 4
  manager.close()
  resumed = subprocess.run(_cmd(tmp_path, extra=extra), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _assert_same_run(straight, tmp_path)
