"""The data's config group (data.*): tasks and their mixture, its schedule, batch shape, the
tokenizer and format, truncation, JSONL tasks, online mixing; its checks (what the task registry
and the tokenizer files say is mtjax.data.resolve's, at run start)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from mtjax.errors import BadInputError

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


@dataclasses.dataclass(frozen=True)
class JsonlTaskConfig:
  """A task from JSONL files, registered by the config alone (no Python): one object per line;
  the prompt is instruction + prompt field, the target the target field, and every other field of
  a record is the example's metadata (its scorer reads it: alternative answers, function docs)."""

  train: str | tuple[str, ...] = ()  # a path or a list of paths (local or gs://)
  validation: str | tuple[str, ...] = ()
  prompt_field: str = "input"
  target_field: str = "target"
  instruction_field: str = "instruction"  # read when a record has it ...
  instruction: str = ""  # ... else this text starts every prompt
  scorer: str = "exact_match"  # a registered scorer (mtjax.tasks.scoring)
  eval_only: bool = False  # held out from training (a benchmark): see data.allow_eval_only


MIXING_METHODS = ("none", "odm")


@dataclasses.dataclass(frozen=True)
class MixingConfig:
  """Online data mixing: sampling rates fed back to the loader (mtjax.train.mixing). Static
  temperature-scaled rates are data.rates=examples_proportional with data.rate_temperature."""

  method: str = "none"  # none | odm (Albalak et al. 2023: an EXP3 bandit over tasks)
  every: int = 10  # steps between decisions; the reward is each task's loss over those steps
  smoothing: float = 0.9  # ODM's alpha: R_t <- alpha R_t + (1 - alpha) L_t / rate_t


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture_name: str = ""  # a registered Mixture: fills data.tasks and data.mixture when given
  tasks: tuple[str, ...] = ()
  mixture: Mapping[str, float] = dataclasses.field(default_factory=dict)  # sampling weights
  rates: str = "explicit"  # explicit (data.mixture) | examples_proportional
  rate_temperature: float = 1.0  # examples_proportional: min(n * scale, cap) ** (1 / temperature)
  rate_cap: int = 0  # 0: no cap
  rate_scale: float = 1.0
  schedule: str = "constant"  # constant | stages | linear (interpolates between stages)
  stages: tuple[tuple[int, Mapping[str, float]], ...] = ()  # ((start_step, {task: weight}), ...)
  batch_size: int = 32  # global, in packed rows
  seq_len: int = 128
  tokenizer: str = "byte"
  # plain: [BOS] prompt target [EOS]; chat: the prompt as a user turn through the tokenizer's chat
  # template (with the generation prompt), then target + the template's end-of-turn text.
  format: str = "plain"
  prefetch: int = 2
  # Processes that materialize the rows the main process planned (0: in the main process);
  # batches and the loader state are the same for any count.
  workers: int = 0
  on_bad_record: str = "stop"  # stop | skip (and count in data/<task>/skipped)
  # Rates and weights a hook decides once s steps are done apply from step s + feedback_lag, so
  # prefetched batches never disagree with them and a resumed run replays the same stream.
  feedback_lag: int = 3
  # Instruction ablation, per task, in training and eval: keep | empty | misleading (per example,
  # another task's instruction drawn from a pool) | wrong (the next task's, one-to-one).
  instructions: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # An example longer than seq_len: prompt_left keeps the target whole and cuts the prompt from
  # the left; right keeps the first seq_len tokens; skip drops it. An example that would keep no
  # target token is skipped and counted (data/<task>/too_long), never trained with zero loss.
  truncate: str = "prompt_left"
  # Tasks defined by the config alone: {name: JsonlTaskConfig fields}; registered at run start.
  jsonl_tasks: Mapping[str, JsonlTaskConfig] = dataclasses.field(default_factory=dict)
  # Train on eval-only tasks (benchmarks such as BFCL): refused unless set (contamination).
  allow_eval_only: bool = False
  mixing: MixingConfig = dataclasses.field(default_factory=MixingConfig)


SCHEDULES = ("constant", "stages", "linear")
RATES = ("explicit", "examples_proportional")
TRUNCATE = ("prompt_left", "right", "skip")


