"""SVF expert weights against numpy, and the CEM finding a known optimum (issue 20's building
blocks: mtjax.model.svf, mtjax.eval.cem)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.eval.cem import cem
from mtjax.model import svf


def _numpy_expert(w, z):
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u * (s * z)) @ vt * (s.sum() / (s * z).sum())


@pytest.mark.parametrize("shape,in_axes", [((12, 8), 1), ((8, 12), 1), ((8, 2, 4), 1)])
def test_expert_weight_matches_numpy_and_z1_is_identity(shape, in_axes):
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  u, s, vt = svf.decompose(jnp.asarray(w), in_axes)
  r = min(int(np.prod(shape[:in_axes])), int(np.prod(shape[in_axes:])))
  assert s.shape == (r,)
  np.testing.assert_allclose(np.asarray(svf.expert_weight(u, s, vt, jnp.ones(r), shape)), w,
                             atol=1e-5)
  z = jax.nn.sigmoid(svf.init_logits(jax.random.key(1), (r,)))
  got = np.asarray(svf.expert_weight(u, s, vt, z))
  np.testing.assert_allclose(got, _numpy_expert(w.reshape(got.shape), np.asarray(z)), atol=1e-5)
  # The rescaling keeps the sum of singular values.
  np.testing.assert_allclose(np.linalg.svd(got, compute_uv=False).sum(), np.asarray(s).sum(),
                             rtol=1e-5)


def test_stacked_layers_decompose_one_by_one():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 6, 5)).astype(np.float32)  # [layers, in, out]
  u, s, vt = svf.decompose(jnp.asarray(w), stacked=True)
  z = jnp.asarray(rng.uniform(0.2, 1.0, size=(3, 5)), jnp.float32)
  got = np.asarray(svf.expert_weight(u, s, vt, z))
  for layer in range(3):
    np.testing.assert_allclose(got[layer], _numpy_expert(w[layer], np.asarray(z[layer])), atol=1e-5)


def test_compose_is_the_weighted_sum_of_experts():
  zs = jnp.asarray(np.random.default_rng(3).uniform(size=(3, 4, 7)), jnp.float32)
  alpha = jnp.array([0.2, 0.0, 0.7])
  np.testing.assert_allclose(np.asarray(svf.compose(zs, alpha)),
                             0.2 * np.asarray(zs[0]) + 0.7 * np.asarray(zs[2]), atol=1e-6)


def test_cem_finds_the_known_optimum():
  target = np.array([0.8, 0.1, 0.55])
  # Exact match is rare in a continuous space: score by rounding, tie-break by closeness.
  score = lambda a: (-float(np.round(np.abs(a - target).max(), 1)), -float(((a - target) ** 2).sum()))
  result = cem(score, 3, seed=0)
  np.testing.assert_allclose(result.alpha, target, atol=2e-2)
  assert result.evaluations == 32 * 50
  assert all(b >= a for a, b in zip(result.history, result.history[1:]))  # the best never worsens


def test_cem_optimum_on_the_boundary_stays_in_range():
  result = cem(lambda a: (float(a[0] - a[1]), 0.0), 2, seed=1, iterations=30)
  assert 0.0 <= result.alpha.min() and result.alpha.max() <= 1.0
  assert result.alpha[0] > 0.97 and result.alpha[1] < 0.03
