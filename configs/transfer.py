"""Transfer and order study: sequential stages (R matrix, ACC/BWT/FWT/forgetting), the
backward-transfer-guided order, and joint vs structured-first vs open-ended-first vs BWT-guided.

  mtjax experiment transfer --config configs/transfer.py --workdir runs/transfer
  mtjax experiment transfer --config configs/transfer.py:tiny --workdir /tmp/transfer   # tests
  mtjax report runs/transfer                                                              # rebuild
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_copy", "structured_reverse", "structured_sort", "open_ended_grammar",
         "open_ended_template")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=100, seeds=(0, 1, 2), eval_every=100, target=0.0, targets={},
      metric="token_accuracy", entropy_coef=0.0))
  if variant == "tiny":
    c.data.tasks = ("structured_copy", "structured_reverse", "open_ended_grammar")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 3
    c.eval.update(num_examples=8, num_generate=0, batch_size=8)
    c.optimizer.update(warmup_steps=2)
    c.study.update(steps_per_task=3, seeds=(0,), eval_every=3)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
