"""A sweep preempted during a variant stops with exit 3, marks nothing finished, and a rerun
continues that variant (issue: a preempted variant used to be marked DONE and the sweep went on)."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from run_files import rows as _rows

pytestmark = pytest.mark.slow

DRIVER = str(REPO / "tests" / "fault_driver.py")


def test_sigterm_during_a_variant_stops_the_sweep_with_exit_3_and_rerun_continues(tmp_path):
  config = tmp_path / "sweep_cfg.py"
  config.write_text(
      "from mtjax.config import sibling_config\n\n\n"
      "def get_config():\n"
      f"  c = sibling_config({str(REPO / 'configs' / 'x.py')!r}, 'demo.py', 'tiny')\n"
      "  c.train.progress = False\n"
      "  c.checkpoint.every = 0\n"
      "  return c\n\n\n"
      "def get_sweep():\n"
      "  return [{'seed': 0}, {'seed': 1}]\n")
  out = tmp_path / "sweep"
  first = out / "000_seed=0"
  proc = subprocess.Popen([sys.executable, DRIVER, "--step-delay", "0.05", "--", "sweep",
                           "--config", str(config), "--workdir", str(out),
                           "--config.train.steps=3000"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while len(_rows(first)) < 3:
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 3, stderr[-2000:]
  assert "Traceback" not in stderr
  reached = max(r["step"] for r in _rows(first))
  assert not (first / "DONE").exists()  # not finished: nothing is marked DONE
  assert (first / "checkpoints" / str(reached)).is_dir()  # saved where it stopped
  assert not (out / "001_seed=1").exists()  # the sweep did not go on
  assert not (out / "results.csv").exists()

  # The rerun continues variant 000 from its checkpoint, then runs variant 001.
  steps = reached + 2
  rerun = subprocess.run([sys.executable, "-m", "mtjax", "sweep", "--config", str(config),
                          "--workdir", str(out), f"--config.train.steps={steps}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert [r["step"] for r in _rows(first) if "train/loss" in r] == list(range(1, steps + 1))
  assert (first / "DONE").exists() and (out / "001_seed=1" / "DONE").exists()
  assert "ran 2, skipped 0" in rerun.stdout
