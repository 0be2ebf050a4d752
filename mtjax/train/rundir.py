"""What a run directory records besides metrics: the resolved config and the environment."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys

import jax
from etils import epath

from mtjax.config import Config

_PACKAGES = ("mtjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
             "tensorflow-datasets", "ml-collections", "numpy")


def environment(devices) -> dict:
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "packages": versions,
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "process_index": jax.process_index(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def write_run_files(workdir: epath.Path, config: Config, devices, extra: dict | None = None) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json() + "\n")
  env = environment(devices) | (extra or {})
  (workdir / "env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
