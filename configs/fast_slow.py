"""Fast/slow study (issue 21): a sequence of tasks learned one after another from one multi-task
base, by slow weights only (supervised fine-tuning), fast weights only (per-task soft prompts) and
both (soft prompts at a high LR beside the weights at a low one), at equal optimizer steps.

  mtjax experiment fast_slow --config configs/fast_slow.py --workdir runs/fast_slow
  mtjax experiment fast_slow --config configs/fast_slow.py:tiny --workdir /tmp/fs   # tests
  mtjax report runs/fast_slow                                                      # rebuild

Settings: data.tasks in order = the sequence (one stage of study.steps_per_task steps each);
optimizer.lr = the base's LR (trained from scratch on the equal mixture for study.steps_per_task
x number of tasks steps, then exported); study.fast_lr = the soft prompts' LR (fast and fast_slow),
study.slow_lr = the weights' LR (slow and fast_slow: optimizer.slow_lr_ratio = slow_lr / fast_lr);
model.soft_prompt.length = the soft prompts' length; optimizer.fast_every / slow_every = the
fast_slow arm's interleaving. Every arm logs eval/<task>/kl_drift (eval.drift). Sized for a
2-core CPU: 3 seeds x (a 450-step base + 3 arms of 450 steps, evaluated every 50 steps on 200
held-out examples per task, 200 generations for the template task) took about 7 minutes there.
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_sort", "structured_reverse", "open_ended_template")  # learned in this order


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.model.soft_prompt.length = 8
  c.data.update(batch_size=16, seq_len=80)
  c.train.update(steps=1, log_every=25)  # every arm's steps: the stages' (set by the study)
  c.train.entropy_coefs = {}
  c.optimizer.update(lr=3e-3, warmup_steps=10)
  # Held-out, after the 100-example tuning split: 1,000 examples per task (teacher-forced token
  # accuracy; the template task: its verifier on 200 greedy generations).
  c.eval.update(num_examples=1000, num_generate=200, num_samples=0, sample_prompts=0,
                batch_size=100)
  # Targets (steps to target: plasticity) chosen on the tuning split (pilot: seed 0,
  # --config.study.split=tuning; step-0 scores sort 0.840, reverse 0.378, template 0.900, the best
  # arm's score at the end of the task's own stage 0.902, 0.464, 0.990) by one rule: step-0 score
  # + 0.5 x (that best - step-0 score), rounded down to 0.01; where the floor (the larger of the
  # tuning and report splits', mtjax.experiments.floors) lies above the step-0 score, from the
  # floor instead: reverse 0.453 + 0.5 x (0.464 - 0.453), rounded down to 0.001 (reverse at this
  # size barely beats "the prompt's remaining letters in descending order"). LRs: not searched
  # (fast 3e-2, slow 1e-3, the base's 3e-3); the pilot only checked that every arm moves.
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=150, seeds=tuple(range(10)), primary="fast_slow-slow", eval_every=50, target=0.0, metric="token_accuracy",
      targets={"structured_sort": 0.87, "structured_reverse": 0.458, "open_ended_template": 0.94},
      task_metrics={"open_ended_template": "accuracy"}, tuning_examples=100,
      eval_schedule="every", lr_schedule="constant", lr_decay_steps=0,
      fast_lr=3e-2, slow_lr=1e-3))
  if variant == "tiny":  # the tests: the machinery, not a finding
    c.data.tasks = ("structured_sort", "open_ended_template")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.model.soft_prompt.length = 4
    c.data.update(batch_size=8)
    c.train.update(log_every=1)
    c.optimizer.update(lr=1e-2, warmup_steps=1)
    c.eval.update(num_examples=8, num_generate=0, batch_size=8)
    c.study.task_metrics = {}
    c.study.targets = {}  # assigned, not updated: update() would merge the full study's
    c.study.update(steps_per_task=4, seeds=(0,), eval_every=2, tuning_examples=0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
