"""The data half of the resolve step: what a config's data group means, given the task registry
and the tokenizer files (mtjax.resolve adds the model half: a pretrained directory's shape).

`mtjax.config` checks types and values; this step checks the data group against the task
registry and the files it names, and fills what they imply: `data.mixture_name` expands to its
tasks and rates, an empty `data.mixture` becomes every task at weight 1 (stored explicitly, so
config.json says what ran), JSONL tasks of the config are registered, and a pretrained model's
directory is the default tokenizer. Idempotent. The data layer's own entry points (the loader,
preview, tokenizer.for_config) call it, so they take a config as `mtjax.config.load` returns it.
"""

from __future__ import annotations

import dataclasses
import types

from mtjax import tasks as task_registry
from mtjax.config import Config
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError
from mtjax.tasks import specs


def resolve_data(config: Config) -> Config:
  m, d = config.model, config.data
  if m.pretrained and "data.tokenizer" not in m.pinned:  # the model's own tokenizer by default
    d = dataclasses.replace(d, tokenizer=f"hf:{m.pretrained}")
  if d.jsonl_tasks:  # tasks defined by the config alone: registered here, recorded as data
    d = dataclasses.replace(d, jsonl_tasks=types.MappingProxyType(
        {name: specs.normalized(spec) for name, spec in d.jsonl_tasks.items()}))
    specs.register_jsonl_tasks(d.jsonl_tasks)
    if not d.tasks and not d.mixture_name:  # default: train on every one that is not eval-only
      d = dataclasses.replace(d, tasks=tuple(n for n, s in d.jsonl_tasks.items() if not s.eval_only))
  if d.mixture_name:
    try:
      mixture = task_registry.get_mixture(d.mixture_name)
    except KeyError as e:
      raise BadInputError("data.mixture_name", str(e.args[0])) from None
    d = dataclasses.replace(d, tasks=d.tasks or tuple(mixture.rates),
                            mixture=d.mixture or types.MappingProxyType(dict(mixture.rates)))
  if not d.mixture:
    d = dataclasses.replace(d, mixture=types.MappingProxyType({n: 1.0 for n in d.tasks}))
  config = dataclasses.replace(config, data=d)

  vocab = tokenizer_lib.get(d.tokenizer).vocab_size  # raises on a bad name or file
  if m.pretrained and m.vocab_size and m.vocab_size < vocab:
    raise BadInputError("data.tokenizer", f"{d.tokenizer} has {vocab} tokens, more than the "
                        f"{m.vocab_size} rows of {m.pretrained}'s embedding")
  if m.vocab_size and m.vocab_size < vocab:
    raise BadInputError("model.vocab_size", f"{m.vocab_size} is smaller than the "
                        f"tokenizer's {vocab} tokens ({d.tokenizer}); use 0 (the tokenizer's, rounded "
                        "up to a multiple of 128) or at least that")
  if not d.tasks:
    raise BadInputError("data.tasks", "expected at least one task name")
  known = task_registry.names()
  for name in d.tasks:
    if name not in known:
      raise BadInputError("data.tasks", f"unknown task {name!r} (known: {', '.join(known)})")
    if task_registry.get(name).eval_only and not d.allow_eval_only:
      raise BadInputError("data.tasks", f"{name!r} is an eval-only benchmark task: training on it "
                          "contaminates its scores; evaluate it with eval.tasks or `mtjax eval "
                          "--tasks`, or set data.allow_eval_only=true to train on it anyway")
  t = config.train
  for field, mapping in (("data.mixture", d.mixture), ("train.loss_weights", t.loss_weights),
                         ("train.entropy_coefs", t.entropy_coefs)):
    for name in mapping:
      if name not in d.tasks:
        raise BadInputError(f"{field}.{name}", f"not a task of this run (data.tasks: {list(d.tasks)})")
  for name, mode in d.instructions.items():
    if name not in d.tasks:
      raise BadInputError(f"data.instructions.{name}", f"not a task of this run ({list(d.tasks)})")
    if mode not in task_registry.INSTRUCTION_MODES:
      raise BadInputError(f"data.instructions.{name}",
                          f"expected one of {task_registry.INSTRUCTION_MODES}, got {mode!r}")
  if sum(d.mixture.get(n, 0.0) for n in d.tasks) <= 0:
    raise BadInputError("data.mixture", "all weights are zero: expected at least one positive")
  for i, (_, weights) in enumerate(d.stages):
    for name in weights:
      if name not in d.tasks:
        raise BadInputError(f"data.stages[{i}].{name}", f"not a task of this run ({list(d.tasks)})")
  for name in config.eval.tasks:  # a run's task, or any registered one (an eval-only benchmark)
    if name not in known:
      raise BadInputError("eval.tasks", f"unknown task {name!r} (known: {', '.join(known)})")
  return config
