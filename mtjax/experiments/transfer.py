"""Continual-learning transfer metrics over an accuracy matrix, and the BWT-guided task order.

R[i, j] = score on task j after training stage i (stages in order, one task each). Scores are
normalized per task before use (divided by `reference`, e.g. each task's single-task score).
Definitions follow GEM (Lopez-Paz & Ranzato, 2017) and, for forgetting, Chaudhry et al. (2018):

  ACC        = mean_j R[T-1, j]
  BWT        = mean_{j < T-1} (R[T-1, j] - R[j, j])
  FWT        = mean_{j > 0}   (R[j-1, j] - baseline[j])
  forgetting = mean_{j < T-1} (max_{l < T-1} R[l, j] - R[T-1, j])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalize(R: np.ndarray, reference: Sequence[float]) -> np.ndarray:
  ref = np.asarray(reference, np.float64)
  if np.any(ref <= 0):
    raise ValueError(f"reference scores must be positive, got {ref.tolist()}")
  return np.asarray(R, np.float64) / ref[None, :]


def metrics(R: np.ndarray, baseline: Sequence[float] | None = None) -> dict[str, float]:
  R = np.asarray(R, np.float64)
  T = R.shape[0]
  if R.shape != (T, T):
    raise ValueError(f"R must be square (stages x tasks), got {R.shape}")
  b = np.zeros(T) if baseline is None else np.asarray(baseline, np.float64)
  out = {"acc": float(R[-1].mean())}
  if T > 1:
    out["bwt"] = float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))
    out["fwt"] = float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))
    out["forgetting"] = float(np.mean([R[: T - 1, j].max() - R[-1, j] for j in range(T - 1)]))
  return out


def greedy_order(M: np.ndarray) -> list[int]:
  """Greedy order from a transfer matrix M[a, b] (normalized score on b after training on a):
  next, the remaining task whose training maximizes the mean score over the other remaining
  tasks (ties: the lowest index), as in Omni-Thinker's backward-transfer-guided curriculum."""
  M = np.asarray(M, np.float64)
  remaining = list(range(M.shape[0]))
  order = []
  while remaining:
    if len(remaining) == 1:
      order.append(remaining.pop())
      break
    gains = [np.mean([M[a, b] for b in remaining if b != a]) for a in remaining]
    best = remaining[int(np.argmax(gains))]
    order.append(best)
    remaining.remove(best)
  return order
