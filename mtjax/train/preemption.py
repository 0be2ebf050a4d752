"""Stop cleanly on SIGTERM / SIGINT: finish the current step, save, exit with code 3.

Single process: a signal handler sets a flag that the loop reads after each step (and once before
the first step). Several processes must all stop at the SAME step (Orbax's save is collective), so
they decide together, before the first step and after every step, from two sources:
  - an all-gather of every process's own flag (one tiny collective; paid only in multi-process
    runs): a signal to any one process stops all of them at the step where the gather saw it;
  - JAX's preemption sync point, when jax.distributed started its preemption service: that
    service catches SIGTERM itself (a C++ handler) until the guard installs its Python handler
    over it, and also takes notices that come another way, so it still counts; it agrees on a
    step by itself.
Both are agreed values, so their OR is too. (Before, the sync point alone was read whenever the
service existed: the Python handler had replaced the service's, and nothing ever stopped.)

The guard is installed from the start of the loop (or earlier: `with guard():` around a run's
setup) until the last checkpoint is committed, so no signal can cut a save short: the first one
stops the loop at a step boundary (or, after the last step, lets the run finish), and every later
one is logged on stderr (one line) and ignored. What a signal means depends on when it came:
  before the last step   the loop stops, saves what is new (nothing, before the first step) and
                         the run reports `preempted` (`mtjax train` exits 3; rerun to resume);
  after the last step    the final eval, save (and plots) complete; the run is not `preempted`.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_active: PreemptionGuard | None = None  # the guard whose handlers are in place


def guard() -> PreemptionGuard:
  """This process's installed guard (a run that entered one before its setup), else a new one.

  `with guard():` installs it (nested entries are counted; the handlers go back at the last exit),
  so a signal during setup or compilation is recorded, and the loop stops before its first step.
  """
  return _active if _active is not None else PreemptionGuard()


def _say(message: str) -> None:
  # os.write, not print: a handler may run while the main thread is inside a write to sys.stderr
  # (tqdm, logging), and a buffered write from the handler would then raise.
  try:
    os.write(2, (message + "\n").encode())
  except OSError:
    pass


class PreemptionGuard:

  def __init__(self):
    self.received: int | None = None  # the first signal's number, once one arrived
    self.count = 0  # signals received
    self.finishing = False  # the loop will complete its steps: a signal no longer stops it
    self._previous = {}
    self._depth = 0

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else ""

  def _handle(self, signum, frame):
    del frame
    self.count += 1
    name = signal.Signals(signum).name
    if self.received is not None:
      _say(f"mtjax: {name} received again: ignored until the checkpoint is committed")
      return
    self.received = signum
    _say(f"mtjax: {name} received after the last step: finishing the run (final save, plots)"
         if self.finishing else
         f"mtjax: {name} received: stopping once the steps in flight finish, saving first "
         "(further signals are ignored until the checkpoint is committed)")

  @property
  def installed(self) -> bool:
    return self._depth > 0

  def __enter__(self):
    global _active
    if self._depth == 0:
      if threading.current_thread() is threading.main_thread():  # handlers only install there
        for sig in _SIGNALS:
          self._previous[sig] = signal.signal(sig, self._handle)
      _active = self
    self._depth += 1
    return self

  def __exit__(self, *exc):
    global _active
    self._depth -= 1
    if self._depth == 0:
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)
      self._previous.clear()
      if _active is self:
        _active = None
    return False

  def should_stop(self, step: int, every: int = 1) -> bool:
    """True on every process at the same step once any process got a signal.

    In a multi-process run this is a collective: every process calls it at the same steps. The
    flags are gathered only at steps divisible by `every` (the gather waits for the step in
    flight, so the host stops running ahead); JAX's preemption sync point is asked every step.
    """
    if jax.process_count() == 1:
      return self.received is not None
    import numpy as np
    from jax.experimental import multihost_utils
    try:  # JAX's own notice (its handler, before ours was installed, or the cluster's notice)
      notified = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service in this runtime
      notified = False
    if every > 1 and step % every:
      return bool(notified)
    flags = multihost_utils.process_allgather(np.array(self.received is not None, np.int32))
    return bool(notified or np.any(flags))
