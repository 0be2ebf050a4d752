"""The supervised recipe: THE multi-task step on packed batches from the mixture loader.

Before anything starts: every task keeps loss tokens at data.seq_len, the generation budget holds
every evaluated target (when it evaluates), and held-out prompts of a user's task seen in
training are named. Hooks, in the loop's order: log, progress, profile, eval, ODM mixing,
instruction search, checkpoint, preemption, then any extra ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from etils import epath

from mtjax.check import check_generation_budgets, require_loss_tokens
from mtjax.config import Config
from mtjax.data import contamination
from mtjax.eval.evaluate import Evaluator
from mtjax.recipes.fast_context import InstructionSearchHook
from mtjax.train import hooks as hooks_lib
from mtjax.train.batches import BatchSource, LoaderSource
from mtjax.train.mixing import MixingHook
from mtjax.train.setup import Setup


@dataclasses.dataclass(frozen=True)
class Supervised:
  evaluate: bool = True  # held-out eval (eval.every) as a hook
  profile: tuple[int, int] | None = None  # a profiler trace of steps [start, stop)
  extra_hooks: Sequence[hooks_lib.Hook] = ()

  def check(self, config: Config) -> None:
    require_loss_tokens(config)  # every task keeps loss tokens at data.seq_len, else exit 2 naming it
    if self.evaluate and config.eval.every > 0:  # a study's arms too (eval.every > 0)
      check_generation_budgets(config)  # a number budget holds every generated target, else exit 2
    if jax.process_index() == 0:
      for line in contamination.warn(config):  # held-out prompts of a user's task seen in training
        hooks_lib.say(line)

  def source(self, setup: Setup) -> BatchSource:
    return LoaderSource(setup.loader(), setup.batch_sharding)

  def build(self, setup: Setup,
            workdir: epath.Path) -> tuple[Callable, BatchSource, list[hooks_lib.Hook]]:
    del workdir
    return setup.jit_step(), self.source(setup), self.hooks(setup)

  def hooks(self, setup: Setup, *, mfu: bool = True) -> list[hooks_lib.Hook]:
    config = setup.config
    log = hooks_lib.LogHook(config.train.log_every, config.train.max_consecutive_skips, mfu=mfu)
    checkpoint = hooks_lib.CheckpointHook(config.checkpoint.every, log)
    hooks: list[hooks_lib.Hook] = [log, hooks_lib.ProgressHook(config.train.progress)]
    if self.profile:
      hooks.append(hooks_lib.ProfileHook(*self.profile))
    if self.evaluate:
      make = lambda: Evaluator(config, setup.graphdef, setup.spec, setup.mesh, setup.tokenizer)
      hooks.append(hooks_lib.EvalHook(config.eval.every, make, config.eval.steps))
    if config.data.mixing.method == "odm":  # before the checkpoint hook: a save holds its decision
      hooks.append(MixingHook(config.data.mixing.every, config.data.mixing.smoothing))
    if config.train.instruction_search.every:  # the same: a save holds its instructions
      hooks.append(InstructionSearchHook(config.train.instruction_search))
    return hooks + [checkpoint, hooks_lib.PreemptionHook(checkpoint, config.train.preemption_every),
                    *self.extra_hooks]
