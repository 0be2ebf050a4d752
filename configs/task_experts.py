"""Task-experts study (issue 20 (i)): from one multi-task base, per-task SVF experts vs per-task
LoRA vs one shared LoRA vs full multi-task fine-tuning vs one full fine-tuning per task, at equal
optimizer steps per model.

  mtjax experiment task_experts --config configs/task_experts.py --workdir runs/task_experts
  mtjax experiment task_experts --config configs/task_experts.py:tiny --workdir /tmp/tx   # tests
  mtjax report runs/task_experts                                                          # rebuild

Settings: study.steps_per_task x number of tasks = the base run's steps (trained from scratch on
the mixture, then exported); train.steps = every fine-tuning arm's steps (each full_per_task run
too); optimizer.lr = the base's and the full fine-tuning arms' LR; the LoRA arms run at
optimizer.lr x task_experts.LORA_LR_SCALE, the SVF arm at model.svf.lr; model.lora.rank/alpha =
both LoRA arms' (on the projections model.svf.targets names, as the SVF experts). Sized for a
2-core CPU: 3 seeds x (a 600-step base + 7 fine-tuning runs of 200 steps, each evaluated at its
start and end with 200 greedy generations per task) took 6 min 36 s there (beside another run).

LRs chosen on the tuning split (pilot: seed 0, --config.study.split=tuning, mean accuracy over the
tasks after 200 steps): full fine-tuning at a third of the base's LR (1e-3: 0.493; 3e-3: 0.466;
3.3e-4: 0.487), LoRA at the base's (3e-3: 0.480; 9e-3: 0.467), SVF at 2e-2 (0.439; 8e-2: 0.436;
3e-1: 0.440; SVF moves little at any of them).
"""

import ml_collections

from mtjax.config import sibling_config

# Two exact-answer transformations that pull the shared weights different ways (sort, reverse) and
# one open-ended task judged by its verifier (efficiency study's tasks a small model learns).
# open_ended_grammar was dropped after the pilot: its held-out prompts come from a handful of
# (subject, object) pairs, so its accuracy moves in steps of ~0.1 between arms.
TASKS = ("structured_sort", "structured_reverse", "open_ended_template")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.data.update(batch_size=16, seq_len=64)
  c.train.update(steps=200, log_every=25)  # train.steps: each fine-tuning arm's steps
  c.train.entropy_coefs = {}
  c.optimizer.update(lr=3e-3, warmup_steps=10)
  c.model.lora.update(rank=4, alpha=8.0, targets=(), per_task=False)  # targets: set per arm
  c.model.svf.update(enabled=False, targets=("gate", "up", "down"), per_task=True, lr=2e-2)
  # Held-out, after the 100-example tuning split: generated (greedy) answers to 200 prompts per
  # task, scored by the task's scorer (exact match; the open-ended tasks' verifier): `accuracy`;
  # teacher-forced token accuracy on 1,000 examples too (reported beside it).
  c.eval.update(num_examples=1000, num_generate=200, num_samples=0, sample_prompts=0, batch_size=100)
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=200, seeds=tuple(range(10)), primary="svf_per_task-lora_per_task", eval_every=200, target=0.0, targets={},
      metric="accuracy", task_metrics={}, tuning_examples=100, eval_schedule="every",
      lr_schedule="constant", lr_decay_steps=0))
  if variant == "tiny":  # the tests: the machinery, not a finding
    c.data.tasks = ("structured_sort", "open_ended_template")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.update(steps=2, log_every=1)
    c.optimizer.update(lr=1e-2, warmup_steps=1)
    c.eval.update(num_examples=8, num_generate=0, batch_size=8)
    c.study.metric = "token_accuracy"  # no decoding (speed)
    c.study.update(steps_per_task=2, seeds=(0,), eval_every=2, tuning_examples=0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
