"""Task registry: tasks are registered by name (as in SeqIO) and referenced by name from configs.

A `Task` keeps instruction, input and target apart, so later studies can blank or swap the
instruction without touching the data; the loader formats `instruction + input` as the prompt and
puts the loss on the target only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # sources.py imports Example from here
  from mtjax.tasks.sources import Source


@dataclasses.dataclass(frozen=True)
class Example:
  instruction: str
  input: str
  target: str
  # Every other field of the source record (alternative answers, function docs, ...): scorers
  # read it; it is never tokenized. Not part of equality or hashing.
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                              repr=False)

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
  source: Source  # see tasks/sources.py
  is_correct: Callable[[Example, str], bool]
  open_ended: bool = False  # many right answers (entropy should stay up)
  metrics: tuple[str, ...] = ("exact_match",)
  preprocess: Callable[[Example], Example] | None = None  # e.g. blank or swap the instruction
  # A benchmark held out from training (BFCL): data.tasks may name it only with
  # data.allow_eval_only=true (training on a benchmark contaminates its scores).
  eval_only: bool = False
  # The scorer's registered name (tasks/scoring.py), when is_correct is one: recorded in a run's
  # tasks.json so the task can be rebuilt without the code that defined it.
  scorer: str = ""
  # The best achievable score per eval metric where it is known and fixed (experiments/floors.py:
  # study targets must lie below it). Default: 1.0 for accuracy and token_accuracy when the target
  # is a function of the prompt (not open_ended), or computed from target_distribution.
  ceilings: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # For generated open-ended tasks: every right target of an example's prompt with its probability
  # under the generator, so the Bayes-optimal teacher-forced token accuracy (the ceiling of
  # token_accuracy: some target tokens are a guess) is computed exactly (experiments/floors.py).
  target_distribution: Callable[[Example], Sequence[tuple[str, float]]] | None = None


@dataclasses.dataclass(frozen=True)
class Mixture:
  """A named set of tasks with sampling rates; `data.mixture_name` in a config expands to it."""

  name: str
  rates: dict[str, float]


_REGISTRY: dict[str, Task] = {}
_DEFINED_IN: dict[str, str] = {}  # task name -> the config file that registered it


def register(task: Task, *, replace: bool = False) -> Task:
  """Registers a task by name. Config files that define tasks pass replace=True (re-imports)."""
  from mtjax.config import defining_file
  if "/" in task.name:
    raise ValueError(f"task names may not contain '/': {task.name!r}")
  if task.name in _REGISTRY and not replace:
    raise ValueError(f"task {task.name!r} is already registered")
  _REGISTRY[task.name] = task
  _DEFINED_IN[task.name] = defining_file()
  return task


def defined_in(name: str) -> str:
  """The config file that registered task `name` ("" for mtjax's own and library calls)."""
  return _DEFINED_IN.get(name, "")


_MIXTURES: dict[str, Mixture] = {}


def register_mixture(mixture: Mixture, *, replace: bool = False) -> Mixture:
  if mixture.name in _MIXTURES and not replace:
    raise ValueError(f"mixture {mixture.name!r} is already registered")
  unknown = [t for t in mixture.rates if t not in _REGISTRY]
  if unknown:
    raise ValueError(f"mixture {mixture.name!r} names unknown tasks {unknown}")
  _MIXTURES[mixture.name] = mixture
  return mixture


def get_mixture(name: str) -> Mixture:
  try:
    return _MIXTURES[name]
  except KeyError:
    raise KeyError(f"unknown mixture {name!r} (known: {', '.join(sorted(_MIXTURES))})") from None


def mixture_names() -> list[str]:
  return sorted(_MIXTURES)


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


INSTRUCTION_MODES = ("keep", "empty", "wrong", "misleading", "task_id")
# For "wrong" and "misleading" when no other task has a different instruction.
UNRELATED_INSTRUCTION = "Translate the following text into French:\n"


def _first_instruction(name: str, seed: int) -> str:
  return get(name).source.load("train", seed).examples[0].instruction


def _own_instructions(name: str, seed: int) -> set[str]:
  examples = get(name).source.load("train", seed).examples  # a list or a random-access source
  return {examples[i].instruction for i in range(min(50, len(examples)))}


@functools.cache
def _builtin_instructions() -> tuple[str, ...]:
  """Every trainable built-in task's instruction (once per process: loading them takes ~1 s)."""
  return tuple(sorted({_first_instruction(n, 0) for n, t in BUILTIN_TASKS.items() if not t.eval_only}))


@functools.cache
def _builtin_owners() -> dict[str, str]:
  """Each trainable built-in task's instruction -> the task (the first, by name, that uses it)."""
  out: dict[str, str] = {}
  for n in sorted(BUILTIN_TASKS):
    if not BUILTIN_TASKS[n].eval_only:
      out.setdefault(_first_instruction(n, 0), n)
  return out


def instruction_owners(task_name: str, run_tasks: tuple[str, ...], seed: int) -> dict[str, str]:
  """The misleading pool of `task_name` (misleading_pool) with the task each instruction belongs
  to, whose rule decides whether it would mislead on a given input."""
  owners = {**_builtin_owners(),
            **{_first_instruction(n, seed): n for n in run_tasks if n != task_name}}
  own = _own_instructions(task_name, seed)
  return {text: owner for text, owner in sorted(owners.items()) if text and text not in own}


def misleading_pool(task_name: str, run_tasks: tuple[str, ...], seed: int) -> tuple[str, ...]:
  """The instructions "misleading" draws from for `task_name`: the built-in tasks' and the run's
  other tasks' instructions whose text differs from the task's own (Kung & Peng's pool)."""
  own = _own_instructions(task_name, seed)
  texts = set(_builtin_instructions()) | {_first_instruction(n, seed) for n in run_tasks if n != task_name}
  pool = tuple(sorted(t for t in texts if t and t not in own))
  return pool or (UNRELATED_INSTRUCTION,)


def misleading_instruction(pool: tuple[str, ...], example: Example, salt: str = "") -> str:
  """One instruction of `pool` per example, by a stable hash of its input (and `salt`, the task's
  name, so two tasks' examples with one input draw independently): the same in training, eval and
  after a resume, and different across a task's examples."""
  digest = hashlib.sha256((salt + "\0" + example.input if salt else example.input)
                          .encode("utf-8")).digest()
  return pool[int.from_bytes(digest[:8], "big") % len(pool)]


def misleading_for(task_name: str, run_tasks: tuple[str, ...],
                   seed: int) -> Callable[[Example], str]:
  """The misleading instruction of each example of `task_name`: drawn from the pool's
  instructions whose task's rule gives a DIFFERENT answer on the example's input (tasks/rules.py;
  on copy, an already sorted word never gets sort's instruction), so it is never the right
  instruction under another name; an unrelated instruction where none is left."""
  from mtjax.tasks import rules
  owners = instruction_owners(task_name, run_tasks, seed) or {UNRELATED_INSTRUCTION: ""}

  def draw(ex: Example) -> str:
    candidates = tuple(t for t, owner in owners.items()
                       if not rules.gives_target(owner or None, ex))
    return misleading_instruction(candidates or (UNRELATED_INSTRUCTION,), ex, salt=task_name)

  return draw


def task_id_instruction(task_name: str) -> str:
  """A fixed, meaningless instruction per task (the task-id arm: the model can tell tasks apart,
  but the text names no rule): 8 letters from a hash of the name, then a colon."""
  digest = hashlib.sha256(task_name.encode("utf-8")).digest()
  return "".join(chr(ord("a") + b % 26) for b in digest[:8]) + ": "


def instruction_rewrite(task_name: str, mode: str, run_tasks: tuple[str, ...],
                        seed: int) -> Callable[[Example], Example] | None:
  """The instruction ablation (Kung & Peng, 2023) as a map over examples: "empty" blanks the
  instruction; "misleading" gives each example another task's instruction drawn per example among
  those that would give a different answer on its input (misleading_for); "task_id" a fixed
  meaningless string per task (task_id_instruction); "wrong" (the older one-to-one relabeling) gives every
  example the instruction of the next task of the run, or an unrelated one. Input and target are
  untouched."""
  if mode == "keep":
    return None
  if mode == "empty":
    return lambda ex: dataclasses.replace(ex, instruction="")
  if mode == "misleading":
    draw = misleading_for(task_name, tuple(run_tasks), seed)
    return lambda ex: dataclasses.replace(ex, instruction=draw(ex))
  if mode == "task_id":
    text = task_id_instruction(task_name)
    return lambda ex: dataclasses.replace(ex, instruction=text)
  if mode != "wrong":
    raise ValueError(f"data.instructions.{task_name}: expected one of {INSTRUCTION_MODES}, got {mode!r}")
  own = _own_instructions(task_name, seed)
  i = run_tasks.index(task_name)
  text = UNRELATED_INSTRUCTION
  for other in run_tasks[i + 1:] + run_tasks[:i]:
    candidate = _first_instruction(other, seed)
    if candidate and candidate not in own:
      text = candidate
      break
  return lambda ex: dataclasses.replace(ex, instruction=text)


def exact_match(example: Example, output: str) -> bool:
  return output.strip() == example.target.strip()


# Registers the built-in scorers, tasks and suites.
from mtjax.tasks import scoring  # noqa: E402,F401
from mtjax.tasks import synthetic  # noqa: E402,F401
from mtjax.tasks.suites import function_calling as fc_suite  # noqa: E402
from mtjax.tasks.suites import open_ended, structured  # noqa: E402

register_mixture(Mixture("synthetic", {"reverse": 1.0, "addition": 1.0, "grammar": 1.0}))
register_mixture(Mixture("structured", {f"structured_{t}": 1.0 for t in structured.MtjaxStructured.TASKS}))
register_mixture(Mixture("open_ended", {f"open_ended_{t}": 1.0 for t in open_ended.MtjaxOpenEnded.TASKS}))
# Granite's decomposition: the seven granular subtasks plus the umbrella task, and the umbrella alone.
register_mixture(Mixture("fc_granite", {f"fc_{t}": 1.0 for t in fc_suite.SUBTASKS + ("umbrella",)}))
register_mixture(Mixture("fc_umbrella", {"fc_umbrella": 1.0}))
# BFCL (eval-only; data fetched on first use).
from mtjax.tasks import bfcl  # noqa: E402,F401

# mtjax's own tasks, as registered at import (keep last): a run's tasks.json records only their
# names; tasks registered later (config files) are recorded as data (tasks/specs.py).
BUILTIN_TASKS: dict[str, Task] = dict(_REGISTRY)
