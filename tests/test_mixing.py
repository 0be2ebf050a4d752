"""Online data mixing (data.mixing.method=odm, mtjax.train.mixing): ODM's EXP3 rule, its rates in
a real run, and a resume at a step between two decisions that decides the same rates."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mtjax import recipes
from mtjax.errors import BadInputError
from mtjax.train import mixing


def reference_odm(losses, observed, alpha):
  """Algorithm 1 of Albalak et al. 2023 (arXiv 2312.02406), transcribed in plain Python: for
  t = 1, 2, ...: eps_t = min(1/K, sqrt(ln K / (K t))); pi = (1 - K eps_t) softmax(eps_{t-1} R)
  + eps_t; observe L under pi; R_i <- alpha R_i + (1 - alpha) L_i / pi_i (observed arms only).
  Returns every decision's pi and the rewards after it."""
  k = len(losses[0])
  rewards = [0.0] * k
  eps_prev = 1.0 / k
  out = []
  for t, (loss, seen) in enumerate(zip(losses, observed), start=1):
    eps = min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
    exps = [math.exp(eps_prev * r) for r in rewards]
    pi = [(1 - k * eps) * e / sum(exps) + eps for e in exps]
    rewards = [alpha * r + (1 - alpha) * l / p if s else r
               for r, l, p, s in zip(rewards, loss, pi, seen)]
    out.append((pi, list(rewards)))
    eps_prev = eps
  return out


def test_rule_matches_algorithm_1():
  # First decision, K = 3, R = 0: uniform (eps_1 = 1/3, so no weight is left on the softmax).
  np.testing.assert_allclose(mixing.odm_rates([0.0, 0.0, 0.0], 1), [1 / 3] * 3, rtol=0, atol=1e-15)
  assert mixing.exploration(0, 3) == 1 / 3 and mixing.exploration(3, 3) == 1 / 3
  assert mixing.exploration(4, 3) == pytest.approx(math.sqrt(math.log(3) / 12))  # below 1/3
  # K = 2, t = 2, R = (1, 0): (1 - 2 eps_2) softmax(R / 2) + eps_2, eps_2 = sqrt(ln 2 / 4).
  eps2 = math.sqrt(math.log(2) / 4)
  first = math.exp(0.5) / (math.exp(0.5) + 1)
  np.testing.assert_allclose(mixing.odm_rates([1.0, 0.0], 2),
                             [(1 - 2 * eps2) * first + eps2, (1 - 2 * eps2) * (1 - first) + eps2])
  # Several decisions against the transcription, with arms unobserved now and then.
  rng = np.random.default_rng(0)
  for k in (2, 3, 5):
    losses = rng.uniform(0.5, 8.0, size=(40, k)).tolist()
    observed = (rng.uniform(size=(40, k)) > 0.2).tolist()
    rewards = np.zeros(k)
    for t, (pi_ref, rewards_ref) in enumerate(reference_odm(losses, observed, 0.9), start=1):
      pi = mixing.odm_rates(rewards, t)
      np.testing.assert_allclose(pi, pi_ref, rtol=1e-12)
      assert pi.sum() == pytest.approx(1.0) and (pi > 0).all()
      rewards = mixing.odm_update(rewards, losses[t - 1], pi, observed[t - 1], 0.9)
      np.testing.assert_allclose(rewards, rewards_ref, rtol=1e-12)
    assert not np.allclose(pi, 1 / k)  # the rewards moved the rates by the end


def test_loader_carries_and_restores_the_mixing_state():
  from mtjax.data.loader import MixtureLoader
  cfg = tiny_config()
  loader = MixtureLoader.from_config(cfg, prefetch=2)
  try:
    next(loader)
    loader.set_mixing({"t": 1, "x": [0.5]})
    for _ in range(3):  # the producer thread's states replace the state: mixing stays
      next(loader)
    state = json.loads(json.dumps(loader.state))
  finally:
    loader.close()
  assert state["mixing"] == {"t": 1, "x": [0.5]} and state["step"] == 4
  resumed = MixtureLoader.from_config(cfg, prefetch=0, state=state)
  assert resumed.state["mixing"] == {"t": 1, "x": [0.5]}
  next(resumed)
  assert resumed.state["mixing"] == {"t": 1, "x": [0.5]}
  with pytest.raises(BadInputError, match="'mixing' is a list, not a mapping"):
    MixtureLoader.from_config(cfg, prefetch=0, state=dict(state, mixing=[1]))


def odm_config(**dotted):
  return tiny_config(**{"data.mixing.method": "odm", "data.mixing.every": 2, **dotted})


def loader_item(workdir, step):
  return json.loads((workdir / "checkpoints" / str(step) / "loader" / "metadata").read_text())


