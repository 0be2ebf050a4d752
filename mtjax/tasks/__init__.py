"""Task registry: tasks are registered by name (as in SeqIO) and referenced by name from configs.

A `Task` keeps instruction, input and target apart, so later studies can blank or swap the
instruction without touching the data; the loader formats `instruction + input` as the prompt and
puts the loss on the target only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


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

  source(split, seed) returns the examples of a split ("train" or "validation"), deterministic
  in seed. is_correct(example, output) says whether an output is right: the target for tasks with
  one right answer, a verifier for open-ended ones.
  """

  name: str
  source: Callable[[str, int], Sequence[Example]]
  is_correct: Callable[[Example, str], bool]
  open_ended: bool = False  # many right answers (entropy should stay up)
  metrics: tuple[str, ...] = ("exact_match",)


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  if "/" in task.name:
    raise ValueError(f"task names may not contain '/': {task.name!r}")
  if task.name in _REGISTRY:
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


from mtjax.tasks import synthetic  # noqa: E402,F401  (registers the built-in tasks)
