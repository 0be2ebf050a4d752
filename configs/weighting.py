"""Weighting study: adaptive task weighting (train.weighting.method) and online data mixing
(data.mixing.method, temperature-scaled rates) against static and tuned static loss weights, at
equal tokens, on six synthetic tasks (mtjax.experiments.weighting).

  mtjax experiment weighting --config configs/weighting.py --workdir runs/weighting
  mtjax experiment weighting --config configs/weighting.py:tiny --workdir /tmp/wt   # tests
  mtjax report runs/weighting                                                       # rebuild

The full study (6 tasks x 11 arms x 3 seeds, plus a 3-run tuning sweep) is sized to finish in
under 30 minutes on 2 CPU cores.
"""

import ml_collections

from mtjax.config import sibling_config

# The efficiency study's tasks (each rises clearly above its floor within a few hundred joint
# steps at this size) and the demo's `reverse`: the same kind of task as structured_reverse but
# with 20,000 training examples against the suites' 5,000, so examples-proportional rates at a
# temperature are not all equal (the temperature arm samples it twice as often as each other task
# at temperature 2). Left out: structured_addition and structured_modular (at their floors after
# 400 joint steps at this size), open_ended_sum_pair (0.449 token accuracy, floor 0.430).
TASKS = ("structured_copy", "structured_reverse", "structured_sort", "open_ended_grammar",
         "open_ended_template", "reverse")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.data.update(batch_size=16, seq_len=64)
  c.data.rate_temperature = 2.0  # the temperature arm's (every other arm samples equally)
  c.train.log_every = 25
  # Every task scored by teacher-forced held-out token accuracy (open-ended tasks against their
  # Bayes-optimal ceiling): 1,000 examples per task after the 100 of the tuning split, on which the
  # tuned_static arm's weights are chosen. No generation: evals cost well under a second.
  c.eval.update(num_examples=1000, num_generate=0, num_samples=0, sample_prompts=0, batch_size=100)
  steps_per_task = 50  # 300 steps per arm
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=steps_per_task, seeds=tuple(range(10)), primary="methods-tuned_static", eval_every=steps_per_task * len(TASKS),
      target=0.0, targets={}, metric="token_accuracy", task_metrics={}, tuning_examples=100,
      eval_schedule="every", lr_schedule="constant", lr_decay_steps=0))
  if variant == "tiny":  # the tests: the machinery, not a finding
    c.data.tasks = ("structured_sort", "open_ended_template")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, num_layers=1, mlp_dim=64)  # one layer: less to compile per arm
    c.data.update(batch_size=8)
    c.train.log_every = 2
    c.optimizer.update(lr=1e-2, warmup_steps=2)
    c.eval.update(num_examples=8, batch_size=8)
    c.data.mixing.every = 2  # ODM decides within the few steps
    c.study.update(steps_per_task=4, seeds=(0,), eval_every=8, tuning_examples=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
