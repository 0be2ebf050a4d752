"""Counting XLA compilations: the train step compiles once; eval and generation once per bucket."""

from __future__ import annotations

import threading

import jax


class CompileCounter:
  """Counts XLA compilations that happen while inside `with counter:` (i.e. during step calls)."""

  _local = threading.local()
  _registered = False

  def __init__(self):
    self.count = 0
    self.seconds = 0.0  # backend compile time of those compilations
    if not CompileCounter._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileCounter._on_event)
      CompileCounter._registered = True

  @staticmethod
  def _on_event(event: str, duration_secs: float, **kwargs) -> None:
    del kwargs
    active = getattr(CompileCounter._local, "active", None)
    if active is not None and event == "/jax/core/compile/backend_compile_duration":
      active.count += 1
      active.seconds += duration_secs

  def __enter__(self):
    CompileCounter._local.active = self
    return self

  def __exit__(self, *exc):
    CompileCounter._local.active = None
    return False
