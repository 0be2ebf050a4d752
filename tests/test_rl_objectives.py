"""GRPO and DARLING math against hand computations and a numpy reference."""

import numpy as np
import pytest

from mtjax.rl import objectives as obj


def test_group_advantages_by_hand():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0],   # mean 0.5, sample std sqrt(1/3)
                      [2.0, 2.0, 2.0, 2.0],   # all equal: 0, no NaN
                      [0.1, 0.1, 0.1, 0.1],   # all equal, inexact mean: exactly 0
                      [3.0, 0.0, 0.0, 0.0]])  # mean 0.75, sample std 1.5
  plain = np.asarray(obj.group_advantages(rewards, normalize_std=False))
  np.testing.assert_allclose(plain[0], [0.5, -0.5, -0.5, 0.5], atol=1e-7)
  np.testing.assert_array_equal(plain[1], 0.0)
  np.testing.assert_array_equal(plain[2], 0.0)
  np.testing.assert_allclose(plain[3], [2.25, -0.75, -0.75, -0.75], atol=1e-7)
  normed = np.asarray(obj.group_advantages(rewards, normalize_std=True, eps=0.0))
  s = np.sqrt(1 / 3)
  np.testing.assert_allclose(normed[0], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rtol=1e-6)
  np.testing.assert_array_equal(normed[1:3], 0.0)
  np.testing.assert_allclose(normed[3], [1.5, -0.5, -0.5, -0.5], rtol=1e-6)
  assert np.isfinite(normed).all()
  # eps enters the denominator; a single sample has nothing to compare with.
  np.testing.assert_allclose(np.asarray(obj.group_advantages(rewards[3:], eps=0.5))[0, 0],
                             2.25 / 2.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(obj.group_advantages(np.array([[5.0]]))), 0.0)


