"""The studies' statistics against independent references: scipy's permutation test, a hand
table for Holm (scipy has none), direct enumeration for the sign-flip floor."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mtjax.experiments import stats


def _scipy_p(diffs, alternative):
  res = scipy_stats.permutation_test((np.asarray(diffs),), np.mean, vectorized=False,
                                     permutation_type="samples", n_resamples=np.inf,
                                     alternative=alternative)
  return res.pvalue


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("diffs", [
    [0.3, 0.1, -0.05, 0.2, 0.15, 0.4, -0.1, 0.25, 0.05, 0.3],  # 10 seeds, mostly positive
    [0.2, -0.3, 0.1],  # 3 seeds, mixed
    [0.1, 0.1, 0.1],  # ties in |d|: many patterns share a mean
    [0.0, 0.5, -0.2, 0.7, 0.0, 0.1],  # zeros flip to themselves
])
def test_sign_flip_matches_scipy_permutation_test(diffs, alternative):
  assert stats.sign_flip_p(diffs, alternative) == pytest.approx(_scipy_p(diffs, alternative),
                                                                abs=1e-12)


def test_sign_flip_matches_scipy_on_paired_samples():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=8), rng.normal(size=8) + 0.4
  ref = scipy_stats.permutation_test((x, y), lambda a, b: np.mean(a - b), vectorized=False,
                                     permutation_type="samples", n_resamples=np.inf,
                                     alternative="less").pvalue
  assert stats.sign_flip_p(x - y, "less") == pytest.approx(ref, abs=1e-12)


def test_smallest_p_is_one_unanimous_pattern():
  for n in (3, 10):
    assert stats.sign_flip_p([1.0 + i for i in range(n)], "greater") == stats.smallest_p(n)
  assert stats.smallest_p(3) == 0.125 and stats.smallest_p(10) == 1 / 1024
  # By enumeration: the all-positive pattern is the only one whose mean is the largest.
  n = 10
  means = [np.mean(np.array(s) * np.arange(1, n + 1)) for s in itertools.product((1, -1), repeat=n)]
  assert sum(m >= np.mean(np.arange(1, n + 1)) for m in means) == 1


def test_sign_flip_refuses_missing_seeds():
  with pytest.raises(ValueError, match="NaN"):
    stats.sign_flip_p([0.1, math.nan, 0.2])


def test_holm_against_a_hand_table():
  # p sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> running max 0.06.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  # Capped at 1, keys kept, NaN left out of m: m = 2 here.
  got = stats.holm({"a": 0.6, "b": math.nan, "c": 0.02})
  assert got["a"] == pytest.approx(0.6) and got["c"] == pytest.approx(0.04)
  assert math.isnan(got["b"])
  assert stats.holm([0.7, 0.8]) == pytest.approx([1.0, 1.0])


def test_three_seeds_can_never_be_significant_but_ten_can():
  three = stats.compare({"copy": [0.1, 0.2, 0.3]})["copy"]
  assert three.p == 0.25 and not three.significant()  # two-sided: 2 x 1/8
  assert "no detectable difference" in three.sentence("higher", "lower")
  assert math.isinf(three.detectable)
  ten = stats.compare({"copy": [0.1 + 0.01 * i for i in range(10)],
                       "sort": [0.05, -0.04, 0.02, -0.03, 0.01, 0.0, 0.03, -0.02, 0.04, -0.05]})
  assert ten["copy"].p == pytest.approx(2 / 1024)
  assert ten["copy"].p_holm == pytest.approx(4 / 1024)  # smallest of 2: x2
  assert ten["copy"].sentence("higher", "lower").startswith("higher (Holm-corrected p = 0.0039")
  assert "no detectable difference" in ten["sort"].sentence("higher", "lower")
  # The detectable effect: (z_(1 - 0.05/2) + z_0.8) x sd / sqrt(10), by hand.
  sd = np.std(ten["sort"].diffs, ddof=1)
  assert ten["sort"].detectable == pytest.approx((1.959964 + 0.841621) * sd / math.sqrt(10), rel=1e-5)


def test_bootstrap_interval_covers_the_mean_of_a_known_distribution():
  data = np.random.default_rng(0).normal(2.0, 1.0, size=400)
  low, high = stats.bootstrap_interval(lambda r: float(r.choice(data, len(data)).mean()))
  half = 1.96 * data.std(ddof=1) / math.sqrt(len(data))  # the normal interval, by hand
  assert low == pytest.approx(data.mean() - half, abs=0.02)
  assert high == pytest.approx(data.mean() + half, abs=0.02)


def test_compare_named_holm_families_by_hand():
  """The primary comparison's keys are one Holm family, every other comparison's keys one
  exploratory family; |d| <= atol counts as 0; a NaN seed leaves its test out of the family."""
  up = [0.1 + 0.01 * i for i in range(10)]  # p = 2/1024 each, two-sided
  mixed = [0.05, -0.04, 0.02, -0.03, 0.01, 0.0, 0.03, -0.02, 0.04, -0.05]
  got = stats.compare_named({"a-b": {"copy": up, "sort": mixed},
                             "a-c": {"copy": up, "sort": up, "mean": [math.nan] + up[1:]}},
                            "a-b", atol=1e-9)
  p_mixed = stats.sign_flip_p(mixed, "two-sided")
  # Primary family {copy: 2/1024, sort: p_mixed}: Holm multiplies the smallest by 2.
  assert got["a-b"]["copy"].p_holm == pytest.approx(4 / 1024) and got["a-b"]["copy"].primary
  assert got["a-b"]["sort"].p_holm == pytest.approx(max(4 / 1024, p_mixed))
  # Exploratory family {copy, sort} (mean not tested): both 2/1024, Holm: x2 then running max.
  assert got["a-c"]["copy"].p_holm == pytest.approx(4 / 1024) and not got["a-c"]["copy"].primary
  assert got["a-c"]["sort"].p_holm == pytest.approx(4 / 1024)
  assert math.isnan(got["a-c"]["mean"].p)
  assert got["a-c"]["mean"].sentence("up", "down").startswith("not tested (exploratory)")
  assert "(exploratory)" in got["a-c"]["copy"].sentence("up", "down")
  assert got["a-c"]["copy"].direction() == 1 and got["a-b"]["sort"].direction() == 0
  tied = stats.compare_named({"x": {"t": [1e-12, -1e-12, 0.0]}}, "x", atol=1e-9)["x"]["t"]
  assert tied.sentence("up", "down") == "equal on every seed"
  with pytest.raises(ValueError, match="primary comparison 'z'"):
    stats.compare_named({"x": {"t": up}}, "z")
