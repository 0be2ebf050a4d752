"""Model FLOPs and MFU, counted the way MaxText counts them.

Model FLOPs per token = 6 x (matmul parameters) for forward + backward (the embedding lookup is
not a matmul; a tied embedding is counted once, as the output head) + attention's two matmuls
(scores and values): 12 x layers x heads x head_dim x context per token for forward + backward,
HALVED for causal attention (half the score matrix is masked; MaxText's convention). With a
sliding window W shorter than the sequence, a query sees on average W - W(W-1)/(2L) keys.

MFU = model FLOPs per second / peak. Two peaks: the device's dense spec peak (the table below,
by device kind and compute dtype; what MaxText and papers report) and, in `mtjax bench`, the
matmul peak measured on the device in the same run.
"""

from __future__ import annotations

import math
from typing import Any

# Dense (no sparsity) peak FLOP/s per chip, from the vendors' spec sheets: bfloat16 and float32
# (float32 without TF32 on NVIDIA). Matched against jax's device_kind, longest key first.
SPEC_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},  # v5p reports "TPU v5"
    "TPU v6 lite": {"bfloat16": 918e12},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12},
}


def spec_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense spec peak for `dtype`, or None if it is not in the table (e.g. CPU)."""
  for key in sorted(SPEC_PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return SPEC_PEAK_FLOPS[key].get(dtype)
  return None


def matmul_params(spec: Any) -> int:
  """Parameters that take part in a matmul per token: every weight but the embedding lookup
  (which counts when tied, as the output head); norms and biases are negligible and included."""
  from flax import nnx

  from mtjax.model import Decoder
  state = nnx.state(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  total = 0
  for path, leaf in nnx.to_flat_state(state):
    if "token_embed" in [str(p) for p in path] and not spec.tie_embeddings:
      continue
    total += math.prod(leaf.shape)
  return total


def model_flops_per_token(spec: Any, seq_len: int, *, causal: bool = True) -> float:
  """Training (forward + backward) model FLOPs per token; see the module docstring."""
  per_key = 12 * spec.num_layers * spec.num_heads * spec.head_dim
  window = spec.sliding_window
  if causal and window and window < seq_len:
    keys = window - window * (window - 1) / (2 * seq_len)
  else:
    keys = seq_len / 2 if causal else seq_len
  return 6 * matmul_params(spec) + per_key * keys


def mfu(flops_per_s: float, peak: float | None) -> float | None:
  return None if not peak else flops_per_s / peak
