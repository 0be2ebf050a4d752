"""Two structured tasks (copy, reverse) with held-out eval: reaches high greedy exact match on CPU.

  mtjax train --config configs/copy_reverse.py --workdir runs/copy_reverse
  mtjax eval --workdir runs/copy_reverse          # writes runs/copy_reverse/eval/step_<S>.json
"""

import ml_collections

from mtjax.config import sibling_config
from mtjax.tasks import get_mixture  # noqa: F401  (the suites register on import)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "demo.py")
  tasks = ("structured_copy", "structured_reverse")
  c.data.tasks = tasks
  c.data.mixture = {t: 1.0 for t in tasks}
  c.data.seq_len = 64
  c.train.steps = 500
  c.checkpoint.every = 250
  c.eval.update(every=250, num_examples=64, num_generate=200, sample_prompts=8, num_samples=4,
                batch_size=32)
  if variant == "tiny":
    c.train.steps = 20
    c.eval.update(every=10, num_generate=8, num_examples=8, sample_prompts=2)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
