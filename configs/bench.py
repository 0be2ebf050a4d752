"""The throughput benchmark's model and batch (`mtjax bench`).

  mtjax bench --config configs/bench.py --out bench/results/bench.json          # CPU: the demo model
  mtjax bench --config configs/bench.py:gpu --out bench/results/bench_gpu.json  # one GPU, bf16, 150M
  mtjax bench --config configs/bench.py:gpu_1b --out bench/results/bench_gpu_1b.json  # ~1.2B, seq 2048
  mtjax bench --config configs/bench.py:tiny --out /tmp/bench.json              # seconds; tests
"""

from mtjax.config import sibling_config


def get_config(variant: str = ""):
  c = sibling_config(__file__, "demo.py")
  c.eval.update(num_examples=32, batch_size=16)
  if variant in ("gpu", "gpu_reference"):  # ~150M parameters, bf16, 64 x 1024 tokens per step
    c.model.update(d_model=1024, num_layers=12, num_heads=16, num_kv_heads=8, mlp_dim=4096,
                   attention="auto" if variant == "gpu" else "reference")
    c.data.update(batch_size=64, seq_len=1024, prefetch=4, feedback_lag=5)
  elif variant == "gpu_1b":  # Llama 3.2 1B's shape (tied, GQA 32/8), seq 2048, remat dots
    c.model.update(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                   vocab_size=128256, tie_embeddings=True, attention="auto", remat="dots")
    c.data.update(batch_size=16, seq_len=2048, prefetch=4, feedback_lag=5)
  elif variant == "tiny":
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    c.data.update(batch_size=8, seq_len=64)
    c.eval.update(num_examples=8, batch_size=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: gpu, gpu_reference, gpu_1b, tiny)")
  return c
