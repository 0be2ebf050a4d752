"""SIGTERM in a real multi-process run (2 processes x 4 CPU devices, jax.distributed, gloo, through
launch/multiprocess_cpu.sh): a signal to ONE process, and later one to BOTH (through the
launcher, which forwards it, during the resumed run), each stops every process at the same step
within a few steps, commits one checkpoint there, and exits 3 everywhere; the resumed segment's
losses are bitwise those of an uninterrupted run launched the same way. Three launches of ~20 s
each on 2 cores (the uninterrupted one runs beside the first, mostly sleeping, one).
Also: on a TPU VM `mtjax train` starts jax.distributed with no arguments (JAX reads the slice)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import DEMO, REPO
from run_files import checkpoints as _checkpoints
from run_files import rows as _rows

pytestmark = pytest.mark.multidevice

DRIVER = str(REPO / "tests" / "fault_driver.py")
LAUNCHER = str(REPO / "launch" / "multiprocess_cpu.sh")
STEPS = 16
ARGS = ["--config", f"{DEMO}:tiny", "--config.train.progress=false", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", "--config.checkpoint.every=0",
        "--config.train.preemption_every=1"]


def _launch(workdir, *hooks):
  env = dict(os.environ, MTJAX=" ".join([sys.executable, DRIVER, *hooks, "--"]))
  env.pop("XLA_FLAGS", None)  # the launcher gives each process its 4 devices
  return subprocess.Popen(["bash", LAUNCHER, "2", *ARGS, "--workdir", str(workdir)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _finish(proc, timeout=120):
  try:
    return proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: only what this test started
    out, err = proc.communicate()
    raise AssertionError(f"the run did not stop:\n{err[-3000:]}") from None


def _completed(proc):
  _, err = _finish(proc)
  assert proc.returncode == 0, err[-3000:]


def _processes(launcher):
  """{process id: pid} of the launcher's mtjax processes, once both are up."""
  deadline = time.time() + 60
  while time.time() < deadline:
    found = {}
    for pid in pathlib.Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
      try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
      except FileNotFoundError:
        continue
      if b"--process_id" in argv:
        found[int(argv[argv.index(b"--process_id") + 1])] = int(pid)
    if len(found) == 2:
      return found
    time.sleep(0.05)
  raise TimeoutError


def _wait_for_rows(workdir, n, proc):
  deadline = time.time() + 120
  while len(_rows(workdir)) < n:
    assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
    time.sleep(0.02)
  return len(_rows(workdir))


def _preempted(workdir, proc, signalled):
  """Waits for the signalled run; returns the step where it stopped after checking how it did."""
  out, err = _finish(proc)
  assert proc.returncode == 3, err[-3000:]  # the launcher reports what its processes did
  assert "Traceback" not in err, err[-3000:]
  for i in (0, 1):  # every process exited 3
    assert f"process {i} (pid" in err and err.count("exited with code 3") == 2, err[-3000:]
  reached = max(r["step"] for r in _rows(workdir))
  assert signalled <= reached <= signalled + 3, (signalled, reached)  # within a few steps
  assert f"saved step {reached}" in err and "done: step" not in out
  assert _checkpoints(workdir)[0][-1] == reached and not _checkpoints(workdir)[1]  # committed
  state = workdir / "checkpoints" / str(reached) / "state"
  # One collective save: the shards of both processes are in that one checkpoint.
  assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                  "ocdbt.process_1"]
  return reached


@pytest.mark.slow
def test_sigterm_to_one_process_then_to_both_stops_all_at_one_step_and_resumes(tmp_path):
  straight = _launch(tmp_path / "straight")  # the uninterrupted reference, alongside (a)
  workdir = tmp_path / "run"
  # (a) SIGTERM to process 1 only (process 0 writes the metrics).
  proc = _launch(workdir, "--step-delay", "0.3")
  pids = _processes(proc)
  signalled = _wait_for_rows(workdir, 3, proc)
  os.kill(pids[1], signal.SIGTERM)
  first = _preempted(workdir, proc, signalled)
  assert _checkpoints(workdir)[0] == [first]
  # (b) The same command resumes; SIGTERM to the launcher, which sends it to both processes.
  proc = _launch(workdir, "--step-delay", "0.3")
  signalled = _wait_for_rows(workdir, first + 3, proc)
  proc.send_signal(signal.SIGTERM)
  second = _preempted(workdir, proc, signalled)
  assert first < second < STEPS and _checkpoints(workdir)[0] == [first, second]
  # Every step once; the losses, the resumed segment's included, bitwise those of the straight run.
  _completed(straight)
  rows, reference = _rows(workdir), _rows(tmp_path / "straight")
  assert [r["step"] for r in rows] == list(range(1, second + 1))
  assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in reference[:second]]
  # (c) The same command once more completes the run: the whole trajectory is the straight one.
  _completed(_launch(workdir))
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in reference]


# distributed.initialize on TPU VMs (in-process; jax.distributed.initialize itself is replaced).

@pytest.fixture
def calls(monkeypatch):
  import jax
  from jax._src import hardware_utils
  made = []
  for name in ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE",
               "SLURM_NTASKS", "JOBSET_NAME", "MTJAX_COORDINATOR", "MTJAX_NUM_PROCESSES",
               "MTJAX_PROCESS_ID", "JAX_PLATFORMS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: made.append((a, k)))
  return made


def test_a_tpu_vm_initializes_with_no_arguments(calls, monkeypatch):
  from mtjax.parallel import distributed
  assert not distributed.initialize() and calls == []  # no cluster, no TPU: one process
  monkeypatch.setenv("TPU_WORKER_ID", "1")  # a TPU VM of a slice started by gcloud --worker=all
  assert distributed.initialize() and calls == [((), {})]
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # told to run on the CPU: no TPU runtime to join
  assert not distributed.initialize() and len(calls) == 1


def test_tpu_chips_on_the_pci_bus_count_and_a_lone_tpu_vm_runs_as_one_process(calls, monkeypatch):
  import jax
  from jax._src import hardware_utils

  from mtjax.parallel import distributed
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
  assert distributed.on_tpu_vm()

  def no_cluster(*a, **k):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)  # e.g. a Colab TPU runtime
  assert not distributed.initialize()


def test_explicit_processes_still_win_on_a_tpu_vm(calls, monkeypatch):
  from mtjax.parallel import distributed
  monkeypatch.setenv("TPU_WORKER_ID", "0")
  assert distributed.initialize("10.0.0.1:1234", 2, 1)
  assert calls == [((), {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                         "process_id": 1})]


def test_flags_are_gathered_every_n_steps_and_the_sync_point_every_step(monkeypatch):
  from jax.experimental import multihost_utils

  from mtjax.train import preemption
  gathered, asked = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or False)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: gathered.append(int(x)) or np.array([int(x), 1]))  # the other got one
  guard = preemption.PreemptionGuard()
  stops = [s for s in range(1, 31) if guard.should_stop(s, every=10)]
  assert asked == list(range(1, 31)) and len(gathered) == 3  # steps 10, 20, 30 only
  assert stops == [10, 20, 30]  # the other process's flag counts, at the agreed steps
