"""The demo: a ~1M-parameter Llama-style model on three tasks, on a CPU, in a few minutes.

Tasks: `reverse` and `addition` have one right answer; `grammar` (any sentence of a small
grammar) has many, so its entropy should stay up while the others sharpen.

  mtjax train --config configs/demo.py --workdir runs/train_demo
  mtjax train --config configs/demo.py:tiny --workdir /tmp/tiny     # seconds; what tests use
  mtjax train --config configs/demo.py --workdir runs/train_demo --config.train.steps=50
"""

import ml_collections

from mtjax import config as config_lib

TASKS = ("reverse", "addition", "grammar")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = config_lib.defaults()  # set only what differs from mtjax.config's defaults
  c.model.z_loss = 1e-4
  c.data.tasks = TASKS
  # Explicit, so `--config.data.mixture.grammar=3` changes one task's weight and keeps the others.
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.data.seq_len = 96
  c.train.steps = 400
  c.optimizer.warmup_steps = 30
  c.checkpoint.every = 100

  if variant == "tiny":  # seconds on a CPU: the shape tests and smoke runs use
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    c.data.update(batch_size=8, seq_len=64)
    c.train.update(steps=10, log_every=1)
    c.optimizer.update(warmup_steps=2)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c


def get_sweep(variant: str = "") -> list[dict]:
  """`mtjax sweep --config configs/demo.py --workdir runs/demo_sweep`: grammar's sampling weight
  1 vs 3, two seeds each (results.md: mean ± std over seeds)."""
  del variant
  return [{"seed": seed, "data.mixture.grammar": weight} for weight in (1.0, 3.0) for seed in (0, 1)]
