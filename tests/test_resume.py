"""Re-running in the same workdir resumes from the latest checkpoint with the same result."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mtjax import recipes
from mtjax.errors import BadInputError


@pytest.mark.multidevice
def test_resume_matches_straight_run(tmp_path):
  # decay_steps fixed, so the learning-rate schedule does not depend on train.steps.
  cfg = tiny_config(**{"train.steps": 8, "optimizer.decay_steps": 8, "checkpoint.every": 2,
                       "mesh.fsdp": 8})
  straight = recipes.run(cfg, tmp_path / "a")
  first = recipes.run(cfg.replace(**{"train.steps": 5}), tmp_path / "b")
  assert int(first.state.step) == 5
  second = recipes.run(cfg, tmp_path / "b")  # resumes from step 5 (the end checkpoint)
  assert int(second.state.step) == 8 and [r["step"] for r in second.history] == [6, 7, 8]
  a = [r["train/loss"] for r in straight.history]
  b = [json.loads(l)["train/loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert b == a  # same process, same devices: bitwise
  for x, y in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert second.compiles == 1


def test_resume_with_other_model_is_refused(tmp_path):
  cfg = tiny_config(**{"train.steps": 2})
  recipes.run(cfg, tmp_path)
  with pytest.raises(BadInputError, match="model"):
    recipes.run(cfg.replace(**{"model.d_model": 64}), tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # nothing lost


def _inject_nan(monkeypatch, bad_calls):
  """Wraps the jitted step so that on the given call numbers the loss weights are NaN."""
  from mtjax.train import step as step_lib
  original = step_lib.jit_step

  def jit_step(*a, **k):
    fn = original(*a, **k)
    calls = {"n": 0}

    def step(state, batch, weights, coefs):
      calls["n"] += 1
      if bad_calls(calls["n"]):
        weights = weights * np.float32("nan")
      return fn(state, batch, weights, coefs)
    return step
  monkeypatch.setattr(step_lib, "jit_step", jit_step)


def test_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
  _inject_nan(monkeypatch, lambda n: n == 3)
  result = recipes.run(tiny_config(**{"train.steps": 6}), tmp_path)
  skipped = [r["train/skipped_steps"] for r in result.history]
  assert skipped == [0, 0, 1, 1, 1, 1]
  assert np.isnan(result.history[2]["train/loss"]) and np.isfinite(result.history[3]["train/loss"])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
  assert result.compiles == 1


def test_nan_every_step_stops_with_exit_1_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
  from conftest import DEMO
  from mtjax import cli
  _inject_nan(monkeypatch, lambda n: n > 4)
  code = cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", str(tmp_path),
                   "--config.train.steps=20", "--config.checkpoint.every=2",
                   "--config.train.max_consecutive_skips=3", "--config.train.progress=false"])
  err = capsys.readouterr().err
  assert code == 1
  assert "step 7: 3 consecutive steps" in err and "last good checkpoint: step 6" in err, err
  # The checkpoints are complete and finite; step 6 holds the same parameters as step 4.
  from mtjax.train.checkpoint import Checkpointer
  cfg = tiny_config()
  ck = Checkpointer(tmp_path, cfg.checkpoint)
  assert ck.all_steps()[-1] == 6
  p4 = ocp_params(tmp_path, 4)
  p6 = ocp_params(tmp_path, 6)
  for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p6)):
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
  ck.close()


def ocp_params(workdir, step):
  import orbax.checkpoint as ocp
  return jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(
      workdir / "checkpoints" / str(step) / "state")["params"])


@pytest.mark.multidevice
def test_elastic_restore_from_8_devices_onto_4(tmp_path):
  base = {"train.steps": 4, "optimizer.decay_steps": 4, "checkpoint.every": 3}
  cfg8 = tiny_config(**base, **{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1})
  cfg4 = tiny_config(**base, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  straight = recipes.run(cfg8, tmp_path / "straight")  # the reference: steps 1-4 on 8 devices
  first = recipes.run(cfg8.replace(**{"train.steps": 3}), tmp_path / "elastic")
  saved = jax.device_get(first.state.params)
  # Restore onto 4 devices with another mesh: identical parameters, new shardings.
  from mtjax.model import ModelSpec
  from mtjax.parallel.mesh import make_mesh
  from mtjax.train import optimizer, state as state_lib
  from mtjax.train.checkpoint import Checkpointer
  mesh4 = make_mesh(cfg4.mesh, jax.devices()[:4])
  tx, _ = optimizer.make_optimizer(cfg4.optimizer, 4)
  from mtjax.data import tokenizer as tokenizer_lib
  vocab = tokenizer_lib.get(cfg4.data.tokenizer).vocab_size
  _, like, _ = state_lib.init_state(mesh4, ModelSpec.from_config(cfg4.model, vocab, "float32"), tx, 0)
  ck = Checkpointer(tmp_path / "elastic", cfg4.checkpoint)
  restored, _ = ck.restore(3, like)
  ck.close()
  gate = restored.params["layers"]["mlp"]["gate"]  # [layers, embed, mlp]
  assert len(gate.sharding.device_set) == 4 and gate.sharding.spec[1] == "fsdp"
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored.params))):
    np.testing.assert_array_equal(a, b)
  # And the next step, on the 4-device mesh, matches the 8-device run's step 4.
  second = recipes.run(cfg4, tmp_path / "elastic", devices=jax.devices()[:4])
  assert [r["step"] for r in second.history] == [4]
  np.testing.assert_allclose(second.history[0]["train/loss"], straight.history[3]["train/loss"],
                             rtol=1e-5)


def test_corrupt_checkpoint_named_and_resume_from_earlier(tmp_path, capsys):
  from conftest import DEMO
  from mtjax import cli
  args = ["train", "--config", f"{DEMO}:tiny", "--workdir", str(tmp_path),
          "--config.checkpoint.every=2", "--config.train.progress=false",
          "--config.optimizer.decay_steps=8"]
  assert cli.main(args + ["--config.train.steps=6"]) == 0
  for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")  # truncated on disk
  capsys.readouterr()
  assert cli.main(args + ["--config.train.steps=8"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {tmp_path / 'checkpoints' / '6'}") and "--resume_from 4" in err, err
  assert len(err.splitlines()) == 1
  assert cli.main(args + ["--config.train.steps=8", "--resume_from", "4"]) == 0
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 9))
  abandoned = list((tmp_path / "abandoned_checkpoints").glob("*/6"))
  assert len(abandoned) == 1  # moved aside, not deleted
  assert list(tmp_path.glob("metrics.after-4.*.jsonl"))  # the abandoned rows, kept
  assert cli.main(args + ["--config.train.steps=8", "--resume_from", "5"]) == 2
  assert "no checkpoint at step 5" in capsys.readouterr().err


def test_retention_keeps_latest_and_best(tmp_path):
  cfg = tiny_config(**{"train.steps": 8, "checkpoint.every": 1, "checkpoint.keep": 2,
                       "checkpoint.best_metric": "train/reverse/accuracy",
                       "checkpoint.best_mode": "max", "checkpoint.keep_best": 1})
  result = recipes.run(cfg, tmp_path)
  acc = {r["step"]: r["train/reverse/accuracy"] for r in result.history}
  best = max(acc, key=lambda s: (acc[s], s))
  from mtjax.train.checkpoint import Checkpointer
  ck = Checkpointer(tmp_path, cfg.checkpoint)
  kept = set(ck.all_steps())
  ck.close()
  assert {7, 8} <= kept and best in kept
  assert kept <= {7, 8, best} | {s for s in acc if acc[s] == acc[best]}


def test_safe_change_on_resume_is_reported(tmp_path, capsys):
  cfg = tiny_config(**{"train.steps": 2})
  recipes.run(cfg, tmp_path)
  capsys.readouterr()
  result = recipes.run(cfg.replace(**{"train.steps": 3, "train.log_every": 3}), tmp_path)
  err = capsys.readouterr().err
  assert "resumed from step 2" in err and "train.log_every 1 -> 3" in err, err
  assert int(result.state.step) == 3


def test_lr_schedule_length_is_fixed_at_first_start(tmp_path):
  cfg = tiny_config(**{"train.steps": 4, "optimizer.warmup_steps": 1, "optimizer.lr": 0.01,
                       "optimizer.min_lr_ratio": 0.1})
  first = recipes.run(cfg, tmp_path)
  longer = recipes.run(cfg.replace(**{"train.steps": 7}), tmp_path)
  from mtjax.train import optimizer
  schedule = optimizer.lr_schedule(cfg.optimizer, 4)  # the length of the FIRST start
  lrs = [r["train/lr"] for r in first.history + longer.history]
  np.testing.assert_allclose(lrs, [float(schedule(s)) for s in range(7)], rtol=1e-6)
  assert lrs[-1] == pytest.approx(0.001)  # stays at the end value: the schedule was not stretched


def test_format2_per_layer_checkpoint_migrates_to_stacked_layers(tmp_path):
  # tests/data/format2_run was written by mtjax before the layers were stacked (format 2: one
  # subtree per layer; see tests/data/README.md). Today's restore stacks them: every layer's
  # parameters and Adam moments equal the saved per-layer arrays (read raw by Orbax here), and
  # the run resumes from there with one compile.
  import shutil
  import orbax.checkpoint as ocp
  from pathlib import Path
  from mtjax import config as config_lib
  from mtjax.train import setup as setup_lib
  from mtjax.train.optimizer import param_path
  work = tmp_path / "run"
  shutil.copytree(Path(__file__).parent / "data" / "format2_run", work)
  raw = ocp.CheckpointManager(work / "checkpoints", item_names=("state",)).restore(
      2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  saved = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(raw)[0]}
  assert "params/layers/1/attn/q" in saved and "params/layers/attn/q" not in saved
  cfg = config_lib.from_dict(json.loads((work / "config.json").read_text()))
  run = setup_lib.from_workdir(work, 2)
  state = run.state
  stacked = {param_path(p): np.asarray(x)
             for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  layer_keys = [k for k in stacked if "/layers/" in f"/{k}"]
  assert any(k.startswith("opt_state") for k in layer_keys) and "params/layers/attn/q" in layer_keys
  for key in layer_keys:
    head, _, tail = key.partition("layers/")
    for i in range(cfg.model.num_layers):
      np.testing.assert_array_equal(stacked[key][i], saved[f"{head}layers/{i}/{tail}"])
  np.testing.assert_array_equal(stacked["params/token_embed"], saved["params/token_embed"])
  assert int(state.step) == 2
  resumed = recipes.run(cfg.replace(**{"train.steps": 4}), work)
  assert int(resumed.state.step) == 4 and resumed.compiles == 1
  assert [r["step"] for r in resumed.history] == [3, 4]
