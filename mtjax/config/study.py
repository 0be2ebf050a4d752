"""The studies' settings (study.*), read by `mtjax experiment` (mtjax.experiments validates
them: arms.validate_study_config); a training run ignores them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Settings of `mtjax experiment ...` studies."""

  steps_per_task: int = 100  # efficiency: each single-task run; the joint run gets K times this
  seeds: tuple[int, ...] = (0, 1, 2)
  eval_every: int = 25
  target: float = 0.5  # the score each task must reach (eval metric below) ...
  targets: Mapping[str, float] = dataclasses.field(default_factory=dict)  # ... or per task
  metric: str = "accuracy"
  # The study's ONE primary comparison, named before it runs (each study lists its comparisons:
  # `mtjax experiment NAME --help`); '' = the study's default. Its keys (tasks, quantities) are
  # one Holm family; every other comparison is reported as exploratory.
  primary: str = ""
  entropy_coef: float = 0.05  # entropy study: the coefficient of its regularized arm
  # Eval steps of every arm: every (eval_every) | log (also steps 1, 2, 4, 8, ...: dense early).
  eval_schedule: str = "every"
  # The LR schedule of every arm, whose value at a step does not depend on the arm's length:
  # constant (after warmup) | wsd (constant, then a linear decay over the last lr_decay_steps
  # steps of each arm: the same absolute decay length in every arm).
  lr_schedule: str = "constant"
  lr_decay_steps: int = 0  # wsd: the decay length in steps (1 <= it <= steps_per_task - warmup)
  # Per-task metric, overriding `metric` (e.g. open-ended tasks judged by their verifier:
  # {"open_ended_grammar": "accuracy"}).
  task_metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # The first tuning_examples of each task's validation split are the tuning split (targets and
  # knobs are chosen there); reported numbers come from the examples after them (eval.skip).
  tuning_examples: int = 0
  split: str = "report"  # report (examples after the tuning split) | tuning (the tuning split)
  # The trivial baselines a task's floor is the best of (experiments/floors.py): all (frequency
  # rules, the other string tasks' rules, a bigram with the true length, a sentence frame,
  # n-grams) | frequency (only the positional and unigram predictors and the most frequent
  # answer: for tests of a study's machinery on models too small to beat the rest; a report
  # names the family, and a study whose verdict matters keeps `all`).
  floors: str = "all"
  # efficiency: also train, per task t, the joint run with only t's loss on (train.loss_weights 0
  # for the others): the masked-joint reference of t's effective-data multiplier, which has the
  # joint run's batches and update schedule, so M against it is transfer from the other tasks.
  masked_joint: bool = True
  # transfer: B (and the order it predicts) from the first estimate_seeds seeds; the orders are
  # measured on the other seeds (out of sample). 0 = every seed for both (in sample).
  estimate_seeds: int = 0
  # efficiency sub-studies. model_sizes: the whole study once per d_model (mlp_dim 4 x d_model,
  # the base's heads and layers), its tests Holm-corrected across tasks x sizes (the "and when?").
  # lr_candidates: each arm kind (every single-task run, the joint run, every masked-joint run)
  # takes its LR among these, chosen on the tuning split with the first seed, then every seed
  # runs at the chosen LRs (so "joint training is worse" is not "joint training wanted another LR").
  model_sizes: tuple[int, ...] = ()
  lr_candidates: tuple[float, ...] = ()
  # efficiency: a second joint arm ("multi_tuned") at a mixture tuned on the tuning split among
  # the uniform one and rates proportional to share_t ** (-1 / T) for these temperatures T
  # (share_t: the task's measured share of the uniform joint run's loss tokens; T = 1 gives every
  # task equal loss tokens, large T the uniform mixture): separates "uniform mixing was a bad
  # choice" from "joint training does not transfer".
  mixture_temperatures: tuple[float, ...] = ()
  # expert_composition (issue 20, study ii): the held-out task the experts are composed on, the
  # few-shot examples (of its train split) that choose the mixture, and the CEM's size.
  new_task: str = ""
  shots: int = 16
  cem_population: int = 32
  cem_iterations: int = 50
  # fast_slow (issue 21): the soft prompts' LR (the fast weights) and the model's (the slow ones).
  fast_lr: float = 3e-2
  slow_lr: float = 1e-3