def test_darling_diversity_and_rewards_by_hand():
  classes = np.array([[0, 0, 1, 2],   # sizes 2 2 1 1: Div (4-2)/3, 2/3, 1, 1
                      [0, 0, 0, 0],   # all equal: 0 -> floor 0.1
                      [0, 1, 2, 3],   # all distinct: 1
                      [5, 7, 5, 5]])  # sizes 3 1 3 3: Div 1/3, 1, 1/3, 1/3
  np.testing.assert_array_equal(np.asarray(obj.class_sizes(classes)),
                                [[2, 2, 1, 1], [4, 4, 4, 4], [1, 1, 1, 1], [3, 1, 3, 3]])
  div = np.asarray(obj.darling_diversity(classes))
  np.testing.assert_allclose(div, [[2 / 3, 2 / 3, 1, 1], [0.1] * 4, [1] * 4,
                                   [1 / 3, 1, 1 / 3, 1 / 3]], rtol=1e-6)
  rewards = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0],
                      [1.0, 1.0, 0.0, 0.0]])
  r = np.asarray(obj.darling_rewards(rewards, classes))
  np.testing.assert_allclose(r, [[2 / 3, 2 / 3, 1, 0], [0.1] * 4, [1, 0, 1, 0],
                                 [1 / 3, 1, 0, 0]], rtol=1e-6)
  # The mixed group by hand: rewards 2/3, 2/3, 1, 0 -> mean 7/12; no std division by default.
  adv = np.asarray(obj.darling_advantages(rewards, classes))
  np.testing.assert_allclose(adv[0], [2 / 3 - 7 / 12, 2 / 3 - 7 / 12, 1 - 7 / 12, -7 / 12],
                             atol=1e-6)
  np.testing.assert_array_equal(adv[1], 0.0)  # all correct and all equal: no signal
  np.testing.assert_allclose(adv[2], [0.5, -0.5, 0.5, -0.5], atol=1e-6)
  np.testing.assert_allclose(adv[3], [1 / 3 - 1 / 3, 1 - 1 / 3, -1 / 3, -1 / 3], atol=1e-6)
  # With the std division on request, it equals group_advantages of the scaled rewards.
  np.testing.assert_allclose(np.asarray(obj.darling_advantages(rewards, classes, True)),
                             np.asarray(obj.group_advantages(r, True)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(obj.darling_diversity(np.array([[3]]))), 1.0)


def test_equivalence_classes_and_canonical_forms():
  keys = [["a", "b", "a", "c"], ["x", "x", "x", "x"], [1, 2, 3, 4]]
  np.testing.assert_array_equal(obj.equivalence_classes(keys),
                                [[0, 1, 0, 2], [0, 0, 0, 0], [0, 1, 2, 3]])
  with pytest.raises(ValueError, match="same number"):
    obj.equivalence_classes([["a"], ["a", "b"]])
  assert obj.equivalence_classes([]).shape == (0, 0)

  outs = ["  the  cat\n", "the cat", "The cat", "the\tcat "]
  keys = [obj.default_canonical(None, o) for o in outs]
  np.testing.assert_array_equal(obj.equivalence_classes([keys]), [[0, 0, 1, 0]])
  # JSON: key order, spacing, a code fence and an integral float do not make a new class.
  assert (obj.json_canonical(None, '{"b": 1, "a": [2.0]}')
          == obj.json_canonical(None, '```json\n{"a":[2],"b":1}\n```'))
  assert obj.json_canonical(None, '{"a": 1}') != obj.json_canonical(None, '{"a": 2}')
  assert obj.json_canonical(None, "not json ") == "not json"
  # Calls in any order are one answer to function_call, two to function_call_ordered.
  one = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
  two = '[{"name": "g", "arguments": {}}, {"name": "f", "arguments": {"x": 1.0}}]'
  assert obj.calls_canonical(None, one) == obj.calls_canonical(None, two)
  assert obj.ordered_calls_canonical(None, one) != obj.ordered_calls_canonical(None, two)
  hash(obj.calls_canonical(None, one))
  assert obj.numeric_canonical(None, "it is 1,000.0") == obj.numeric_canonical(None, "1000")

  class Scored:
    scorer = "json_equal"

  class Own:
    scorer = "json_equal"
    canonical = staticmethod(lambda ex, out: len(out))

  assert obj.canonical_for(Scored()) is obj.json_canonical
  assert obj.canonical_for(Own())(None, "abc") == 3
  assert obj.canonical_for(object()) is obj.default_canonical


# --- The token-level objectives against numpy ---

def np_clipped(logp, old, adv, mask, eps):
  ratio = np.exp(logp - old)
  a = adv[:, None]
  per_token = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
  # The clip binds where the clipped term is strictly the smaller one.
  binds = (np.clip(ratio, 1 - eps, 1 + eps) * a < ratio * a - 1e-12)
  return (per_token * mask).sum() / mask.sum(), (binds * mask).sum() / mask.sum()


def np_k3(logp, ref, mask):
  x = ref - logp
  return ((np.exp(x) - x - 1) * mask).sum() / mask.sum()


def test_clipped_objective_and_k3_against_numpy():
  rng = np.random.default_rng(0)
  n, length, eps = 6, 9, 0.2
  old = np.log(rng.uniform(0.05, 1.0, (n, length)))
  logp = old + rng.normal(0, 0.3, (n, length))  # ratios well outside [0.8, 1.2] for many tokens
  adv = np.array([1.5, -0.7, 0.0, 2.0, -1.0, 0.3])
  mask = (rng.uniform(size=(n, length)) < 0.7).astype(np.float64)
  mask[0, :] = 0.0  # a row without completion tokens
  surrogate, frac = obj.clipped_objective(logp, old, adv, mask, eps)
  want, want_frac = np_clipped(logp, old, adv, mask, eps)
  np.testing.assert_allclose(float(surrogate), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(frac), want_frac, rtol=1e-6)
  assert 0.1 < float(frac) < 0.9  # the clip binds for some tokens and not for others

  # On policy (ratio 1) nothing is clipped and the surrogate is the mean advantage per token.
  s0, f0 = obj.clipped_objective(old, old, adv, mask, eps)
  np.testing.assert_allclose(float(s0), (adv[:, None] * mask).sum() / mask.sum(), rtol=1e-6)
  assert float(f0) == 0.0

  ref = old + rng.normal(0, 0.5, (n, length))
  np.testing.assert_allclose(float(obj.kl_k3(logp, ref, mask)), np_k3(logp, ref, mask),
                             rtol=1e-5)
  assert float(obj.kl_k3(logp, logp, mask)) == 0.0
  assert (np.asarray(obj.kl_k3_per_token(logp, ref)) >= 0).all()
  # An empty mask gives 0, not NaN.
  assert float(obj.kl_k3(logp, ref, np.zeros_like(mask))) == 0.0
  assert float(obj.clipped_objective(logp, old, adv, np.zeros_like(mask), eps)[0]) == 0.0


def test_clip_binds_by_hand():
  # One token each: A > 0 with ratio 1.5 (clipped at 1.2), A < 0 with ratio 0.5 (clipped at 0.8),
  # A > 0 with ratio 0.5 (the unclipped term is smaller: not clipped), A < 0 with ratio 1.5 (not).
  ratio = np.array([[1.5], [0.5], [0.5], [1.5]])
  adv = np.array([2.0, -2.0, 2.0, -2.0])
  per_token, binds = obj.clipped_surrogate(np.log(ratio), np.zeros_like(ratio), adv, 0.2)
  np.testing.assert_allclose(np.asarray(per_token)[:, 0], [2.4, -1.6, 1.0, -3.0], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(binds)[:, 0], [True, True, False, False])
  surrogate, frac = obj.clipped_objective(np.log(ratio), np.zeros_like(ratio), adv,
                                          np.ones_like(ratio), 0.2)
  np.testing.assert_allclose(float(surrogate), (2.4 - 1.6 + 1.0 - 3.0) / 4, rtol=1e-6)
  assert float(frac) == 0.5
