"""JAX's persistent compilation cache for a run (`train.compilation_cache`).

auto (default): on for GPU and TPU (as MaxText does: a restart, a resume or the next variant of a
sweep loads its executables instead of compiling them again) and for a single CPU device; off for
several CPU devices, where an executable loaded back from the cache deadlocked XLA:CPU in a
collective inside the scanned layers now and then (bench/compilation_cache_deadlock.py, the
report in docs/compilation_cache_deadlock.md). on / off: as said, whatever the devices.

Where it is on, JAX's own setting wins when there is one (JAX_COMPILATION_CACHE_DIR in the
environment, or jax.config set by the caller); otherwise `train.compilation_cache_dir`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

MODES = ("auto", "on", "off")


def _flag(name: str) -> Any:
  return jax.config.values[name]  # this process's current setting (the environment's, if set)


def wanted(mode: str, devices: Sequence[Any]) -> bool:
  """Whether the cache should be on for `mode` on these devices."""
  if mode != "auto":
    return mode == "on"
  return not (devices[0].platform == "cpu" and len(devices) > 1)


def configure(mode: str, directory: str, devices: Sequence[Any]) -> str:
  """Turns the cache on or off for this process; returns where it is ("off" when off)."""
  if not wanted(mode, devices):
    if _flag("jax_enable_compilation_cache"):
      jax.config.update("jax_enable_compilation_cache", False)
      compilation_cache.reset_cache()  # forget a cache this process already opened
    return "off"
  if not _flag("jax_enable_compilation_cache") and os.environ.get(
      "JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("false", "0"):
    return "off"  # turned off in the environment: the environment wins
  current = _flag("jax_compilation_cache_dir")
  if not current:
    current = os.path.expanduser(directory)
    compilation_cache.set_cache_dir(current)
  if not _flag("jax_enable_compilation_cache"):
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
  return current
