"""Validate-only: everything a run needs, checked without building the model or writing anything.

`mtjax train --check --config X [--config.a.b=v ...]` (and a Colab cell) calls

    check_config(config) -> facts        # one line each, or a BadInputError naming field or file

on a config `mtjax.config.load` has already typed and value-checked. It runs, in order: the
resolve step (task registry, tokenizer file, mixture, `model.vocab_size`), every task's train
split (readable, non-empty) and the token pre-check below, the validation split of each evaluated
task when `eval.every` > 0, the generation-budget check below when `eval.every` > 0 or the config
sets `study` settings (a study's arms evaluate), then the mesh on the available devices
(`mtjax.parallel.mesh.make_mesh`), the batch's divisibility over it
(`mtjax.train.setup.check_divisibility`) and every parameter axis's divisibility over its mesh
axes (abstract shapes from `nnx.eval_shape`: no parameter is allocated, nothing is compiled).

The token pre-check, `require_loss_tokens(config)`, also runs at the start of every training
run: under `data.truncate` (prompt_left by default: the prompt is cut from the left, an example
whose target alone does not fit is skipped; right: the first seq_len pairs; skip) a task whose
sampled examples would all keep no target token would train on nothing. It stops with the task, the token lengths it saw and the seq_len to use.

The budget check, `check_generation_budgets(config)`, also runs at the start of every training
run that evaluates (eval.every > 0: studies' arms too): with eval.max_new_tokens a number, an
evaluated task whose longest held-out target (in tokens, plus EOS) does not fit in that budget
would be scored on cut-off answers, so its generation metrics would measure the budget, not the
model. It stops naming the task, its longest target and the budget. The targets are the ones the
evaluator (mtjax.eval.evaluate) generates for: the first max(eval.num_generate, eval.sample_prompts
if eval.num_samples) validation examples after eval.skip of each evaluated task, after Task.preprocess and the
run's instruction rewrite, less those whose prompt leaves no room for target and EOS in
data.seq_len (the evaluator skips them). "auto" (each task its own budget) always passes.

`check_workdir(path)` says, before anything runs, whether a run directory can be used: a
directory (or one that can be created) that is writable.
"""

from __future__ import annotations

import functools
import os
import pathlib
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mtjax.errors import BadInputError

if TYPE_CHECKING:  # the CLI imports this module: keep it light (no config, JAX or registry)
  from mtjax.config import Config

SAMPLE = 64  # examples per task the token pre-check tokenizes (the first of the train split)


