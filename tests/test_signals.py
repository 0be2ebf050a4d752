"""Signals at every phase of a run: a repeated signal never cuts the emergency save short, a signal
before the first step exits 3 with the workdir as it was, one after the last step lets the run
finish (exit 0, plots drawn). Every arm is a subprocess launched the same way, so bitwise
comparisons between them are fair (tests/test_faults.py does the same for kills)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEMO, REPO
from run_files import checkpoints as _checkpoints
from run_files import rows as _rows

DRIVER = str(REPO / "tests" / "fault_driver.py")
STEPS = 12
ARGS = ["--config", f"{DEMO}:tiny", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.checkpoint.every=0"]


def _cmd(workdir, *hooks):
  return [sys.executable, DRIVER, *hooks, "--", "train", *ARGS, "--workdir", str(workdir)]


def _saving(workdir):
  return any("tmp" in n for n in _checkpoints(workdir)[1])


def _wait_for(predicate, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert proc.poll() is None, "the run ended before the signal could be sent"
    time.sleep(0.02)
  raise TimeoutError


def _run(workdir, *hooks):
  proc = subprocess.run(_cmd(workdir, *hooks), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def _assert_same_losses(reference, workdir):
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no duplicates, no gaps
  assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in _rows(reference)]  # bitwise


# In-process: the guard itself.

def test_guard_logs_and_ignores_repeated_signals_and_restores_the_handlers(capfd):
  from mtjax.train import preemption
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  guard = preemption.guard()
  with guard:
    assert preemption.guard() is guard  # what a Loop built inside picks up
    with guard:  # nested (run() around setup, Loop.run inside): stays installed after the inner
      os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
    assert (guard.received, guard.count, guard.name) == (signal.SIGTERM, 3, "SIGTERM")
    assert guard.should_stop(1)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert preemption.guard() is not guard
  err = capfd.readouterr().err.splitlines()
  assert len(err) == 3, err  # one line per signal
  assert "SIGTERM received: stopping once the steps in flight finish, saving first" in err[0]
  assert "SIGTERM received again: ignored until the checkpoint is committed" in err[1]
  assert "SIGINT received again: ignored" in err[2]


def test_guard_after_the_last_step_says_the_run_finishes(capfd):
  from mtjax.train import preemption
  with preemption.guard() as guard:
    guard.finishing = True
    os.kill(os.getpid(), signal.SIGINT)
  assert guard.received == signal.SIGINT
  assert "SIGINT received after the last step: finishing the run" in capfd.readouterr().err


# Subprocesses.

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _run(workdir)
  return workdir


@pytest.mark.slow
def test_repeated_signals_during_the_emergency_save_are_ignored_then_exit_3(straight, tmp_path):
  # Every commit is held 3 s, so the later signals land while the emergency save is written.
  proc = subprocess.Popen(_cmd(tmp_path, "--step-delay", "0.2", "--finalize-delay", "3"),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: len(_rows(tmp_path)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  _wait_for(lambda: _saving(tmp_path), proc)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)  # and a Ctrl-C
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert err.count("SIGTERM received again: ignored") == 1 and "SIGINT received again" in err, err
  reached = max(r["step"] for r in _rows(tmp_path))
  assert 3 <= reached < STEPS
  assert f"saved step {reached}" in err
  assert _checkpoints(tmp_path) == ([reached], [])  # committed where it stopped; no tmp left
  _run(tmp_path)  # resumes from `reached`
  _assert_same_losses(straight, tmp_path)


@pytest.mark.slow
def test_signal_before_the_first_step_exits_3_with_nothing_saved_and_rerun_completes(
    straight, tmp_path):
  marker = tmp_path / "in_setup"
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_cmd(workdir, "--first-batch-delay", "4", "--marker", str(marker)),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(marker.exists, proc)
  assert not _rows(workdir)  # no step ran yet
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err[-3000:]
  assert "Traceback" not in err and "before the first step: nothing new to save" in err, err
  assert not _rows(workdir) and _checkpoints(workdir) == ([], [])  # as it was: nothing half-done
  _run(workdir)
  _assert_same_losses(straight, workdir)


@pytest.mark.slow
def test_signal_after_the_last_step_finishes_the_run_with_exit_0(straight, tmp_path):
  # The final save's commit is held 3 s; the signals land while the loop waits for it.
  proc = subprocess.Popen(_cmd(tmp_path, "--finalize-delay", "3", "--finalize-from", str(STEPS)),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _saving(tmp_path), proc)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "SIGTERM received after the last step" in err, err
  assert "preempted" not in err and f"done: step {STEPS}" in out
  assert _checkpoints(tmp_path) == ([STEPS], [])
  assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == \
      sorted(p.name for p in (straight / "plots").glob("*.png")) != []
  _assert_same_losses(straight, tmp_path)


@pytest.mark.slow
def test_signals_during_setup_exit_3_and_during_plots_exit_0(straight, tmp_path):
  # During setup (the guard is entered before the workdir lock and setup): exit 3, nothing saved.
  marker = tmp_path / "in_setup"
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_cmd(workdir, "--setup-delay", "3", "--marker", str(marker)),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(marker.exists, proc)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err[-3000:]
  assert "Traceback" not in err and not _rows(workdir) and _checkpoints(workdir) == ([], [])
  # While the plots are drawn, after the final save: the run completes, exit 0, plots there.
  marker = tmp_path / "in_plots"
  proc = subprocess.Popen(_cmd(workdir, "--plots-delay", "3", "--marker", str(marker)),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(marker.exists, proc)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and f"done: step {STEPS}" in out
  assert sorted(p.name for p in (workdir / "plots").glob("*.png")) == \
      sorted(p.name for p in (straight / "plots").glob("*.png")) != []
  _assert_same_losses(straight, workdir)


@pytest.mark.slow
def test_a_single_process_run_never_dispatches_a_step_before_the_previous_one_finished(tmp_path):
  """So a signal stops the run at the next step boundary: at every step's dispatch the state
  passed in (the previous step's output) has finished. Before, with a log window of many steps
  the host dispatched steps ahead of the device ("pending" here on every step after the first of
  a window) and a SIGTERM on SmolLM2 stopped ~3 steps (~50 s) later. A model big enough that a
  step takes far longer than its dispatch."""
  record = tmp_path / "run_ahead.txt"
  heavy = ["--config.model.d_model=256", "--config.model.mlp_dim=1024",
           "--config.data.batch_size=32", "--config.data.seq_len=128", "--config.train.steps=8",
           "--config.train.log_every=100", "--config.train.progress=false"]
  proc = subprocess.run([sys.executable, DRIVER, "--run-ahead", str(record), "--", "train",
                         "--config", f"{DEMO}:tiny", *heavy, "--config.checkpoint.every=0",
                         "--workdir", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  seen = record.read_text().split()
  assert len(seen) == 8 and seen[1:] == ["ready"] * 7, seen
