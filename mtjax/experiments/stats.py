"""The statistics a study's directional sentence rests on.

A study names ONE primary comparison before it runs; its paired per-seed differences are tested
with an exact sign-flip permutation test (under the null of no effect each paired difference is
as likely positive as negative, so all 2^n sign patterns are equally likely), and the p-values of
the family the study names (e.g. one per task) are Holm-corrected. A sentence that says "more" or
"less" needs a corrected p below ALPHA; otherwise the report says there is no detectable
difference at this power and gives the smallest effect the design could detect
(`detectable_effect`).

Why not "every seed agrees in sign": with 3 seeds noise alone does that 1 time in 4 (2 x 1/8),
and the smallest one-sided sign-flip p with n seeds is 2^-n (0.125 with 3, 1/1024 with 10).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

ALPHA = 0.05
EXACT_UP_TO = 20  # seeds enumerated exactly (2^20 patterns); beyond, a seeded Monte Carlo
MONTE_CARLO = 100_000
# Two statistics closer than this (relative) count as equal, as scipy.stats.permutation_test does,
# so a pattern whose mean differs from the observed one only by rounding is not lost.
_RTOL = 100 * np.finfo(np.float64).eps


def sign_flip_p(diffs: Sequence[float], alternative: str = "greater") -> float:
  """The exact one- or two-sided p-value of the mean of paired differences under random sign
  flips (scipy.stats.permutation_test(..., permutation_type='samples', n_resamples=np.inf) with
  the mean as statistic gives the same value). alternative: 'greater' (the mean is > 0),
  'less', or 'two-sided'. NaN differences are refused (a missing seed is not a zero)."""
  d = np.asarray(diffs, np.float64)
  if d.ndim != 1 or not len(d):
    raise ValueError("sign_flip_p needs a non-empty list of paired differences")
  if np.isnan(d).any():
    raise ValueError("sign_flip_p: a paired difference is NaN (a missing seed is not a zero)")
  if alternative not in ("greater", "less", "two-sided"):
    raise ValueError(f"alternative must be greater, less or two-sided, not {alternative!r}")
  n = len(d)
  if n <= EXACT_UP_TO:
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
  else:
    rng = np.random.default_rng(0)
    signs = np.vstack([np.ones(n), rng.choice((1.0, -1.0), size=(MONTE_CARLO - 1, n))])
  null = (signs * d).mean(axis=1)
  observed = d.mean()
  tol = _RTOL * max(abs(observed), 1e-300)
  greater = float(np.mean(null >= observed - tol))
  less = float(np.mean(null <= observed + tol))
  if alternative == "greater":
    return greater
  if alternative == "less":
    return less
  return min(1.0, 2.0 * min(greater, less))


def smallest_p(seeds: int, alternative: str = "greater") -> float:
  """The least p-value a sign-flip test on `seeds` paired differences can give (all one sign)."""
  return (2.0 if alternative == "two-sided" else 1.0) * 0.5 ** seeds


def holm(pvalues: Mapping[str, float] | Sequence[float]) -> dict[str, float] | list[float]:
  """Holm's step-down adjusted p-values (family-wise error control, no independence assumed):
  the k-th smallest of m p-values is multiplied by m - k + 1, running maxima keep the order,
  capped at 1. A mapping gives a mapping with the same keys; NaN stays NaN and does not count
  toward m."""
  if isinstance(pvalues, Mapping):
    keys: list[str] | None = list(pvalues)
    values = [float(pvalues[k]) for k in pvalues]
  else:
    keys, values = None, [float(p) for p in pvalues]
  present = [i for i, p in enumerate(values) if not math.isnan(p)]
  m = len(present)
  adjusted = [math.nan] * len(values)
  running = 0.0
  for rank, i in enumerate(sorted(present, key=lambda i: values[i])):
    running = max(running, min(1.0, (m - rank) * values[i]))
    adjusted[i] = running
  if keys is not None:
    return dict(zip(keys, adjusted))
  return adjusted


def detectable_effect(diffs: Sequence[float], family: int = 1, alpha: float = ALPHA,
                      power: float = 0.8) -> float:
  """The smallest mean paired difference this design would call with the given power: the
  normal approximation (z_(1 - alpha / family) + z_power) x sd / sqrt(n), with the sd of the
  observed differences (family: the Holm family's size; its first step tests at alpha / m).
  inf when even a unanimous sign pattern cannot reach alpha / family (too few seeds)."""
  from scipy import stats
  d = np.asarray(diffs, np.float64)
  d = d[~np.isnan(d)]
  n = len(d)
  if n < 2 or smallest_p(n) > alpha / family:
    return math.inf
  sd = float(np.std(d, ddof=1))
  return float((stats.norm.ppf(1 - alpha / family) + stats.norm.ppf(power)) * sd / math.sqrt(n))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One tested directional claim: its paired differences, raw and Holm-corrected p-values."""

  name: str
  diffs: tuple[float, ...]
  p: float
  p_holm: float
  detectable: float
  primary: bool

  @property
  def mean(self) -> float:
    return float(np.mean(self.diffs)) if self.diffs else math.nan

  def significant(self, alpha: float = ALPHA) -> bool:
    return self.p_holm < alpha  # False for NaN (a comparison with a missing seed)

  def direction(self, alpha: float = ALPHA) -> int:
    """+1 / -1 when the corrected test says the mean difference is above / below 0, else 0."""
    if not self.significant(alpha) or self.mean == 0:
      return 0
    return 1 if self.mean > 0 else -1

  def sentence(self, up: str, down: str, alpha: float = ALPHA) -> str:
    """`up`/`down` with its corrected p when significant, else the no-detectable-difference
    sentence with the smallest effect this design could detect."""
    label = "" if self.primary else " (exploratory)"
    if math.isnan(self.p):
      return f"not tested{label} (a seed's value is missing)"
    if self.diffs and all(d == 0 for d in self.diffs):
      return f"equal on every seed{label}"
    if self.significant(alpha) and self.mean != 0:
      claim = up if self.mean > 0 else down
      return f"{claim}{label} (Holm-corrected p = {self.p_holm:.3g}, {len(self.diffs)} seeds)"
    detectable = (f"smallest detectable mean difference {self.detectable:.3g}"
                  if math.isfinite(self.detectable) else
                  f"{len(self.diffs)} seeds cannot reach p < {alpha:g} at all")
    return (f"no detectable difference at this power{label} (Holm-corrected p = "
            f"{self.p_holm:.3g}, {len(self.diffs)} seeds; {detectable})")

  def to_json(self) -> dict[str, object]:
    return {"name": self.name, "diffs": list(self.diffs), "mean": self.mean, "p": self.p,
            "p_holm": self.p_holm, "detectable": self.detectable, "primary": self.primary}

  @classmethod
  def from_json(cls, d: Mapping[str, object]) -> Comparison:
    return cls(str(d["name"]), tuple(float(x) for x in d["diffs"]), float(d["p"]),  # type: ignore[union-attr]
               float(d["p_holm"]), float(d["detectable"]), bool(d["primary"]))  # type: ignore[arg-type]


def compare(family: Mapping[str, Sequence[float]], *, primary: bool = True,
            alternative: str = "two-sided", alpha: float = ALPHA) -> dict[str, Comparison]:
  """Tests each named list of paired differences (one per seed) and Holm-corrects across the
  family. Two-sided by default: a report may say either direction."""
  raw = {k: math.nan if np.isnan(np.asarray(v, np.float64)).any() else sign_flip_p(v, alternative)
         for k, v in family.items()}
  corrected = holm(raw)
  assert isinstance(corrected, dict)
  m = max(1, sum(not math.isnan(p) for p in raw.values()))
  return {k: Comparison(k, tuple(float(x) for x in v), raw[k], corrected[k],
                        detectable_effect(v, m, alpha), primary) for k, v in family.items()}


def compare_named(comparisons: Mapping[str, Mapping[str, Sequence[float]]], primary: str, *,
                  atol: float = 0.0, alpha: float = ALPHA) -> dict[str, dict[str, Comparison]]:
  """A study's whole set of tests: comparison name -> {key (a task, a quantity) -> per-seed paired
  differences}. The primary comparison's keys are one Holm family (the claim the study named
  before it ran); every other comparison's keys together are one exploratory family. |d| <= atol
  counts as 0 (float noise of equal models). Returns the same nesting of Comparisons."""
  if primary not in comparisons:
    raise ValueError(f"primary comparison {primary!r} is not one of {list(comparisons)}")

  def clean(v: Sequence[float]) -> list[float]:
    return [0.0 if abs(x) <= atol else float(x) for x in v]

  first = compare({k: clean(v) for k, v in comparisons[primary].items()}, primary=True,
                  alpha=alpha)
  rest = compare({f"{name}\0{k}": clean(v) for name, family in comparisons.items()
                  if name != primary for k, v in family.items()}, primary=False, alpha=alpha)
  out: dict[str, dict[str, Comparison]] = {primary: first}
  for key, c in rest.items():
    name, _, k = key.partition("\0")
    out.setdefault(name, {})[k] = dataclasses.replace(c, name=k)
  return {name: out[name] for name in comparisons}


def method_note(primary: str, seeds: int, family: int, what: str) -> str:
  """The report's sentence on how its verdicts were tested, with the design's power."""
  least = smallest_p(seeds, "two-sided")
  power = (f"with {seeds} seeds the smallest two-sided p is {least:.3g}, so no verdict can name a "
           "direction at this power" if least * family >= ALPHA or least >= ALPHA else
           f"with {seeds} seeds the smallest two-sided p is {least:.3g} ({least * family:.3g} "
           f"after Holm's first step over {family})")
  return (f"Tests, named before the run: every difference is paired by seed and tested with an "
          f"exact sign-flip permutation test (two-sided). Primary: `{primary}`, Holm-corrected "
          f"across its {family} {what}; every other comparison is exploratory (Holm-corrected "
          f"together). A verdict names a direction only with a corrected p < {ALPHA:g}, and "
          f"otherwise gives the smallest mean difference the design could detect (80% power); "
          f"{power}.")


def plainly(primary: str, verdicts: Mapping[str, tuple[Comparison, str]], *, cannot: str) -> str:
  """A report's first paragraph: what the primary comparison shows ({key: (its Comparison, its
  verdict sentence)}: the directional ones quoted, or that no key is detectably different), the
  design's power, and what the run cannot show."""
  seeds = max((len(c.diffs) for c, _ in verdicts.values()), default=0)
  called = {k: v for k, (c, v) in verdicts.items() if c.direction()}
  if called:
    shown = "; ".join(f"{k}: {v}" for k, v in called.items())
    rest = len(verdicts) - len(called)
    shown += f"; the other {rest}: no detectable difference at this power" if rest else ""
  else:
    shown = f"no detectable difference on any of its {len(verdicts)} at this power"
  least = smallest_p(seeds, "two-sided") if seeds else 1.0
  return (f"**What this run shows.** Primary comparison (named before the run): `{primary}`: "
          f"{shown}. Power: {seeds} seeds, so the smallest two-sided sign-flip p is {least:.3g} "
          f"before Holm's correction over {len(verdicts)}"
          + (" (p < 0.05 is out of reach)" if least * len(verdicts) >= ALPHA else "")
          + f". **What it cannot show**: {cannot}")


def bootstrap_interval(draw: Callable[[np.random.Generator], float], *, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """A percentile interval of the statistic `draw(rng)` computes from one resample (the caller
  resamples whatever is random: seeds, and the held-out examples within each)."""
  rng = np.random.default_rng(seed)
  values = np.array([draw(rng) for _ in range(resamples)], np.float64)
  values = values[~np.isnan(values)]
  if not len(values):
    return math.nan, math.nan
  tail = (1 - level) / 2
  return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))
