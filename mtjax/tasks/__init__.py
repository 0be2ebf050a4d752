"""Task registry: tasks are registered by name (as in SeqIO) and referenced by name from configs.

A `Task` keeps instruction, input and target apart, so later studies can blank or swap the
instruction without touching the data; the loader formats `instruction + input` as the prompt and
puts the loss on the target only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Example:
  instruction: str
  input: str
  target: str

  @property
  def prompt(self) -> str:
    return self.instruction + self.input


@dataclasses.dataclass(frozen=True)
class Task:
  """A named source of examples and how to judge an output.

  source.load(split, seed, on_bad_record) gives the examples of a split ("train" or
  "validation"); see tasks/sources.py. is_correct(example, output) says whether an output is
  right: the target for tasks with one right answer, a verifier for open-ended ones.
  """

  name: str
  source: Any  # a tasks.sources source
  is_correct: Callable[[Example, str], bool]
  open_ended: bool = False  # many right answers (entropy should stay up)
  metrics: tuple[str, ...] = ("exact_match",)


_REGISTRY: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
  """Registers a task by name. Config files that define tasks pass replace=True (re-imports)."""
  if "/" in task.name:
    raise ValueError(f"task names may not contain '/': {task.name!r}")
  if task.name in _REGISTRY and not replace:
    raise ValueError(f"task {task.name!r} is already registered")
  _REGISTRY[task.name] = task
  return task


def get(name: str) -> Task:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise KeyError(f"unknown task {name!r} (known: {', '.join(names())})") from None


def names() -> list[str]:
  return sorted(_REGISTRY)


def data_dir() -> str:
  """Where TFDS task suites are built: $MTJAX_DATA_DIR, else ~/.cache/mtjax/tfds."""
  return os.environ.get("MTJAX_DATA_DIR") or os.path.expanduser("~/.cache/mtjax/tfds")


def exact_match(example: Example, output: str) -> bool:
  return output.strip() == example.target.strip()


# Registers the built-in tasks and suites.
from mtjax.tasks import synthetic  # noqa: E402,F401
from mtjax.tasks.suites import function_calling, open_ended, structured  # noqa: E402,F401
