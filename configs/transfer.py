"""Transfer and order study: real backward transfer from pairwise sequential runs (train a, then
b; how much b damages a), Omni-Thinker's order from it (tasks that later training damages most come
late), predicted vs measured final scores, and the FWT-greedy order beside it.

  mtjax experiment transfer --config configs/transfer.py --workdir runs/transfer
  mtjax experiment transfer --config configs/transfer.py:tiny --workdir /tmp/transfer   # tests
  mtjax report runs/transfer                                                              # rebuild

Cost per seed with T tasks and one stage of S steps: T single runs (S steps), T(T-1) pairwise
runs (2S) on the estimation seeds, and the order runs (T x S each; every one of the T! orders
when T <= 3, else Omni-Thinker's, the predicted worst and FWT-greedy) on the test seeds. Full
config: T = 3, S = 50, seeds 0-2 estimate (3 + 6 runs, 750 steps each seed), seeds 3-9 test
(3 + 6 runs, 1,050 steps each seed): 90 runs, 9,600 steps in all (one seed of the old in-sample
design, 15 runs, took 3.2 CPU-minutes; about 20 minutes on 2 otherwise idle cores).
"""

import ml_collections

from mtjax.config import sibling_config

# Three tasks every single-task run learns well above its untrained score within one stage
# (structured_copy/reverse barely move at this size, so normalizing by them would inflate transfer).
TASKS = ("structured_sort", "open_ended_grammar", "open_ended_template")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  # Constant LR after warmup in every arm: a stage started later trains at the same LR, and the
  # single-task reference is at the same LR as the pairwise runs' first stage.
  # Score: teacher-forced token accuracy on 1,000 held-out examples per task (after the 100 of the
  # tuning split), for every task, open-ended ones included: transfer needs a score each task
  # moves on within one 50-step stage (the greedy verifier's accuracy of a 50-step model is ~0,
  # so every task would fall under the min-gain guard), and it has no targets to judge.
  c.eval.update(num_examples=1000, num_generate=0, num_samples=0, sample_prompts=0, batch_size=64)
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=50, seeds=tuple(range(10)), eval_every=50, target=0.0, targets={},
      metric="token_accuracy", task_metrics={}, entropy_coef=0.0, eval_schedule="every",
      lr_schedule="constant", lr_decay_steps=0, tuning_examples=100,
      # B and Omni-Thinker's order from seeds 0-2; the orders measured on seeds 3-9 (out of
      # sample: 7 fresh seeds, so the sign-flip test can reach p = 2/128).
      estimate_seeds=3, primary="omni_thinker-orders"))
  if variant == "tiny":
    c.data.tasks = ("structured_sort", "open_ended_grammar")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 3
    c.eval.update(num_examples=8, num_generate=0, batch_size=8)
    c.optimizer.update(lr=1e-2, warmup_steps=2)
    c.study.update(steps_per_task=4, seeds=(0,), eval_every=4, tuning_examples=0,
                   estimate_seeds=0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
