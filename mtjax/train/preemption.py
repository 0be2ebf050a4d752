"""Stop cleanly on SIGTERM / SIGINT: finish the current step, save, exit with code 3.

Single process: a signal handler sets a flag that the loop reads after each step. Several
processes must agree on the step to stop at: JAX's preemption sync point when the distributed
runtime has its preemption service, else an all-gather of the flags after every step (one small
collective a step, paid only in multi-process runs).
"""

from __future__ import annotations

import signal
import threading

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:

  def __init__(self):
    self.received: int | None = None  # the signal number, once one arrived
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # handlers only install there
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    return False

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any process got a signal."""
    if jax.process_count() == 1:
      return self.received is not None
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service in this runtime: agree by a collective
      import numpy as np
      flags = multihost_utils.process_allgather(np.array(self.received is not None))
      return bool(np.any(flags))
