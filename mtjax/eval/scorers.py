"""Scores over generated samples: pass@k (unbiased), distinct-k, sequence-level entropy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):
  1 - C(n - c, k) / C(n, k), computed as a stable product."""
  if k > n:
    raise ValueError(f"k={k} > n={n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def distinct_k(outputs: Sequence[str], valid: Sequence[bool], k: int) -> int:
  """Number of distinct valid outputs among the first k samples."""
  return len({o for o, ok in zip(list(outputs)[:k], list(valid)[:k]) if ok})


def sequence_entropy(logprobs: Sequence[float]) -> float:
  """Monte-Carlo estimate of the entropy of the output distribution: mean of -log p(sample)
  (exact in expectation for samples drawn at temperature 1)."""
  return float(-np.mean(logprobs)) if len(logprobs) else 0.0
