"""Recipes: what a kind of training brings to the generic run (mtjax.train.loop.run).

A recipe checks a config before anything starts and builds, for a built Setup, the jitted step,
the batch source and the hooks: `supervised` (the multi-task step on packed batches from the
mixture loader) and `grpo` (on-policy rollouts and the GRPO update). This layer is where train,
eval and rl meet: train knows none of them.

    mtjax.recipes.run(config, workdir) -> RunResult     # what `mtjax train` calls
"""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from mtjax.config import Config
from mtjax.parallel.mesh import Device
from mtjax.recipes.grpo import GRPO
from mtjax.recipes.supervised import Supervised
from mtjax.train import loop as loop_lib
from mtjax.train.hooks import Hook
from mtjax.train.loop import Recipe, RunResult, TrainingDiverged  # noqa: F401  (re-exported)


def for_config(config: Config, *, evaluate: bool = True, profile: tuple[int, int] | None = None,
               extra_hooks: Sequence[Hook] = ()) -> Recipe:
  """The recipe of `config`: GRPO when rl.algorithm says so, else supervised."""
  kind = GRPO if config.rl.algorithm == "grpo" else Supervised
  return kind(evaluate=evaluate, profile=profile, extra_hooks=tuple(extra_hooks))


def run(config: Config, workdir: str | epath.PathLike, *,
        devices: Sequence[Device] | None = None, resume_from: int | None = None,
        profile: tuple[int, int] | None = None, extra_hooks: Sequence[Hook] = (),
        force_unlock: bool = False, evaluate: bool = True) -> RunResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint (or `resume_from`).

  evaluate: held-out eval as a hook (eval.every; mtjax.eval's Evaluator). profile=(start, stop):
  a JAX profiler trace of steps [start, stop) in workdir/profile. extra_hooks run after the
  default ones (e.g. a feedback hook that sets rates or weights). force_unlock takes the
  workdir's lock over (see mtjax.train.lock).
  """
  recipe = for_config(config, evaluate=evaluate, profile=profile, extra_hooks=extra_hooks)
  return loop_lib.run(config, workdir, recipe, devices=devices, resume_from=resume_from,
                      force_unlock=force_unlock)
