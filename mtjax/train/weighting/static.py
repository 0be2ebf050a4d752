"""Static weighting: the task weights as given (train.loss_weights and fed-back controls)."""

from __future__ import annotations

from typing import Any

from mtjax.train.weighting import Decision, Method, Stats


class Static(Method):

  def update(self, state: dict[str, Any], stats: Stats) -> tuple[Decision, dict[str, Any]]:
    return Decision(weights=stats.task_weights), state