def check(d: DataConfig) -> None:
  for field, value in (("batch_size", d.batch_size), ("seq_len", d.seq_len)):
    if value <= 0:
      raise BadInputError(f"data.{field}", f"expected a positive integer, got {value}")
  for field, value in (("prefetch", d.prefetch), ("workers", d.workers)):
    if value < 0:
      raise BadInputError(f"data.{field}", f"expected a value >= 0, got {value}")
  for field, value, allowed in (("schedule", d.schedule, SCHEDULES), ("rates", d.rates, RATES),
                                ("on_bad_record", d.on_bad_record, ("stop", "skip")),
                                ("format", d.format, ("plain", "chat"))):
    if value not in allowed:
      raise BadInputError(f"data.{field}", f"expected one of {', '.join(allowed)}, got {value!r}")
  if len(set(d.tasks)) != len(d.tasks):
    raise BadInputError("data.tasks", f"task names must be unique, got {list(d.tasks)}")
  for name in d.tasks:
    if "/" in name:
      raise BadInputError("data.tasks", f"task names may not contain '/', got {name!r}")
  for name, w in d.mixture.items():
    if w < 0:
      raise BadInputError(f"data.mixture.{name}", f"expected a finite weight >= 0, got {w}")
  if d.schedule == "constant" and d.stages:
    raise BadInputError("data.stages", "given, but data.schedule is 'constant' (use stages or linear)")
  if d.schedule != "constant":
    if not d.stages:
      raise BadInputError("data.stages", f"data.schedule={d.schedule!r} needs at least one stage")
    if d.rates != "explicit":
      raise BadInputError("data.rates", "examples_proportional applies to a constant schedule only")
    starts = [s for s, _ in d.stages]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
      raise BadInputError("data.stages", f"start steps must begin at 0 and increase, got {starts}")
    for i, (start, weights) in enumerate(d.stages):
      for name, w in weights.items():
        if w < 0:
          raise BadInputError(f"data.stages[{i}].{name}", f"expected a finite weight >= 0, got {w}")
      if sum(weights.values()) <= 0:
        raise BadInputError(f"data.stages[{i}]", f"all weights are zero at step {start}")
  if d.rate_temperature <= 0:
    raise BadInputError("data.rate_temperature", f"expected > 0, got {d.rate_temperature}")
  if d.rate_cap < 0 or d.rate_scale <= 0:
    raise BadInputError("data.rate_cap", "expected rate_cap >= 0 and rate_scale > 0")
  min_lag = d.prefetch + 1 if d.prefetch else 0
  if d.feedback_lag < min_lag:
    raise BadInputError("data.feedback_lag", f"expected >= {min_lag} (data.prefetch + 1: batches "
                        f"already prefetched keep their rates), got {d.feedback_lag}")
  if d.truncate not in TRUNCATE:
    raise BadInputError("data.truncate", f"expected one of {', '.join(TRUNCATE)}, got {d.truncate!r}")
  for name, spec in d.jsonl_tasks.items():
    if not _TASK_NAME.fullmatch(name):  # named in --tasks a,b, metric keys eval/<task>/..., paths
      raise BadInputError(f"data.jsonl_tasks.{name}", "a task name is letters, digits, '_' and "
                          "'-' (no ',', '/', '.' or spaces)")
    if not spec.train and not spec.validation:
      raise BadInputError(f"data.jsonl_tasks.{name}", "expected train and/or validation files")
    for field in ("prompt_field", "target_field"):
      if not getattr(spec, field):
        raise BadInputError(f"data.jsonl_tasks.{name}.{field}", "expected a field name")
  m = d.mixing
  if m.method not in MIXING_METHODS:
    raise BadInputError("data.mixing.method", f"expected one of {', '.join(MIXING_METHODS)}, got "
                        f"{m.method!r}")
  if m.every <= 0:
    raise BadInputError("data.mixing.every", f"expected a positive integer, got {m.every}")
  if not 0 <= m.smoothing < 1:
    raise BadInputError("data.mixing.smoothing", f"expected a value in [0, 1), got {m.smoothing}")
