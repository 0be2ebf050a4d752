"""The cross-entropy method (CEM) over mixing weights in [0, 1]^K, as Transformer-squared uses it
to compose expert vectors few-shot (Sun et al. 2025, arXiv 2501.06252, section 3.2).

Each iteration samples a population from a Gaussian per coordinate (clipped to [0, 1]), scores
every member, and refits the Gaussian's mean and std to the elite fraction (the best by score,
ties broken by a second key, e.g. the log-likelihood of the few-shot targets). The best member
ever scored is returned. Defaults are the issue's: population 32, elite 20%, 50 iterations.
Deterministic for a seed (numpy's Generator); the score function runs on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Score = Callable[[np.ndarray], tuple[float, float]]  # alpha [K] -> (score, tie-break), higher better


@dataclasses.dataclass
class CEMResult:
  alpha: np.ndarray  # [K] the best member scored
  score: tuple[float, float]
  history: list[tuple[float, float]]  # the best (score, tie-break) after each iteration
  evaluations: int


def cem(score: Score, dim: int, *, population: int = 32, elite_fraction: float = 0.2,
        iterations: int = 50, init_mean: float = 0.5, init_std: float = 0.5,
        min_std: float = 1e-3, seed: int = 0) -> CEMResult:
  if dim <= 0 or population <= 1 or iterations <= 0 or not 0 < elite_fraction <= 1:
    raise ValueError("cem: expected dim > 0, population > 1, iterations > 0, 0 < elite <= 1")
  rng = np.random.default_rng(seed)
  n_elite = max(2, int(round(population * elite_fraction)))
  mean, std = np.full(dim, init_mean), np.full(dim, init_std)
  best_alpha, best = np.full(dim, init_mean), (-np.inf, -np.inf)
  history: list[tuple[float, float]] = []
  for _ in range(iterations):
    members = np.clip(rng.normal(mean, std, (population, dim)), 0.0, 1.0)
    scores = [(float(a), float(b)) for a, b in (score(m) for m in members)]
    order = sorted(range(population), key=lambda i: scores[i], reverse=True)
    if scores[order[0]] > best:
      best, best_alpha = scores[order[0]], members[order[0]].copy()
    elite = members[order[:n_elite]]
    mean, std = elite.mean(axis=0), np.maximum(elite.std(axis=0), min_std)
    history.append(best)
  return CEMResult(best_alpha, best, history, population * iterations)
