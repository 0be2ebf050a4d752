"""Writes a random HF checkpoint directory (Llama layout) without torch or a download.

config.json, model.safetensors (or shards + index), a small BPE tokenizer (tokenizer.json,
tokenizer_config.json) and generation_config.json: what `--config.model.pretrained=DIR` reads.
Norm weights are 1 + noise, so a layout mistake shows in the logits.

  python bench/make_hf_checkpoint.py --preset tiny --out /tmp/tiny-llama     # 25K parameters
  python bench/make_hf_checkpoint.py --preset 1b --out /tmp/llama-1b         # Llama 3.2 1B shape, bf16
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time

import ml_dtypes
import numpy as np
from etils import epath

from mtjax.data.tokenizer import train_bpe
from mtjax.model import ModelSpec
from mtjax.model import pretrained, tensorfile

PRESETS = {
    # The README's model: the demo config's tiny shape, a 128-token BPE tokenizer.
    "tiny": dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64, tie_embeddings=False, rope_theta=10_000.0,
                 rope_type="default", rope_scaling=(), param_dtype="float32"),
    # Llama 3.2 1B's shape (1.24B parameters, tied embeddings, llama3 RoPE scaling), bf16.
    "1b": dict(vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, mlp_dim=8192, tie_embeddings=True, rope_theta=500_000.0,
               rope_type="llama3",
               rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0),
                             ("low_freq_factor", 1.0),
                             ("original_max_position_embeddings", 8192.0)),
               param_dtype="bfloat16"),
}
# What the tokenizer is trained on: every printable character plus the demo tasks' words.
CORPUS = [string.printable[:-2],
          "reverse: hello -> olleh", "addition: 12+34 -> 46", "grammar: the cat sees a dog .",
          "the a dog cat bird sees likes chases big small red"]


def spec_of(preset: str) -> ModelSpec:
  return ModelSpec(dtype="float32", remat="none", attention="reference", norm_eps=1e-5,
                   **PRESETS[preset])


def write(out: str, preset: str, *, seed: int = 0, max_shard_bytes: int = 5 * 10**9) -> dict:
  """Writes the checkpoint; returns {"parameters", "bytes", "seconds"}."""
  spec = spec_of(preset)
  out_path = epath.Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  train_bpe(CORPUS, min(spec.vocab_size, 128), out_path)
  rng = np.random.default_rng(seed)
  dtype = np.dtype(ml_dtypes.bfloat16) if spec.param_dtype == "bfloat16" else np.dtype(np.float32)
  tensors = [(t.name, t.shape, dtype) for t in pretrained.hf_tensors(spec)]

  def fetch(name: str) -> np.ndarray:
    shape = next(s for n, s, _ in tensors if n == name)
    if name.endswith("norm.weight"):
      return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(dtype)
    return (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)

  tensorfile.write(out_path, tensors, fetch, max_shard_bytes=max_shard_bytes)
  config = pretrained.hf_config(spec, bos_id=1, eos_id=2, pad_id=0, max_length=8192)
  (out_path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  (out_path / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))
  n = sum(int(np.prod(s)) for _, s, _ in tensors)
  return {"parameters": n, "bytes": n * dtype.itemsize, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_shard_gb", type=float, default=5.0)
  args = parser.parse_args(argv)
  facts = write(args.out, args.preset, seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 1e9))
  print(f"wrote {args.out}: {facts['parameters']:,} parameters, {facts['bytes'] / 1e9:.2f} GB "
        f"in {facts['seconds']:.1f}s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
