"""Decomposition study (Granite): function calling as the umbrella task alone vs the seven
granular subtasks plus the umbrella, at equal tokens; scored on held-out APIs per subtask.

  mtjax experiment decomposition --config configs/decomposition.py --workdir runs/decomposition  # ~30 min, 2 cores
  mtjax experiment decomposition --config configs/decomposition.py:tiny --workdir /tmp/dec  # tests
  mtjax report runs/decomposition
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = tuple(f"fc_{t}" for t in ("name_detection", "parameter_detection", "next_best", "parallel",
                                  "chaining", "nested", "response", "umbrella"))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "demo.py")
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  # Function-calling examples are 270-1330 bytes (prompt with a 4-API library, and target):
  # rows of 1536 byte tokens hold the longest whole, so no target is ever cut off.
  c.data.update(batch_size=8, seq_len=1536)
  c.train.log_every = 25
  c.optimizer.update(lr=3e-3, warmup_steps=30)
  # accuracy = structural match of the greedy completion on held-out APIs
  # (max_new_tokens: "auto", the default: each task's longest held-out call + EOS.)
  c.eval.update(num_examples=16, num_generate=16, num_samples=0, sample_prompts=0, batch_size=8)
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=25, seeds=(0,), eval_every=100, target=0.0, targets={}, metric="accuracy",
      entropy_coef=0.0))
  if variant == "tiny":
    c.model.update(d_model=32, num_layers=2, mlp_dim=64)
    c.train.log_every = 4
    c.eval.update(num_examples=4, num_generate=2, batch_size=8)
    c.optimizer.update(warmup_steps=2)
    c.study.update(steps_per_task=1, seeds=(0,), eval_every=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
