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
  """(mesh, state, jitted step, grad_fn factory args) for a config, as the loop builds them."""
  import jax
  from mtjax.model import ModelSpec
  from mtjax.parallel.mesh import make_mesh
  from mtjax.train import optimizer
  from mtjax.train import step as step_lib
  devices = devices or jax.devices()
  mesh = make_mesh(cfg.mesh, devices)
  spec = ModelSpec.from_config(cfg.model, 259, "cpu")
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
  graphdef, state, shardings = step_lib.init_state(mesh, spec, tx, cfg.seed)
  step = step_lib.jit_step(
      step_lib.make_step_fn(graphdef, tx, schedule, num_tasks=cfg.num_tasks,
                            grad_accum=cfg.optimizer.grad_accum, z_loss=cfg.model.z_loss),
      mesh, shardings)
  return mesh, graphdef, state, step, schedule


def host_batch(cfg, start=0):
  """The global batch of step `start` of cfg's loader (no prefetch)."""
  from mtjax.data.loader import MixtureLoader
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  for _ in range(start):
    next(loader)
  return next(loader).arrays
