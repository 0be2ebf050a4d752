"""Tests that register tasks or mixtures leave the global registries as they found them:
conftest.py wraps every test in `registry_snapshot()` (an autouse fixture)."""

import contextlib


def registry_dicts():
  """mtjax.tasks' module-level registries (_REGISTRY of tasks, _MIXTURES, any added later)."""
  from mtjax import tasks
  from mtjax.tasks import scoring
  return {f"{module.__name__}.{name}": value for module in (tasks, scoring)
          for name, value in vars(module).items()
          if name.startswith("_") and not name.startswith("__") and isinstance(value, dict)}


@contextlib.contextmanager
def registry_snapshot():
  """Restores every registry dict IN PLACE on exit (other modules hold references to them)."""
  saved = {name: (d, dict(d)) for name, d in registry_dicts().items()}
  try:
    yield
  finally:
    for d, contents in saved.values():
      d.clear()
      d.update(contents)
