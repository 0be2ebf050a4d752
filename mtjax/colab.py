"""Colab runtime helpers: which accelerator a runtime has, and whether JAX is really using it.

A notebook's setup cell loads this file by path before mtjax is installed (to pick the pip extra),
so it imports only the standard library; `check_platform` imports jax when it is called.

Why the check: Colab's GPU runtime ships a jax-cuda12 plugin built for its own, older jax; jaxlib
0.10 refuses a plugin of another version, logs a warning and falls back to the CPU, so a notebook
would silently train on the CPU. `check_platform(detect_runtime())` stops it with what to do.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping

RUNTIMES = ("gpu", "tpu", "cpu")
EXTRAS = {"gpu": "cuda", "tpu": "tpu", "cpu": None}  # pyproject's optional-dependencies
# JAX_PLATFORMS names -> the platform jax.devices() reports.
_JAX_PLATFORMS = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}
_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
             "jax-cuda13-pjrt", "libtpu")


class PlatformMismatch(RuntimeError):
  """The runtime has an accelerator that JAX did not pick up."""


def _device_paths() -> list[str]:
  # TPU chips are /dev/accel<N> up to v4, /dev/vfio/<N> from v5e on; GPUs /dev/nvidia<N>.
  return glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*") + glob.glob("/dev/nvidia[0-9]*")


def _nvidia_smi_lists_gpu() -> bool:
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return False
  try:  # Colab's CPU runtime has the binary too; there it fails to reach a driver
    out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return False
  return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


def detect_runtime(env: Mapping[str, str] | None = None,
                   paths: Iterable[str] | None = None) -> str:
  """The accelerator this machine has, "gpu", "tpu" or "cpu", found without importing jax.

  env: the environment (default os.environ); paths: the device files present (default: what
  /dev/accel*, /dev/vfio/<N> and /dev/nvidia<N> match, plus asking nvidia-smi). In order:
  - JAX_PLATFORMS, when set, is the user's choice and wins (its first entry: cuda/rocm -> "gpu").
  - TPU: COLAB_TPU_ADDR or any TPU_* variable set, or a /dev/accel* or /dev/vfio/<N> device.
  - GPU: COLAB_GPU=1, a /dev/nvidia<N> device, or `nvidia-smi -L` listing a GPU.
  - otherwise CPU.
  """
  env = os.environ if env is None else env
  chosen = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if chosen in _JAX_PLATFORMS:
    return _JAX_PLATFORMS[chosen]
  found = _device_paths() if paths is None else list(paths)
  names = [os.path.basename(p) for p in found]
  if env.get("COLAB_TPU_ADDR") or any(k.startswith("TPU_") and v for k, v in env.items()) \
      or any(n.startswith("accel") for n in names) \
      or any(re.fullmatch(r"/dev/vfio/\d+", p) for p in found):
    return "tpu"
  if env.get("COLAB_GPU", "").strip() == "1" or any(re.fullmatch(r"nvidia\d+", n) for n in names):
    return "gpu"
  if paths is None and _nvidia_smi_lists_gpu():
    return "gpu"
  return "cpu"


def pip_target(source_dir: str, runtime: str) -> str:
  """What to `pip install -e` for a runtime: the source folder with the runtime's extra."""
  if runtime not in EXTRAS:
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
  extra = EXTRAS[runtime]
  return f"{source_dir}[{extra}]" if extra else source_dir


def installed_versions() -> dict[str, str]:
  """The installed versions of jax and its plugins (for error messages)."""
  found = {}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def check_platform(expected: str, actual: str | None = None) -> str:
  """Returns the platform JAX computes on (jax.devices()[0].platform unless actual is given).

  Raises PlatformMismatch when the runtime has a GPU or TPU (expected) and JAX is on something
  else. Expecting "cpu" accepts any platform: JAX found an accelerator the detection did not.
  """
  if expected not in RUNTIMES:
    raise ValueError(f"expected must be one of {RUNTIMES}, got {expected!r}")
  if actual is None:
    import jax  # only when asked: this module loads before jax is installed
    actual = str(jax.devices()[0].platform)
  if expected == "cpu" or actual == expected:
    return actual
  versions = ", ".join(f"{k} {v}" for k, v in installed_versions().items()) or "no jax installed"
  extra = EXTRAS[expected]
  why = ("the CUDA plugin did not load: usually a jax-cuda12-plugin/pjrt whose version differs "
         "from jaxlib's (Colab preinstalls one), which jaxlib refuses"
         if expected == "gpu" else "libtpu did not load (missing, or not the version jaxlib needs)")
  raise PlatformMismatch(
      f"this runtime has a {expected.upper()} but JAX computes on {actual!r}: {why}. "
      f"Installed: {versions}. Fix: pip install -e '<mtjax source>[{extra}]' (the setup cell does "
      f"this on a fresh runtime; 'jax[{'cuda12' if expected == 'gpu' else 'tpu'}]' pins matching "
      f"plugins), then Runtime > Restart session and run the notebook again. To train on the CPU "
      f"instead: restart, run `%env JAX_PLATFORMS=cpu`, then the setup cell.")
