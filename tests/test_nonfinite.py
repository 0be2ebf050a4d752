"""Non-finite numbers never reach the state or a checkpoint: the step rejects a non-finite update
(finite gradients can still overflow it), the divergence message names the latest checkpoint that
is finite when read back, and a task that yields no loss tokens while sampled gets a warning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import DEMO, build_step, host_batch, tiny_config
from mtjax import recipes
from mtjax.train import hooks as hooks_lib
from mtjax.train import step as step_lib


def _saved_state(workdir, step):
  return jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(
      workdir / "checkpoints" / str(step) / "state"))


def _finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if x.dtype.kind == "f")


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_all_finite_against_numpy():
  tree = {"a": np.ones((2, 3), np.float32), "b": [np.arange(3), np.float32(2.0)]}
  assert bool(step_lib.all_finite(tree))
  for bad in (np.inf, -np.inf, np.nan):
    a = np.ones((2, 3), np.float32)
    a[1, 2] = bad
    assert not bool(step_lib.all_finite(dict(tree, a=a)))
  assert bool(step_lib.all_finite({"n": np.arange(4)}))  # integer leaves are not checked


def _overflow_after(n):
  """Multiplies every update by inf from the optimizer's (n+1)-th update on: the gradients and the
  objective stay finite, only the update overflows (as a huge learning rate would make it)."""
  return optax.scale_by_schedule(lambda count: jnp.where(count >= n, jnp.inf, 1.0))


def test_step_rejects_an_update_that_overflows(monkeypatch):
  from mtjax.train import optimizer
  make = optimizer.make_optimizer
  monkeypatch.setattr(optimizer, "make_optimizer",
                      lambda *a, **k: (lambda tx, s: (optax.chain(tx, _overflow_after(1)), s))(
                          *make(*a, **k)))
  cfg = tiny_config()
  _, _, state, step, _ = build_step(cfg)
  batch = host_batch(cfg)
  weights, coefs = np.ones(cfg.num_tasks, np.float32), np.zeros(cfg.num_tasks, np.float32)
  state, metrics = step(state, batch, weights, coefs)  # the first update is finite: kept
  assert int(metrics["skipped_steps"]) == 0
  before = jax.device_get(state)
  state, metrics = step(state, batch, weights, coefs)  # this one overflows: rejected
  assert np.isfinite(float(metrics["objective"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(metrics["skipped_steps"]) == 1 and int(metrics["consecutive_skips"]) == 1
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1
  for name in ("params", "opt_state"):  # bitwise the state before the step
    for x, y in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
      np.testing.assert_array_equal(x, y)


def test_overflowing_updates_never_reach_a_checkpoint_and_the_named_one_is_finite(
    tmp_path, monkeypatch):
  from mtjax.train import optimizer
  make = optimizer.make_optimizer
  monkeypatch.setattr(optimizer, "make_optimizer",
                      lambda *a, **k: (lambda tx, s: (optax.chain(tx, _overflow_after(3)), s))(
                          *make(*a, **k)))
  cfg = tiny_config(**{"train.steps": 20, "checkpoint.every": 2, "train.max_consecutive_skips": 3})
  with pytest.raises(recipes.TrainingDiverged) as e:
    recipes.run(cfg, tmp_path, evaluate=False)
  message = str(e.value)
  # Steps 1-3 update; 4, 5, 6 overflow and are skipped; the check at the save of step 6 stops it.
  assert message.startswith("step 6: 3 consecutive steps"), message
  assert f"last good checkpoint: step 4 in {tmp_path / 'checkpoints'}" in message, message
  assert _steps(tmp_path) == [2, 4]
  for s in _steps(tmp_path):
    assert _finite(_saved_state(tmp_path, s)), s
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(_saved_state(tmp_path, 2)["params"]),
      jax.tree.leaves(_saved_state(tmp_path, 4)["params"])))  # step 3 trained


def test_huge_learning_rate_leaves_only_finite_checkpoints(tmp_path, capsys):
  from mtjax import cli
  code = cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", str(tmp_path),
                   "--config.optimizer.lr=1e30", "--config.train.steps=20",
                   "--config.checkpoint.every=2", "--config.train.max_consecutive_skips=3",
                   "--config.train.progress=false"])
  err = capsys.readouterr().err
  assert code == 1, err
  named = int(err.split("last good checkpoint: step ")[1].split()[0])
  assert named == _steps(tmp_path)[-1]
  for s in _steps(tmp_path):
    assert _finite(_saved_state(tmp_path, s)), s


def test_last_good_checkpoint_skips_later_non_finite_ones(tmp_path):
  from mtjax.train import setup as setup_lib
  cfg = tiny_config(**{"train.steps": 4, "checkpoint.every": 2})
  recipes.run(cfg, tmp_path / "run", evaluate=False)
  setup = setup_lib.build(cfg, workdir=tmp_path / "run")  # restores step 4
  ck = setup.checkpointer
  assert ck is not None
  nan = setup.state.replace(params=jax.tree.map(lambda x: x * jnp.nan, setup.state.params))
  ck.save(6, nan, setup.loader_state, setup.config, setup.run_facts)  # as an older mtjax could
  directory = tmp_path / "run" / "checkpoints"
  assert hooks_lib.last_finite_checkpoint(ck) == \
      f"step 4 in {directory} (later: step 6 not finite or unreadable)"
  ck.close()
  # Only non-finite checkpoints: none is good.
  fresh = setup_lib.build(cfg, workdir=tmp_path / "other")
  assert fresh.checkpointer is not None
  fresh.checkpointer.save(2, nan, setup.loader_state, setup.config, setup.run_facts)
  assert hooks_lib.last_finite_checkpoint(fresh.checkpointer).startswith("none (step 2 in ")
  fresh.checkpointer.close()


def test_task_without_loss_tokens_while_sampled_gets_a_warning(tmp_path, capsys):
  # grammar is sampled at 1e-4 (none of its examples lands in 5 small batches), addition at 0.
  cfg = tiny_config(**{"train.steps": 5, "checkpoint.every": 0,
                       "data.mixture": {"reverse": 1.0, "addition": 0.0, "grammar": 1e-4}})
  result = recipes.run(cfg, tmp_path, evaluate=False)
  rows = result.history
  assert all(r["train/grammar/tokens"] == 0 and r["data/grammar/rate"] > 0 for r in rows)
  assert all(r["train/addition/tokens"] == 0 and r["data/addition/rate"] == 0 for r in rows)
  assert [r.get("warn/grammar/no_tokens") for r in rows] == [None, None, 1, 1, 1]
  assert not any(k.startswith(("warn/addition", "warn/reverse")) for r in rows for k in r)
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: task")]
  assert len(warnings) == 1 and "'grammar'" in warnings[0] and "up to step 3" in warnings[0], warnings
  import json
  saved = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r.get("warn/grammar/no_tokens") for r in saved] == [None, None, 1, 1, 1]
