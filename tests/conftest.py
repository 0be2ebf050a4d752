"""8 fake CPU devices for every test process (read by XLA at start, so set before jax loads)."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Task suites build into a fresh directory per test session: offline, from a clean clone.
import tempfile  # noqa: E402
os.environ["MTJAX_DATA_DIR"] = tempfile.mkdtemp(prefix="mtjax-tfds-")

import pytest  # noqa: E402

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