def check_workdir(path: str | None) -> None:
  """Raises a BadInputError unless `path` is a writable directory or can be created as one.

  Remote paths (gs://...) are left to the first write.
  """
  if not path:
    raise BadInputError("--workdir", "required (only `mtjax train --check` runs without one)")
  if "://" in path:
    return
  target = pathlib.Path(path)
  probe = target
  while not os.path.lexists(probe) and probe != probe.parent:
    probe = probe.parent
  if probe == target:
    if not target.is_dir():
      kind = "a broken link" if not target.exists() else "a file"
      raise BadInputError("--workdir", f"{path} is {kind}, expected a run directory")
    if not os.access(target, os.W_OK | os.X_OK):
      raise BadInputError("--workdir", f"{path} is not writable")
    return
  if not probe.is_dir():
    raise BadInputError("--workdir", f"cannot create {path}: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise BadInputError("--workdir", f"cannot create {path}: {probe} is not writable")


def _spread(values: Sequence[int]) -> str:
  """min/median/max of token counts (a median between two counts ends in .5)."""
  median = statistics.median(values)
  return f"{min(values)}/{int(median) if median == int(median) else median}/{max(values)}"


def require_loss_tokens(config: Config, sample: int = SAMPLE) -> list[Any]:
  """Every task of the run keeps loss tokens at data.seq_len over its first `sample` training
  examples, or a BadInputError names the task, the token lengths seen and the seq_len to use.

  Returns the mtjax.data.pipeline.TokenSample of each task (in data.tasks order).
  """
  from mtjax import tasks as task_registry
  from mtjax.data import pipeline
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.resolve import resolve

  config = resolve(config)
  d = config.data
  tokenizer = tokenizer_lib.for_config(config)
  samples = []
  for name in d.tasks:
    rewrite = task_registry.instruction_rewrite(name, d.instructions.get(name, "keep"), d.tasks,
                                                config.seed)
    s = pipeline.token_sample(name, tokenizer, config.seed, d.seq_len, sample,
                              on_bad_record=d.on_bad_record, rewrite=rewrite, truncate=d.truncate)
    if not s.loss:
      raise BadInputError(f"task {name!r}", "its train split has no examples")
    if not any(s.loss):
      why, needed = {
          "prompt_left": ("data.truncate=prompt_left keeps the target whole and skips an example "
                          "whose target alone does not fit", min(s.target) + 1),
          "right": ("the loader cuts every example at seq_len (data.truncate=right), so no "
                    "target token is left", s.min_seq_len),
          "skip": ("data.truncate=skip drops every example that does not fit whole",
                   s.full_seq_len_min),
      }[d.truncate]
      raise BadInputError(
          f"task {name!r}", f"no loss tokens at data.seq_len={d.seq_len}: its first {len(s.loss)} "
          f"training examples have prompts of {_spread(s.prompt)} tokens and targets of "
          f"{_spread(s.target)} (min/median/max), and {why}; raise data.seq_len to at least "
          f"{needed} ({s.full_seq_len} fits every sampled example whole)")
    samples.append(s)
  return samples


def generation_targets(config: Config, tokenizer: Any = None) -> dict[str, list[int]]:
  """Evaluated task -> the token counts (EOS not counted) of the held-out targets the evaluator
  generates for (see the module docstring); {} when the eval generates nothing."""
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.eval.evaluate import model_length
  from mtjax.eval.heldout import heldout_examples
  from mtjax.resolve import resolve

  config = resolve(config)
  d, e = config.data, config.eval
  num_gen = max(e.num_generate, e.sample_prompts if e.num_samples else 0)
  if not num_gen:
    return {}
  tokenizer = tokenizer or tokenizer_lib.for_config(config)
  length = model_length(config)
  out = {}
  # Under data.format=chat the prompt is the rendered user turn and generation stops at the
  # end-of-turn token (tokenizer_lib.generated_count: the tokens before it).
  for name in dict.fromkeys(e.tasks or d.tasks):
    chosen = heldout_examples(config, name, num_gen)  # as the evaluator picks them
    targets = []
    for ex in chosen:
      prompt = 1 + tokenizer_lib.prompt_count(tokenizer, ex.prompt)  # with BOS
      target = tokenizer_lib.generated_count(tokenizer, ex.target)  # no EOS
      if prompt + target + 1 <= length:  # else the evaluator skips it (counted as skipped)
        targets.append(target)
    out[name] = targets
  return out


def check_generation_budgets(config: Config, tokenizer: Any = None) -> list[str]:
  """With eval.max_new_tokens a number: every evaluated task's longest held-out target plus EOS
  fits in it, or a BadInputError names the task, its longest target and the budget. Returns one
  fact per task ([] for "auto" or when the eval generates nothing)."""
  budget = config.eval.max_new_tokens
  if not isinstance(budget, int):
    return []
  facts = []
  for name, targets in generation_targets(config, tokenizer).items():
    if not targets:
      continue
    longest = max(targets)
    if longest + 1 > budget:
      raise BadInputError(
          "eval.max_new_tokens", f"{budget} new tokens are fewer than task {name!r} needs: its "
          f"longest held-out target is {longest} tokens + EOS = {longest + 1} (over the "
          f"{len(targets)} validation example(s) it generates for), so its generation metrics "
          f"would score cut-off answers; use 'auto' (each task its own budget) or at least "
          f"{longest + 1}")
    facts.append(f"eval {name}: longest generated target {longest} tokens + EOS fits in "
                 f"eval.max_new_tokens={budget}")
  return facts


@functools.lru_cache(maxsize=16)
def _param_count(mesh: Any, spec: Any) -> int:
  """Parameters of the model on `mesh`; raises a BadInputError if an axis does not divide."""
  import math

  import jax

  from mtjax.train import state as state_lib
  _, shapes, _ = state_lib.param_shardings(mesh, spec)  # abstract: nothing is allocated
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def check_config(config: Config, *, devices: Sequence[Any] | None = None) -> list[str]:
  """Validates what a run of `config` needs (see the module docstring) without building the model
  or writing anything. Returns what it found, one line per fact; raises BadInputError."""
  from mtjax import tasks as task_registry
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.resolve import resolve

  config = resolve(config)  # task registry, tokenizer file, mixture
  d = config.data
  tokenizer = tokenizer_lib.for_config(config)
  facts = [f"tokenizer: {d.tokenizer} ({tokenizer.vocab_size} tokens)"
           + (", data.format=chat" if d.format == "chat" else "")]
  for s in require_loss_tokens(config):
    effect = s.effect(d.truncate)
    facts.append(f"task {s.task}: weight {d.mixture.get(s.task, 0.0):g}; first {len(s.loss)} "
                 f"examples: prompt {_spread(s.prompt)}, target {_spread(s.target)} tokens "
                 f"(min/median/max); at seq_len {d.seq_len} ({d.truncate}) {effect.truncated} cut, "
                 f"{effect.too_long} skipped as too long")
  e = config.eval
  if e.every:
    for name in e.tasks or d.tasks:
      try:
        n = len(task_registry.get(name).source.load("validation", config.seed).examples)
      except BadInputError as err:
        raise BadInputError(err.field, f"{err.expected} (eval.every={e.every} evaluates task "
                            f"{name!r} on its validation split)") from None
      if not n:
        raise BadInputError(f"task {name!r}", f"its validation split has no examples (eval.every="
                            f"{e.every} evaluates on it)")
      if e.skip >= n:
        raise BadInputError("eval.skip", f"skips {e.skip} examples of task {name!r}, whose "
                            f"validation split has only {n}: expected fewer")
      facts.append(f"eval {name}: {n} validation examples"
                   + (f" ({e.skip} skipped: the tuning split)" if e.skip else ""))
  if e.every or config.study != type(config.study)():  # a run that evaluates, or a study's config
    facts += check_generation_budgets(config, tokenizer)

  import jax

  from mtjax.model import ModelSpec
  from mtjax.parallel.mesh import make_mesh
  from mtjax.resolve import auto_dtype
  from mtjax.train.setup import check_divisibility, check_methods, check_platform
  devices = list(devices) if devices is not None else jax.devices()
  check_platform(config, devices)
  mesh = make_mesh(config.mesh, devices)
  check_divisibility(config, mesh)
  check_methods(config)
  spec = ModelSpec.from_config(config.model, tokenizer.vocab_size, auto_dtype(devices[0]),
                               num_tasks=config.num_tasks)
  params = _param_count(mesh, spec)
  if config.model.pretrained:  # names and shapes from the safetensors headers; nothing loaded
    from mtjax.model import pretrained
    index = pretrained.check_tensors(config.model.pretrained, spec)
    facts.append(f"pretrained: {config.model.pretrained} ({len(index.files)} safetensors "
                 f"file(s), every tensor present with the shape config.json implies)")
  shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
  facts.append(f"mesh: {shape} on {len(devices)} {devices[0].platform} device(s) of this process")
  facts.append(f"model: {params:,} parameters, {spec.dtype}, vocab {spec.vocab_size}; batch "
               f"{d.batch_size} x {d.seq_len} in {config.optimizer.grad_accum} micro-batch(es)")
  return facts