def replay(rows, arms, names, every, alpha, lag):
  """The rates each decision feeds back, recomputed from the logged rows alone (per-step
  per-task loss and tokens at train.log_every=1, the rates used) with the transcription."""
  k = len(arms)
  rewards, eps_prev, sums, decisions = [0.0] * k, 1.0 / k, None, []
  for row in rows:
    if sums is None:
      sums = {"loss": [0.0] * k, "tokens": [0.0] * k, "rate": [0.0] * k, "steps": 0}
    for i, n in enumerate(arms):
      tokens = row[f"train/{n}/tokens"]
      if tokens > 0:
        sums["loss"][i] += row[f"train/{n}/loss"] * tokens
        sums["tokens"][i] += tokens
      sums["rate"][i] += row[f"data/{n}/rate"]
    sums["steps"] += 1
    if row["step"] % every == 0:
      t = len(decisions) + 1
      for i in range(k):
        if sums["tokens"][i] > 0:
          pi = sums["rate"][i] / sums["steps"]
          rewards[i] = alpha * rewards[i] + (1 - alpha) * sums["loss"][i] / sums["tokens"][i] / pi
      eps = min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
      exps = [math.exp(eps_prev * r) for r in rewards]
      pi = dict(zip(arms, [(1 - k * eps) * e / sum(exps) + eps for e in exps]))
      decisions.append([row["step"] + lag, [pi.get(n, 0.0) for n in names]])
      eps_prev, sums = eps, None
  return decisions


def test_odm_run_changes_rates_from_the_losses(tmp_path):
  cfg = odm_config(**{"train.steps": 12,
                      "data.mixture": {"reverse": 1.0, "addition": 3.0, "grammar": 1.0}})
  result = recipes.run(cfg, tmp_path)
  names = cfg.data.tasks
  assert result.compiles == 1
  rates = np.array([[row[f"data/{n}/rate"] for n in names] for row in result.history])
  np.testing.assert_allclose(rates.sum(axis=1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(rates[0], [0.2, 0.6, 0.2])  # the configured rates until the lag
  lag = cfg.data.feedback_lag
  # Decisions after steps 2, 4, 6, ...: t = 1..3 are uniform (eps_t = 1/3), t = 4 (after step 8)
  # reaches the batches from step 8 + lag (row 8 + lag + 1) and follows the losses.
  np.testing.assert_allclose(rates[2 + lag], [1 / 3] * 3, rtol=1e-12)
  assert not np.allclose(rates[8 + lag], 1 / 3)
  state = loader_item(tmp_path, 12)
  feedback = state["feedback"]
  assert [s for s, _ in feedback] == [d + lag for d in (2, 4, 6, 8, 10, 12)]
  # The rows show the rates used: each decision's from its step on (batch index = row - 1).
  for effective, vector in feedback:
    if effective < 12:
      np.testing.assert_allclose(rates[effective], vector, rtol=1e-12)
  # And every decision is the rule applied to the logged losses, tokens and rates.
  expected = replay(result.history, list(names), names, 2, cfg.data.mixing.smoothing, lag)
  for (s, v), (s_ref, v_ref) in zip(feedback, expected, strict=True):
    assert s == s_ref
    np.testing.assert_allclose(v, v_ref, rtol=1e-9)
  assert state["mixing"]["t"] == 6 and state["mixing"]["window"]["steps"] == 0


def test_resume_between_decisions_matches_straight_run(tmp_path):
  # grammar at rate 0 is no arm: it stays at 0. decay_steps fixed: the LR does not depend on
  # train.steps. The straight run saves only at its end; the interrupted one saves at 3 and 5
  # (both between decisions, every=2) and resumes from 5.
  cfg = odm_config(**{"train.steps": 10, "optimizer.decay_steps": 10, "checkpoint.every": 0,
                      "data.mixture": {"reverse": 1.0, "addition": 3.0, "grammar": 0.0}})
  straight = recipes.run(cfg, tmp_path / "a")
  first = recipes.run(cfg.replace(**{"train.steps": 5, "checkpoint.every": 3}), tmp_path / "b")
  assert int(first.state.step) == 5
  mid = loader_item(tmp_path / "b", 5)["mixing"]
  assert mid["step"] == 5 and mid["t"] == 2 and mid["window"]["steps"] == 1  # step 5, held
  second = recipes.run(cfg, tmp_path / "b")
  assert [r["step"] for r in second.history] == list(range(6, 11))
  names = cfg.data.tasks
  rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  keys = ["train/loss"] + [f"{p}/{n}/{m}" for n in names for p, m in
                           (("data", "rate"), ("train", "tokens"))]
  assert [[r[k] for k in keys] for r in rows_b] == [[r[k] for k in keys] for r in straight.history]
  assert all(r["data/grammar/rate"] == 0 for r in straight.history)
  rates = [r["data/reverse/rate"] for r in straight.history]
  assert rates[0] == 0.25 and rates[5] == 0.5 and rates[7] != 0.5 and rates[9] != rates[7]
  # The decision after step 6 (window: step 5 from the checkpoint, step 6 after the resume)
  # reaches step 10's batch: the same loader state, bandit included, and the same parameters.
  assert loader_item(tmp_path / "b", 10) == loader_item(tmp_path / "a", 10)
  for x, y in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert second.compiles == 1
