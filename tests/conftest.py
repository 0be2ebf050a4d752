"""The test process's devices and compiler settings (read by XLA at start, so set before jax loads).

Two tiers (README, Testing): the default tier runs on ONE fake CPU device with JAX's persistent
compilation cache in a per-run directory (MTJAX_TEST_CACHE, set by `make test`): identical
compilations recur across tests and xdist workers, and a cached 1-device executable runs no
collectives. The multi-device tier (`make test-slow`: tests marked `multidevice`, and the `slow`
end-to-end ones) runs on 8 fake devices without the cache: an executable that XLA:CPU loaded back
from the cache deadlocked in a collective across 8 fake devices, now and then (a rendezvous
timeout that aborts the process; seen on jaxlib 0.10.2 with mesh fsdp=8 at seq_len 512-1536;
never with a freshly compiled one; bench/compilation_cache_deadlock.py). Every tier compiles at
XLA's backend optimization level 0: tests are compile-bound, and it halves the compile time.
"""

import os
import pathlib

DEVICES = int(os.environ.get("MTJAX_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={DEVICES}",
    "--xla_backend_optimization_level=0"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Task suites build into a fresh directory per test session: offline, from a clean clone.
import tempfile  # noqa: E402
os.environ["MTJAX_DATA_DIR"] = tempfile.mkdtemp(prefix="mtjax-tfds-")
_CACHE = os.environ.get("MTJAX_TEST_CACHE", "")
if _CACHE and DEVICES == 1:
  # Environment variables, so the tests' subprocesses (CLI runs, notebooks) share the cache too.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "true"
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # else fast compiles are not kept
else:
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import pytest  # noqa: E402


def gpus():
  """This process's GPUs ([] on a CPU-only machine): the `gpu` tests run on the first."""
  import jax
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


requires_gpu = pytest.mark.skipif(not gpus(), reason="no GPU")


def pytest_collection_modifyitems(config, items):
  """A `multidevice` test needs the 8 fake devices: in a process with fewer (the default tier's
  MTJAX_TEST_DEVICES=1) it is skipped, saying how to run it."""
  if DEVICES >= 8:
    return
  skip = pytest.mark.skip(reason=f"needs 8 devices (this process has {DEVICES}): "
                          "`make test-slow` runs it (MTJAX_TEST_DEVICES=8)")
  for item in items:
    if "multidevice" in item.keywords:
      item.add_marker(skip)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


def tiny_config(**dotted):
  """The demo's tiny variant, quiet, with dotted overrides: tiny_config(**{"mesh.fsdp": 2})."""
  from mtjax import config as config_lib
  overrides = ["--config.train.progress=false"]
  cfg = config_lib.load(f"{DEMO}:tiny", overrides)
  return cfg.replace(**dotted) if dotted else cfg


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(autouse=True)
def _restore_task_registry():
  """Tests that register tasks or mixtures (config files, bench copies) leave the global
  registries as they found them."""
  from registry_guard import registry_snapshot
  with registry_snapshot():
    yield


def is_adapter_path(path: str) -> bool:
  """A trained adapter variable's params path, by the plug-ins' own names (LoRA's and DoRA's A
  and B, DoRA's magnitude, SVF's expert logits): for reading a params tree by name."""
  return path.endswith(("_lora_a", "_lora_b", "_lora_magnitude", "_svf_p"))


def build_step(cfg, devices=None):
  """(mesh, graphdef, state, jitted step, LR schedule) for a config, through the one setup path."""
  from mtjax.train import setup as setup_lib
  run = setup_lib.build(cfg, devices=devices)
  return run.mesh, run.graphdef, run.state, run.jit_step(), run.schedule


def host_batch(cfg, start=0):
  """The global batch of step `start` of cfg's loader (no prefetch)."""
  from mtjax.data.loader import MixtureLoader
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  for _ in range(start):
    next(loader)
  return next(loader).arrays


def sigkill_resume_runs(tmp_path, args, steps, checkpoint_step, settle_s=1.0, step_delay=0.2):
  """Trains `mtjax train ARGS` straight through, and again killed with SIGKILL a few steps past
  its checkpoint at `checkpoint_step` and resumed (tests/fault_driver.py slows each step).
  Returns (straight workdir, killed workdir) after asserting that both finished and the killed
  one was killed past its checkpoint."""
  import json
  import signal
  import subprocess
  import sys
  import time
  driver = str(REPO / "tests" / "fault_driver.py")
  cmd = lambda workdir, *hooks: [sys.executable, driver, *hooks, "--", "train", *args,
                                 "--workdir", str(workdir)]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  done = subprocess.run(cmd(straight), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  proc = subprocess.Popen(cmd(killed, "--step-delay", str(step_delay)), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (killed / "checkpoints" / str(checkpoint_step)).is_dir():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  time.sleep(settle_s)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  logged = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
  assert max(logged) > checkpoint_step  # killed past the checkpoint: steps are redone
  resumed = subprocess.run(cmd(killed), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  return straight, killed


def assert_report_rebuilds(out):
  """`mtjax report DIR` rebuilds a study's summary.json and report.md, identical, from the
  stored metrics alone."""
  from mtjax import cli
  text, stored = (out / "report.md").read_text(), (out / "summary.json").read_text()
  (out / "report.md").unlink()
  (out / "summary.json").unlink()
  assert cli.main(["report", str(out)]) == 0
  assert (out / "report.md").read_text() == text
  assert (out / "summary.json").read_text() == stored
