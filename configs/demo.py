"""The demo: a ~1M-parameter Llama-style model on three tasks, on a CPU, in a few minutes.

Tasks: `reverse` and `addition` have one right answer; `grammar` (any sentence of a small
grammar) has many, so its entropy should stay up while the others sharpen.

  mtjax train --config configs/demo.py --workdir runs/train_demo
  mtjax train --config configs/demo.py:tiny --workdir /tmp/tiny     # seconds; what tests use
  mtjax train --config configs/demo.py --workdir runs/train_demo --config.train.steps=50
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=512, head_dim=0,
      vocab_size=0, dtype="auto", remat="none", attention="reference", tie_embeddings=False,
      z_loss=1e-4, rope_theta=10_000.0, norm_eps=1e-6))
  c.mesh = ml_collections.ConfigDict(dict(dcn=1, data=1, fsdp=-1, tensor=1))  # dcn: TPU slices

  tasks = ("reverse", "addition", "grammar")
  c.data = ml_collections.ConfigDict(dict(
      mixture_name="", tasks=tasks, mixture={t: 1.0 for t in tasks}, rates="explicit", rate_temperature=1.0,
      rate_cap=0, rate_scale=1.0, schedule="constant", stages=(),
      batch_size=32, seq_len=96, tokenizer="byte", prefetch=2, on_bad_record="stop",
      instructions={}))  # instruction ablation per task: keep | empty | wrong
  c.train = ml_collections.ConfigDict(dict(
      steps=400, log_every=10, loss_weights={t: 1.0 for t in tasks},
      entropy_coefs={t: 0.0 for t in tasks}, max_consecutive_skips=10, progress=True))
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=30, decay_steps=0, min_lr_ratio=0.1, weight_decay=0.1,
      clip_norm=1.0, grad_accum=1, b1=0.9, b2=0.95, eps=1e-8))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=100, keep=3, best_metric="", best_mode="min", keep_best=1))
  c.eval = ml_collections.ConfigDict(dict(
      every=0, tasks=(), num_examples=64, num_generate=32, sample_prompts=8, num_samples=4,
      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32, batch_size=16))

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
