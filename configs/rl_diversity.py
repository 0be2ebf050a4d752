"""RL diversity study (issue 19): SFT, then GRPO vs GRPO + DARLING vs GRPO with a larger KL, on
the open-ended tasks a small model learns and one structured task.

  mtjax experiment rl_diversity --config configs/rl_diversity.py --workdir runs/rl_diversity
  mtjax experiment rl_diversity --config configs/rl_diversity.py:tiny --workdir /tmp/rld  # tests
  mtjax report runs/rl_diversity                                                          # rebuild

Settings: study.steps_per_task x number of tasks = the SFT steps; train.steps = each RL arm's
steps; rl.* = the GRPO settings of every RL arm (rl.kl_coef: beta of grpo and grpo_darling;
grpo_high_kl takes 10x it); study.eval_every = the RL arms' eval cadence; optimizer.lr = the SFT
LR (the RL arms take a tenth of it). Sized for a 2-core CPU: 3 seeds x (600 SFT steps + 3 RL
arms x 60 steps of 8 prompts x 8 samples) took 14 min 52 s there (beside another study).
"""

import ml_collections

from mtjax.config import sibling_config

# open_ended_sum_pair is left out: at this size its verifier accuracy stays 0 (efficiency study's
# pilot), so its RL rewards would all be 0 (no advantage, nothing to learn or to collapse).
TASKS = ("open_ended_grammar", "open_ended_template", "structured_sort")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "efficiency.py")
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  # 96: the longest prompt (39 tokens, template) in the one prompt bucket of 48, + 42 new tokens.
  c.data.update(batch_size=16, seq_len=96)
  c.train.update(steps=60, log_every=5)  # train.steps: each RL arm's steps
  c.train.entropy_coefs = {}
  c.optimizer.update(lr=3e-3, warmup_steps=10)
  c.rl.update(prompts=8, samples=8, epochs=2, clip_eps=0.2, kl_coef=0.02, normalize_std=True,
               max_new_tokens="auto", buckets=(48,))  # auto: the longest training target + EOS
  # Held-out, after the 100-example tuning split: 200 prompts x 8 samples per task (pass@1,
  # pass@8, distinct@8, seq entropy) and 1,000 examples for the teacher-forced entropy; no greedy
  # decoding. Evaluated at RL steps 0, 30 and 60.
  c.eval.update(num_examples=1000, num_generate=0, sample_prompts=200, num_samples=8,
                temperature=1.0, max_new_tokens="auto", batch_size=200)
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=200, seeds=tuple(range(10)), primary="darling_distinct_vs_grpo", eval_every=30, target=0.0, targets={},
      metric="token_accuracy", task_metrics={}, tuning_examples=100))
  if variant == "tiny":  # the tests: the machinery, not a finding
    c.data.tasks = ("open_ended_template",)  # one task: one eval compile per arm (speed)
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.update(steps=2, log_every=1)
    c.optimizer.update(lr=1e-2, warmup_steps=1)
    c.rl.update(prompts=4, samples=2, epochs=1)  # B x n rows split over the (8 test) devices
    c.eval.update(num_examples=8, sample_prompts=2, num_samples=2, batch_size=8)
    c.study.update(steps_per_task=4, seeds=(0,), eval_every=2, tuning_examples=0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
