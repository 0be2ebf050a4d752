"""What a run directory records besides metrics: the resolved config and the environment."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time

import jax
from etils import epath

from mtjax.config import Config

_PACKAGES = ("mtjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
             "tensorflow-datasets", "ml-collections", "numpy")


def resolve(workdir) -> epath.Path:
  """Local paths become absolute (Orbax needs them); gs:// and other URLs pass through."""
  workdir = epath.Path(workdir)
  return workdir if "://" in str(workdir) else epath.Path(os.path.abspath(workdir))


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


def set_aside_metrics(workdir: epath.Path, after_step: int) -> None:
  """Keeps metrics.jsonl rows up to after_step; later rows move to a side file, never deleted."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  keep = [l for l in lines if json.loads(l).get("step", 0) <= after_step]
  if len(keep) == len(lines):
    return
  stamp = time.strftime("%Y%m%d-%H%M%S")
  (workdir / f"metrics.after-{after_step}.{stamp}.jsonl").write_text("\n".join(lines) + "\n")
  path.write_text("".join(l + "\n" for l in keep))


def write_run_files(workdir: epath.Path, config: Config, devices, extra: dict | None = None) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json() + "\n")
  env = environment(devices) | (extra or {})
  (workdir / "env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
