"""Expert-composition study (issue 20, study ii): per-task SVF experts (Transformer-squared) trained
on copy, reverse and sort, composed few-shot by CEM on a held-out composite task, sort descending.

  mtjax experiment expert_composition --config configs/expert_composition.py --workdir runs/expert_composition
  mtjax experiment expert_composition --config configs/expert_composition.py:tiny --workdir /tmp/ec  # tests
  mtjax report runs/expert_composition                                                              # rebuild

Per seed: a base trained from scratch on data.tasks for study.steps_per_task x len(data.tasks)
steps, exported; one SVF run from that export (model.svf per task, the base frozen) for
train.steps steps; then mtjax.eval.compose on study.new_task: study.shots few-shot examples of its
train split pick the CEM mixture (study.cem_population x study.cem_iterations candidates) and the
best single expert; held-out exact match on eval.num_generate examples of its validation split.
"""

import ml_collections

from mtjax.config import sibling_config

TASKS = ("structured_copy", "structured_reverse", "structured_sort")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.data.update(batch_size=16, seq_len=64)
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.model.svf.update(enabled=False, targets=("gate", "up", "down"), per_task=True, lr=2e-3)
  c.train.update(steps=150, log_every=25)  # train.steps: the SVF run's steps
  c.train.entropy_coefs = {}
  c.optimizer.update(lr=3e-3, warmup_steps=20)  # the base's LR (the SVF run takes model.svf.lr)
  # eval.num_generate: the held-out examples of study.new_task the composition is scored on
  # (greedy exact match); the arms themselves evaluate data.tasks teacher-forced only.
  c.eval.update(num_examples=1000, num_generate=200, num_samples=0, batch_size=100)
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=200, seeds=tuple(range(10)), primary="composed_vs_best_single", eval_every=150, target=0.0, targets={},
      metric="token_accuracy", task_metrics={}, tuning_examples=100,
      new_task="structured_sort_desc", shots=16, cem_population=32, cem_iterations=50))
  if variant == "tiny":  # the tests: the machinery, not a finding
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.update(steps=3, log_every=1)
    c.optimizer.update(lr=1e-2, warmup_steps=1)
    c.eval.update(num_examples=8, num_generate=8, batch_size=8)
    c.study.update(steps_per_task=2, seeds=(0,), eval_every=3, shots=4, cem_population=4,
                   cem_iterations=2)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
