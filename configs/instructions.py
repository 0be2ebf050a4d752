"""Instruction ablation (Kung & Peng): original vs empty vs misleading instructions, per task.

  mtjax experiment instructions --config configs/instructions.py --workdir runs/instructions
  mtjax experiment instructions --config configs/instructions.py:zero_shot \
      --config.model.pretrained=DIR --workdir runs/instructions_zs    # + held-out-task arms
  mtjax experiment instructions --config configs/instructions.py:tiny --workdir /tmp/ins   # tests
  mtjax report runs/instructions
"""

import os

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_copy", "structured_reverse", "structured_sort", "structured_addition")
# The zero-shot arms' base (an HF directory: config.json, *.safetensors, tokenizer files); nothing
# is downloaded: put one there, set $MTJAX_PRETRAINED or --config.model.pretrained=DIR.
PRETRAINED = os.environ.get("MTJAX_PRETRAINED") or os.path.expanduser("~/.cache/mtjax/pretrained/base")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.eval.max_new_tokens = "auto"  # each task's longest held-out target + EOS
  # Greedy exact match on 200 held-out prompts per task, token accuracy on 1,000 beside
  # it, after the first 100 (the tuning split, study.tuning_examples).
  c.eval.update(num_examples=1000, num_generate=200)
  # eval_every = the arm's length: evaluated at steps 0 and 400 only (generation is the slow part).
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=100, seeds=tuple(range(10)), eval_every=400, target=0.0, targets={},
      metric="accuracy", entropy_coef=0.0, tuning_examples=100))
  if variant == "zero_shot":
    c.model.pretrained = PRETRAINED
  elif variant == "tiny":
    c.data.tasks = ("reverse", "addition")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 3
    c.eval.update(num_examples=8, num_generate=8, batch_size=8)
    c.optimizer.update(warmup_steps=2)
    c.study.update(steps_per_task=3, seeds=(0,), eval_every=6, tuning_examples=0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny, zero_shot)")
  return c
