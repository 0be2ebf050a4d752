"""train.compilation_cache: JAX's persistent compilation cache on where it is safe (GPU, TPU, one
CPU device), off on several CPU devices (auto), as the config says otherwise; the environment's
setting wins; env.json records where it was."""

import json
import os
import subprocess
import sys
import types

import pytest

from conftest import DEMO, REPO
from mtjax.train import compile_cache


def _devices(platform, n):
  return [types.SimpleNamespace(platform=platform)] * n


def test_auto_is_on_for_accelerators_and_one_cpu_device_only():
  assert compile_cache.wanted("auto", _devices("gpu", 8))
  assert compile_cache.wanted("auto", _devices("tpu", 4))
  assert compile_cache.wanted("auto", _devices("cpu", 1))
  assert not compile_cache.wanted("auto", _devices("cpu", 8))  # the XLA:CPU deadlock
  assert compile_cache.wanted("on", _devices("cpu", 8)) and not compile_cache.wanted("off", _devices("gpu", 1))


def test_bad_mode_is_named():
  from mtjax import config as config_lib
  from mtjax.errors import BadInputError
  with pytest.raises(BadInputError, match="train.compilation_cache: expected auto, on or off"):
    config_lib.load(f"{DEMO}:tiny", ["--config.train.compilation_cache=yes"])


def _train(tmp_path, name, devices, *overrides):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  cache, workdir = tmp_path / f"{name}_cache", tmp_path / name
  done = subprocess.run([sys.executable, "-m", "mtjax", "train", "--config", f"{DEMO}:tiny",
                         "--config.train.steps=2", "--config.train.progress=false",
                         f"--config.train.compilation_cache_dir={cache}", *overrides,
                         "--workdir", str(workdir)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  env_json = json.loads((workdir / "env.json").read_text())
  entries = list(cache.iterdir()) if cache.exists() else []
  return env_json["compilation_cache"], entries


@pytest.mark.slow
def test_a_run_fills_the_cache_on_one_cpu_device_and_not_on_several(tmp_path):
  where, entries = _train(tmp_path, "one", 1)
  assert where == str(tmp_path / "one_cache") and entries  # the step's executables, among others
  where, entries = _train(tmp_path, "two", 2, "--config.data.batch_size=8")
  assert where == "off" and not entries
  where, entries = _train(tmp_path, "forced", 2, "--config.train.compilation_cache=on")
  assert where == str(tmp_path / "forced_cache") and entries
