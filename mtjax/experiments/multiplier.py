"""Transfer measured per task, with its null: the effective-data multiplier.

At an eval of the joint run, task t's model scores s after the joint run has spent n_t of its
loss tokens on t. A reference run that trains t alone (its own loss tokens on the x axis) would
need N tokens to score s (its curve inverted). M = N / n_t: how much task-t data the joint run's
score is worth, per token of t it saw. No transfer: M = 1; > 1: the other tasks helped t; < 1:
they hurt it.

The reference decides what the number answers. A single-task run gives t the whole batch each
step; the joint run gives it a share r_t of each batch over 1/r_t more steps (the same tokens of
t in more, smaller updates), which alone can put M above 1. A masked-joint reference (the joint
run's batches with only t's loss on) has the joint run's update schedule, so M against it is the
transfer from the other tasks' losses; M against the single-task run is what a practitioner
choosing between one joint run and K single runs gets. A study reports both.

The reference curve is made monotone (isotonic regression, pool-adjacent-violators) and inverted
by linear interpolation. A joint score above the reference's best makes M a lower bound (the
reference would need more than it ran), one at or below its first eval an upper bound; both are
kept as bounds, never dropped or clipped.

The whole-run compute ratio (sum of single-task tokens to target / joint tokens until every task
reached it) has a no-transfer value that depends on the mixture: task t reaches its target after
s_t / r_t joint tokens, so the ratio is sum(s) / max(s_t / r_t): mean/max of s for shares equal
across tasks, 1 for shares proportional to s. `ratio_null` computes it from the measured shares.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

EXACT, LOWER, UPPER = "exact", "lower", "upper"  # M = value, M >= value, M <= value


@dataclasses.dataclass(frozen=True)
class Multiplier:
  """M at one eval of the joint run: `value`, and whether it is the value or a bound."""

  tokens: float  # the joint run's loss tokens of the task so far (n_t)
  score: float
  value: float
  kind: str = EXACT

  def to_json(self) -> dict[str, object]:
    return {"tokens": self.tokens, "score": self.score, "value": self.value, "kind": self.kind}

  def text(self, digits: int = 2) -> str:
    mark = {EXACT: "", LOWER: ">= ", UPPER: "<= "}[self.kind]
    return f"{mark}{self.value:.{digits}f}"


def isotonic(y: Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
  """The non-decreasing least-squares fit to y (pool adjacent violators)."""
  values = [float(v) for v in y]
  w = [1.0] * len(values) if weights is None else [float(v) for v in weights]
  blocks: list[list[float]] = []  # [mean, weight, count]
  for v, wt in zip(values, w):
    blocks.append([v, wt, 1])
    while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
      m2, w2, c2 = blocks.pop()
      m1, w1, c1 = blocks.pop()
      blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
  return np.array([m for m, _, c in blocks for _ in range(int(c))], np.float64)


@dataclasses.dataclass(frozen=True)
class Reference:
  """A task's reference curve: its score against its own loss tokens, made monotone."""

  tokens: np.ndarray
  scores: np.ndarray  # isotonic

  @classmethod
  def from_curve(cls, curve: Sequence[tuple[float, float]]) -> Reference:
    """(tokens, score) points; NaN scores skipped, a repeated x keeps its last value."""
    last = {float(x): float(v) for x, v in sorted(curve, key=lambda p: p[0])}
    points = [(x, v) for x, v in last.items() if not math.isnan(v)]
    if not points:
      raise ValueError("a reference curve needs at least one scored eval")
    xs, ys = zip(*points)
    return cls(np.array(xs, np.float64), isotonic(ys))

  def tokens_to_reach(self, score: float) -> tuple[float, str]:
    """The reference tokens at which the monotone curve first reaches `score`: (value, kind),
    LOWER when the curve never does (it would need more than its last eval), UPPER when its
    first eval already does (somewhere up to that eval)."""
    xs, ys = self.tokens, self.scores
    if score > ys[-1]:
      return float(xs[-1]), LOWER
    if score <= ys[0]:
      return float(xs[0]), UPPER
    k = int(np.argmax(ys >= score))  # the first eval at or above; ys[k - 1] < score
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return float(x0 + (score - y0) / (y1 - y0) * (x1 - x0)), EXACT


def multiplier(reference: Reference, tokens: float, score: float) -> Multiplier:
  """M for one joint eval: the task's loss tokens so far and its score there."""
  if tokens <= 0:
    return Multiplier(tokens, score, math.nan)
  needed, kind = reference.tokens_to_reach(score)
  return Multiplier(float(tokens), float(score), needed / tokens, kind)


def curve(reference: Reference, joint: Sequence[tuple[float, float]]) -> list[Multiplier]:
  """M at every eval of the joint run: (the task's loss tokens so far, score) points, NaN scores
  skipped."""
  return [multiplier(reference, x, s) for x, s in joint if not math.isnan(s)]


def ratio_null(single_tokens: Mapping[str, float], shares: Mapping[str, float],
               density: Mapping[str, float] | None = None) -> float:
  """The whole-run compute ratio under no transfer: sum(s) / max(s_t x d_t / r_t), with s_t each
  task's single-task tokens to target, r_t its share of the joint run's loss tokens (the
  measured shares: the same noisy s_t as the ratio itself, so both carry the bias of a max of
  noisy values) and d_t the single-task run's loss tokens per step over the joint run's (1 when
  omitted: both batches equally dense in loss tokens). NaN when a task has no share or an
  infinite s."""
  tasks = list(single_tokens)
  if not tasks or any(shares.get(t, 0.0) <= 0 for t in tasks):
    return math.nan
  s = np.array([single_tokens[t] for t in tasks], np.float64)
  r = np.array([shares[t] for t in tasks], np.float64)
  d = np.array([(density or {}).get(t, 1.0) for t in tasks], np.float64)
  if not np.isfinite(s).all():
    return math.nan
  return float(s.sum() / np.max(s * d / r))


def loss_token_shares(tokens: Mapping[str, float]) -> dict[str, float]:
  """Each task's share of a run's loss tokens, from its per-task counts."""
  total = float(sum(tokens.values()))
  return {t: (float(v) / total if total else math.nan) for t, v in tokens.items()}


def summarize(values: Sequence[Multiplier]) -> dict[str, object]:
  """Over seeds: the geometric mean of the values (a ratio), how many are bounds of each kind
  (a bound enters as its value, and the summary says so), and the values themselves."""
  finite = [m.value for m in values if math.isfinite(m.value) and m.value > 0]
  geo = float(math.exp(np.mean(np.log(finite)))) if finite else math.nan
  return {"geometric_mean": geo, "values": [m.to_json() for m in values],
          "lower_bounds": sum(m.kind == LOWER for m in values),
          "upper_bounds": sum(m.kind == UPPER for m in values)}


def seed_example_bootstrap(per_seed_scores: Sequence[np.ndarray], tokens: Sequence[float],
                           references: Sequence[Reference], rng: np.random.Generator) -> float:
  """One bootstrap draw of the log-mean multiplier over seeds AND held-out examples: seeds
  resampled with replacement, and within each drawn seed its per-example scores (at the eval
  whose task tokens are `tokens[seed]`) resampled before the reference is inverted."""
  n = len(per_seed_scores)
  logs = []
  for i in rng.integers(0, n, size=n):
    scores = per_seed_scores[i]
    score = float(rng.choice(scores, size=len(scores)).mean())
    m = multiplier(references[i], tokens[i], score)
    if math.isfinite(m.value) and m.value > 0:
      logs.append(math.log(m.value))
  return float(math.exp(np.mean(logs))) if logs else math.nan
