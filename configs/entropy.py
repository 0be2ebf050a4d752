"""Entropy study: per-task entropy and distinct-k of structured vs open-ended tasks under joint
training, with an entropy term on the open-ended ones, and with structured tasks first.

  mtjax experiment entropy --config configs/entropy.py --workdir runs/entropy
  mtjax experiment entropy --config configs/entropy.py:tiny --workdir /tmp/ent   # tests
  mtjax report runs/entropy                                                      # rebuild
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_copy", "structured_reverse", "open_ended_grammar", "open_ended_template")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  # Sampled completions give distinct@k and pass@1; teacher-forced eval gives the entropy.
  # max_new_tokens "auto": each task's longest held-out target + EOS (a number below a target
  # would cap pass@1 and distinct@k); set explicitly over efficiency.py's number.
  # 1,000 held-out examples per task (after the 100 of the tuning split, study.tuning_examples) for
  # the entropy, 200 prompts x 4 samples for distinct@4 and pass@1.
  c.eval.update(num_examples=1000, num_generate=0, sample_prompts=200, num_samples=4, temperature=1.0,
                max_new_tokens="auto", batch_size=64)
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=150, seeds=tuple(range(10)), primary="joint_regularized-joint", eval_every=150, target=0.0, targets={},
      metric="token_accuracy", entropy_coef=0.05, task_metrics={}, tuning_examples=100))
  if variant == "tiny":
    c.data.tasks = ("structured_copy", "open_ended_grammar")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 2
    c.eval.update(num_examples=8, sample_prompts=2, num_samples=2, batch_size=8)
    c.study.tuning_examples = 0
    c.optimizer.update(warmup_steps=2)
    c.study.update(steps_per_task=3, seeds=(0,), eval_every=3)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
