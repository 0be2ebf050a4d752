"""One run per workdir: an exclusive lock, held for the whole of `mtjax.train.loop.run`.

Local disks: `fcntl.flock` on `workdir/.lock`. The OS releases it when the process ends, however
it ends (SIGKILL included). The file records the holder (JSON: pid, host, since) for the message
a second run gets; the flock is the lock, the file's content only informs.

Object stores (a workdir containing "://", e.g. gs://), which have no flock: `workdir/lock.json`
records the holder and a heartbeat that a daemon thread rewrites every HEARTBEAT_S seconds. A lock
without a heartbeat for STALE_AFTER_S seconds is stale (its holder died) and the next run takes it
over. Two runs starting at the same moment: each writes its token, waits SETTLE_S and reads it
back; only the one whose token is there goes on. A filesystem whose flock fails (some network
mounts) gets this variant too.

force=True (`mtjax train --force_unlock`) takes either kind over, e.g. a dead run's lock.json
before it goes stale, or a lock another host holds on a shared filesystem, but never one whose
holder is alive on this host (its pid answers): that run would lose its in-flight checkpoint,
so it is refused (exit 2) naming the pid to stop first. A holder on another host is not stopped:
make sure it is gone.

Multi-process runs: process 0 holds the lock (`hold`), the others learn whether it got it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

from mtjax.errors import BadInputError
from mtjax.train import rundir

STALE_AFTER_S = 300.0  # object stores: a lock without a heartbeat for this long is taken over
HEARTBEAT_S = 30.0
SETTLE_S = 2.0  # object stores: wait between writing the lock and reading it back


def _note(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir or raises BadInputError naming its holder.

  object_store: use the heartbeat variant (default: for paths containing "://").
  took_over: after acquiring, the holder whose lock this one replaced (stale or forced), if any.
  """

  def __init__(self, workdir: str | epath.PathLike, force: bool = False, *,
               object_store: bool | None = None, stale_after_s: float = STALE_AFTER_S,
               heartbeat_s: float = HEARTBEAT_S, settle_s: float = SETTLE_S):
    self.workdir = epath.Path(workdir)
    self.force = force
    self.object_store = "://" in str(workdir) if object_store is None else object_store
    self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
    self.took_over: dict[str, Any] | None = None
    self.lost = False  # object stores: another run took the lock over while this one held it
    self._fd: int | None = None
    self._record: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def path(self) -> epath.Path:
    return self.workdir / ("lock.json" if self.object_store else ".lock")

  @property
  def held(self) -> bool:
    return self._fd is not None or self._thread is not None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False

  def acquire(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._record = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "token": uuid.uuid4().hex}
    if not self.object_store:
      try:
        self._acquire_local()
        return
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise
        _note(f"note: {self.path}: flock is not supported here ({e.strerror}); using a "
              "heartbeat lock file instead")
        self.object_store = True
    self._acquire_object_store()

  def release(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      if self._same_file(fd):  # not replaced by a --force_unlock meanwhile
        with contextlib.suppress(FileNotFoundError):
          os.unlink(self.path)
      os.close(fd)  # releases the flock
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      current = self._read()
      if current is not None and self._ours(current):
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()

  def _in_use(self, holder: dict[str, Any], age: float | None = None) -> BadInputError:
    who = (f"workdir is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
           f"since {holder.get('since', '?')}")
    if age is None:
      hint = "; wait for it to finish, or pass --force_unlock if it is gone"
    else:
      hint = (f"; its last heartbeat was {age:.0f}s ago and it is taken over after "
              f"{self.stale_after_s:.0f}s without one, or now with --force_unlock")
    return BadInputError(str(self.workdir), who + hint)

  def _ours(self, record: dict[str, Any]) -> bool:
    return self._record is not None and record.get("token") == self._record["token"]

  def _read(self) -> dict[str, Any] | None:
    """The holder's record; None if there is no lock file, {} if it cannot be read."""
    try:
      record = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}
    return record if isinstance(record, dict) else {}

  def _refuse_a_live_holder(self, holder: dict[str, Any]) -> None:
    """--force_unlock: BadInputError when the holder runs on this host and its pid is alive."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
      return
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return  # gone: take it over
    except PermissionError:
      pass  # alive, another user's
    raise BadInputError(str(self.workdir), f"workdir is in use by pid {pid} on this host "
                        f"({holder.get('host')}), which is alive; --force_unlock takes over only "
                        f"a lock whose holder is gone: stop pid {pid} first")

  # Local disks: flock.

  def _same_file(self, fd: int) -> bool:
    try:
      return os.stat(self.path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      return False

  def _acquire_local(self) -> None:
    for _ in range(100):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        holder = self._read() or {}
        if not self.force:
          raise self._in_use(holder) from None
        self._refuse_a_live_holder(holder)
        self.took_over = holder
        with contextlib.suppress(FileNotFoundError):
          os.unlink(self.path)  # the holder keeps its lock on the old file; the next open is new
        continue
      except BaseException:
        os.close(fd)
        raise
      if self._same_file(fd):  # else it was removed between open and flock: lock the new one
        break
      os.close(fd)
    else:
      raise RuntimeError(f"{self.path}: could not take the lock (the file keeps being replaced)")
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(self._record) + "\n").encode())
    self._fd = fd
    self._say_took_over()

  # Object stores: a lock file with a heartbeat.

  def _write(self) -> None:
    assert self._record is not None
    self._record["heartbeat"] = time.time()
    # Whole or not at all: a reader never sees a half-written lock.
    rundir.replace_file(self.path, (json.dumps(self._record) + "\n").encode())

  def _acquire_object_store(self) -> None:
    current = self._read()
    if current is not None:
      age = time.time() - float(current.get("heartbeat", 0.0))
      if age < self.stale_after_s and not self.force:
        raise self._in_use(current, age)
      if age < self.stale_after_s:
        self._refuse_a_live_holder(current)
      self.took_over = current
    self._write()
    if self.settle_s:
      time.sleep(self.settle_s)
    current = self._read()
    if current is None or not self._ours(current):  # another run wrote it at the same moment
      raise self._in_use(current or {}, 0.0)
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="mtjax-workdir-lock", daemon=True)
    self._thread.start()
    self._say_took_over()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        current = self._read()
        if current is None or not self._ours(current):
          self.lost = True
          holder = current or {}
          _note(f"warning: {self.path}: the workdir lock was taken over by pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}; this run no longer "
                "holds it")
          return
        self._write()
      except Exception as e:  # a transient store error: the next beat tries again
        _note(f"warning: {self.path}: lock heartbeat failed ({type(e).__name__}: {e})")

  def _say_took_over(self) -> None:
    if self.took_over is not None:
      h = self.took_over
      why = "forced" if self.force else "stale"
      _note(f"note: {self.workdir}: took over the lock of pid {h.get('pid', '?')} on host "
            f"{h.get('host', '?')} (since {h.get('since', '?')}; {why})")


@contextlib.contextmanager
def hold(workdir: epath.Path, force: bool = False) -> Iterator[WorkdirLock | None]:
  """The run's lock: process 0 takes it (yields it; the others get None); in multi-process runs
  every process raises if process 0 could not take it."""
  import jax
  lock = WorkdirLock(workdir, force=force) if jax.process_index() == 0 else None
  error: Exception | None = None
  if lock is not None:
    try:
      lock.acquire()
    except Exception as e:  # raised below, once the other processes know
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = BadInputError(str(workdir), "process 0 could not take the workdir's lock (its "
                            "error says why)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
