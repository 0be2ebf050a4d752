"""Efficiency study: the structured + open-ended suites, single-task vs multi-task at equal compute.

  mtjax experiment efficiency --config configs/efficiency.py --workdir runs/efficiency
  mtjax experiment efficiency --config configs/efficiency.py:demo --workdir runs/demo   # make demo
  mtjax experiment efficiency --config configs/efficiency.py:tiny --workdir /tmp/eff   # tests
  mtjax report runs/efficiency                                                          # rebuild
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_copy", "structured_reverse", "structured_sort", "structured_addition",
         "structured_modular", "open_ended_grammar", "open_ended_sum_pair", "open_ended_template")


DEMO_TASKS = ("structured_copy", "structured_reverse", "open_ended_grammar", "open_ended_template")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "demo.py")
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.data.update(batch_size=16, seq_len=64)
  c.train.log_every = 25
  c.optimizer.update(lr=3e-3, warmup_steps=20)
  # Teacher-forced held-out token accuracy: a smooth score every task moves on in minutes of CPU.
  c.eval.update(num_examples=32, num_generate=0, num_samples=0, batch_size=16)
  # Every arm at the same LR at the same step (constant after warmup, whatever its length), and
  # evals log-spaced early (steps 1, 2, 4, 8, ...) besides every eval_every steps, so crossings
  # of the targets are bracketed tightly where single-task runs cross them.
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=150, seeds=(0, 1, 2), eval_every=25, target=0.8, metric="token_accuracy",
      targets={"structured_addition": 0.6, "structured_modular": 0.4},
      eval_schedule="log", lr_schedule="constant", lr_decay_steps=0))
  if variant == "demo":  # `make demo`: 4 tasks x 3 seeds, under 10 minutes on 2 CPU cores
    c.data.tasks = DEMO_TASKS
    c.data.mixture = {t: 1.0 for t in DEMO_TASKS}
    # Targets each single-task run reaches within its 100 steps (copy and reverse climb slowly
    # at this size), so tokens-to-target is measured for every task in both arms.
    c.study.update(steps_per_task=100, seeds=(0, 1, 2), eval_every=10)
    # Assigned, not updated: update() would merge these into the full study's per-task targets.
    c.study.targets = {"structured_copy": 0.12, "structured_reverse": 0.12}
  elif variant == "tiny":
    c.data.tasks = TASKS[:2]
    c.data.mixture = {t: 1.0 for t in TASKS[:2]}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 2
    c.optimizer.update(lr=1e-2, warmup_steps=2)
    c.eval.update(num_examples=8, num_generate=0)
    # A target both arms reach within a few steps (held-out token accuracy climbs from 0 to ~0.1
    # once the tiny model learns the target alphabet), so the ratio is a real measurement.
    # Two seeds keep it fast: the verdict is "inconclusive" (fewer than 3 seeds) by design.
    c.study.update(steps_per_task=16, seeds=(0, 1), eval_every=4, target=0.08)
    c.study.targets = {}
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo, tiny)")
  return c
