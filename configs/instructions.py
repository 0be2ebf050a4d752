"""Instruction ablation (Kung & Peng): original vs empty vs wrong instructions, per task.

  mtjax experiment instructions --config configs/instructions.py --workdir runs/instructions
  mtjax experiment instructions --config configs/instructions.py:tiny --workdir /tmp/ins   # tests
  mtjax report runs/instructions
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_copy", "structured_reverse", "structured_sort", "structured_addition")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.eval.max_new_tokens = "auto"  # each task's longest held-out target + EOS
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=100, seeds=(0, 1, 2), eval_every=100, target=0.0, targets={},
      metric="token_accuracy", entropy_coef=0.0))
  if variant == "tiny":
    c.data.tasks = ("reverse", "addition")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 3
    c.eval.update(num_examples=8, num_generate=0, batch_size=8)
    c.optimizer.update(warmup_steps=2)
    c.study.update(steps_per_task=3, seeds=(0,), eval_every=6)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
