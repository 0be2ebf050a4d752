"""The GRPO recipe (rl.algorithm=grpo): on-policy rollouts sampled from the current state, and the
GRPO update (mtjax.rl) as the loop's step, jitted once; the supervised recipe's checks and hooks
(no MFU figure: an RL step samples and takes rl.epochs updates, not one supervised batch's FLOPs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from etils import epath

from mtjax.recipes.supervised import Supervised
from mtjax.rl import step as rl_step
from mtjax.rl.source import RLSource
from mtjax.train import hooks as hooks_lib
from mtjax.train.batches import BatchSource
from mtjax.train.setup import Setup


@dataclasses.dataclass(frozen=True)
class GRPO(Supervised):

  def build(self, setup: Setup,
            workdir: epath.Path) -> tuple[Callable, BatchSource, list[hooks_lib.Hook]]:
    del workdir
    step = rl_step.jit_rl_step(rl_step.make_rl_step_fn(setup.graphdef, setup.tx, setup.schedule,
                                                       setup.config, lora=setup.spec.frozen_base),
                               setup.mesh, setup.shardings)
    source = RLSource(setup, setup.loader_state)  # on-policy: rollouts from the current state
    return step, source, self.hooks(setup, mfu=False)
