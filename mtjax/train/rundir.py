"""What a run directory records besides metrics: the resolved config and the environment.

Also the workdir's path (`resolve`) and the trimming of its metrics log before a resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator

import jax
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.train import metrics as metrics_lib

_PACKAGES = ("mtjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
             "tensorflow-datasets", "ml-collections", "numpy")


def resolve(workdir) -> epath.Path:
  """Local paths become absolute (Orbax needs them); gs:// and other URLs pass through.

  A gs:// workdir needs gcsfs (`pip install 'mtjax[gcs]'`): without it, BadInputError.
  """
  if str(workdir).startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
    raise BadInputError(str(workdir), "gs:// workdirs need gcsfs: pip install 'mtjax[gcs]'")
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
  """Trims the metrics log (either layout, see mtjax.train.metrics) to rows with step <= after_step.

  Nothing is deleted: if later rows exist, the whole log as it was goes to
  `metrics.after-<after_step>.<time>.jsonl` first; a torn last line (a crash or a full disk during
  a write) goes to `metrics.torn.<time>.jsonl`, with one warning on stderr. An undecodable line
  anywhere else raises BadInputError naming the file and line. Call it only while holding the
  workdir's lock (it rewrites the log).
  """
  logs, torn = metrics_lib.load(metrics_lib.log_files(workdir))
  stamp = time.strftime("%Y%m%d-%H%M%S")
  if torn is not None:
    side = _side_file(workdir, "metrics.torn", stamp)
    side.write_bytes(torn.text + b"\n")
    print(f"warning: {torn.path}:{torn.number}: the last line was cut off (a crash or a full disk "
          f"during a write); moved to {side}", file=sys.stderr, flush=True)
  if any(row.get("step", 0) > after_step for log in logs for row in log.rows):
    everything = b"".join(line + b"\n" for log in logs for line in log.lines)
    _side_file(workdir, f"metrics.after-{after_step}", stamp).write_bytes(everything)
  for log in logs:
    keep = [line for line, row in zip(log.lines, log.rows) if row.get("step", 0) <= after_step]
    if len(keep) < len(log.lines) or (torn is not None and torn.path == log.path):
      replace_file(log.path, b"".join(line + b"\n" for line in keep))


def _side_file(workdir: epath.Path, prefix: str, stamp: str) -> epath.Path:
  """workdir/<prefix>.<stamp>.jsonl, or with -1, -2, ... after the stamp if that exists."""
  path, n = workdir / f"{prefix}.{stamp}.jsonl", 0
  while path.exists():
    n += 1
    path = workdir / f"{prefix}.{stamp}-{n}.jsonl"
  return path


def replace_file(path: epath.Path, data: bytes) -> None:
  """Local files: write a temporary file and rename it over (atomic); object stores: one upload
  (atomic already; a rename there is a copy and a delete)."""
  if metrics_lib.is_object_store(path):
    path.write_bytes(data)
    return
  # Two writers (processes, or threads of one) never share a temporary file.
  tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
  try:
    with open(tmp, "wb") as f:  # written and synced in full before it replaces anything
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)  # a full disk or a signal leaves the old file, and no .tmp
    raise


def check_writable(directory: epath.Path, why: str) -> None:
  """BadInputError now, when `directory` (created if missing) cannot take a file, rather than
  after minutes of work (a read-only workdir). Object stores are not probed."""
  if metrics_lib.is_object_store(directory):
    return
  probe = directory / f".write-probe-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise BadInputError(str(directory), f"not writable ({e.strerror or e}): {why}") from None


@contextlib.contextmanager
def file_lock(path: epath.Path) -> Iterator[None]:
  """An exclusive lock for a read-merge-write of `path` across processes on this machine (flock
  on a `.<name>.lock` beside it, released when the holder exits, even by SIGKILL). Object stores
  have no locks: there the merge stays last-writer-wins."""
  if metrics_lib.is_object_store(path):
    yield
    return
  with open(path.parent / f".{path.name}.lock", "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def write_run_files(workdir: epath.Path, config: Config, devices, extra: dict | None = None) -> None:
  """config.json, tasks.json and env.json, each written whole or not at all (replace_file): a
  resume on a full disk keeps the previous ones intact."""
  workdir.mkdir(parents=True, exist_ok=True)
  replace_file(workdir / "config.json", (config.to_json() + "\n").encode())
  from mtjax.tasks import specs  # how to rebuild the tasks without the config file's code
  record = specs.record_text(config.data.tasks + config.eval.tasks)
  if (workdir / specs.RECORD).exists():  # a resume: say which data files changed meanwhile
    for changed in specs.changed_files((workdir / specs.RECORD).read_text(), record):
      print(f"warning: data file changed since this run last started: {changed}; resuming on "
            "the new contents (the loader's position now indexes other examples; recorded in "
            f"{workdir / specs.RECORD})", file=sys.stderr, flush=True)
  replace_file(workdir / specs.RECORD, record.encode())
  env = environment(devices) | (extra or {})
  replace_file(workdir / "env.json", (json.dumps(env, indent=2, sort_keys=True) + "\n").encode())
