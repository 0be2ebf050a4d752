"""The effective-data multiplier and the compute ratio's null, on synthetic curves whose answer
is known by construction."""

import math

import numpy as np
import pytest

from mtjax.experiments import multiplier as mx
from mtjax.experiments import stats


def f(n):  # a saturating learning curve: score after n tokens of the task
  return 1.0 - np.exp(-np.asarray(n, np.float64) / 1000.0)


GRID = np.arange(100, 5001, 100, dtype=np.float64)
REF = mx.Reference.from_curve(list(zip(GRID, f(GRID))))


def test_no_transfer_gives_one():
  for n in (150.0, 500.0, 2450.0):
    m = mx.multiplier(REF, n, float(f(n)))
    assert m.kind == mx.EXACT
    assert m.value == pytest.approx(1.0, abs=0.01)  # linear interpolation of a concave curve
  exact = mx.multiplier(REF, 700.0, float(f(700.0)))  # on a grid point: exact
  assert exact.value == pytest.approx(1.0, abs=1e-12)


def test_a_known_twofold_transfer_gives_two():
  # The joint model scores after n tokens of t what the reference scores after 2n.
  for n in (100.0, 400.0, 1200.0, 2500.0):
    m = mx.multiplier(REF, n, float(f(2 * n)))
    assert (m.kind, m.value) == (mx.EXACT, pytest.approx(2.0, abs=1e-12))


def test_censoring_keeps_bounds():
  above = mx.multiplier(REF, 1000.0, 0.999)  # above the reference's best (f(5000) = 0.9933)
  assert (above.kind, above.value, above.text()) == (mx.LOWER, 5.0, ">= 5.00")
  below = mx.multiplier(REF, 1000.0, 0.01)  # at or below its first eval (f(100) = 0.095)
  assert (below.kind, below.value, below.text()) == (mx.UPPER, 0.1, "<= 0.10")
  s = mx.summarize([above, below, mx.multiplier(REF, 500.0, float(f(1000.0)))])
  assert (s["lower_bounds"], s["upper_bounds"]) == (1, 1)
  assert s["geometric_mean"] == pytest.approx((5.0 * 0.1 * 2.0) ** (1 / 3))


def test_isotonic_pools_adjacent_violators():
  np.testing.assert_allclose(mx.isotonic([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
  np.testing.assert_allclose(mx.isotonic([3, 2, 1]), [2, 2, 2])
  np.testing.assert_allclose(mx.isotonic([0.1, 0.5, 0.4, 0.3, 0.9]), [0.1, 0.4, 0.4, 0.4, 0.9])
  # A noisy reference: the dip is pooled, so inversion stays well defined.
  ref = mx.Reference.from_curve([(100, 0.2), (200, 0.5), (300, 0.4), (400, 0.8)])
  np.testing.assert_allclose(ref.scores, [0.2, 0.45, 0.45, 0.8])
  assert ref.tokens_to_reach(0.45) == (200.0, mx.EXACT)
  assert ref.tokens_to_reach(0.625) == pytest.approx((350.0, mx.EXACT))


def test_no_transfer_interval_over_seeds_and_examples_covers_one():
  rng = np.random.default_rng(0)
  seeds, examples, n = 10, 1000, 800.0
  refs, scores = [], []
  for _ in range(seeds):  # each seed: its own noisy reference and a joint run without transfer
    curve = [(x, rng.binomial(examples, f(x)) / examples) for x in GRID]
    refs.append(mx.Reference.from_curve(curve))
    scores.append(rng.binomial(1, f(n), size=examples).astype(np.float64))
  low, high = stats.bootstrap_interval(
      lambda r: mx.seed_example_bootstrap(scores, [n] * seeds, refs, r), resamples=400)
  assert low < 1.0 < high
  # And a twofold transfer's interval excludes 1.
  twice = [rng.binomial(1, f(2 * n), size=examples).astype(np.float64) for _ in range(seeds)]
  low2, high2 = stats.bootstrap_interval(
      lambda r: mx.seed_example_bootstrap(twice, [n] * seeds, refs, r), resamples=400)
  assert 1.0 < low2 < 2.0 < high2


def test_ratio_null_for_uniform_and_proportional_mixtures():
  s = {"copy": 1000.0, "reverse": 3000.0, "grammar": 8000.0}
  uniform = {t: 1 / 3 for t in s}
  # sum(s) / max(s_t / r_t) = 12000 / (8000 x 3) = 0.5 = mean / max.
  assert mx.ratio_null(s, uniform) == pytest.approx(np.mean(list(s.values())) / 8000.0)
  proportional = mx.loss_token_shares(s)
  assert mx.ratio_null(s, proportional) == pytest.approx(1.0)
  # The figures: copy/reverse/sort at ~10.5% and grammar/template at ~34% of loss tokens.
  shares = mx.loss_token_shares({"copy": 10.5, "reverse": 10.5, "sort": 11, "grammar": 34,
                                 "template": 34})
  equal = {t: 1000.0 for t in shares}
  assert mx.ratio_null(equal, shares) == pytest.approx(5000 * 0.105 / 1000)
  assert math.isnan(mx.ratio_null(s, {"copy": 0.5, "reverse": 0.5}))
  assert math.isnan(mx.ratio_null({"a": math.inf, "b": 1.0}, {"a": 0.5, "b": 0.5}))
