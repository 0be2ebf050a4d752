"""The hook-driven loop: generic over step and batch source, logging off the critical path, feedback
that applies data.feedback_lag steps later and survives a resume, checkpoint format migration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from mtjax import recipes
from mtjax.errors import BadInputError
from mtjax.train import hooks as hooks_lib
from mtjax.train.batches import Batch
from mtjax.train import loop as loop_lib
from mtjax.train import setup as setup_lib


class FakeSource:
  """A batch source that reads the state (as on-policy sampling would) and makes no arrays."""

  def __init__(self, events):
    self.events, self.state = events, {"step": 0}

  def next(self, state):
    self.events.append(("batch", int(state.step)))
    self.state = {"step": self.state["step"] + 1}
    return Batch(arrays={}, tokens=7, info={"data/packing_efficiency": 1.0})

  def set_rates(self, rates):
    return 0

  def close(self):
    pass


def test_loop_is_generic_and_reads_metrics_one_step_late(tmp_path, monkeypatch):
  cfg = tiny_config(**{"train.steps": 5, "train.log_every": 2})
  setup = setup_lib.build(cfg, workdir=tmp_path)
  names = setup.config.data.tasks
  events = []

  def fake_step(state, batch, weights, coefs):
    done = int(state.step) + 1
    events.append(("dispatch", done))
    per_task = {k: jnp.full((len(names),), float(done)) for k in ("loss", "entropy", "accuracy", "tokens")}
    metrics = {"objective": jnp.float32(done), "grad_norm": jnp.float32(1), "lr": jnp.float32(0),
               "skipped_steps": jnp.int32(0), "consecutive_skips": jnp.int32(0),
               "per_task": per_task, "done": done}
    return state.replace(step=state.step + 1), metrics

  real_get = jax.device_get

  def recording_get(tree):
    if isinstance(tree, dict) and "done" in tree:
      events.append(("fetch", tree["done"]))
    return real_get(tree)

  monkeypatch.setattr(jax, "device_get", recording_get)
  log = hooks_lib.LogHook(cfg.train.log_every, cfg.train.max_consecutive_skips)
  loop = loop_lib.Loop(setup, tmp_path, fake_step, FakeSource(events),
                       [log, hooks_lib.CheckpointHook(0, log)])
  loop.run()

  assert [r["step"] for r in loop.history] == [2, 4, 5]  # every log_every and the last step
  assert [r["train/loss"] for r in loop.history] == [2.0, 4.0, 5.0]
  assert [e for e in events if e[0] == "batch"] == [("batch", s) for s in range(5)]  # saw the state
  order = {e: i for i, e in enumerate(events)}
  for logged in (2, 4):  # fetched only after the next step was dispatched: no stall
    assert order[("fetch", logged)] > order[("dispatch", logged + 1)]
  assert ("fetch", 1) not in order and ("fetch", 3) not in order  # one sync per log interval
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 5]
  assert (tmp_path / "checkpoints" / "5").is_dir()  # the final save


class FeedbackHook(hooks_lib.Hook):
  """Once `at` steps are done: reverse's loss weight 0 and grammar's sampling rate 0."""

  def __init__(self, at):
    self.at, self.effective = at, None

  def after_step(self, loop, out):
    if out.done == self.at:
      self.effective = loop.controls.set(out.done, loss_weights={"reverse": 0.0})
      assert loop.source.set_rates({"reverse": 1.0, "addition": 1.0, "grammar": 0.0}) == self.effective


def test_feedback_applies_after_the_lag_and_survives_resume(tmp_path):
  cfg = tiny_config(**{"train.steps": 10, "checkpoint.every": 0, "optimizer.decay_steps": 10})
  lag = cfg.data.feedback_lag
  hook = FeedbackHook(at=4)
  straight = recipes.run(cfg, tmp_path / "straight", extra_hooks=[hook], evaluate=False)
  assert hook.effective == 4 + lag
  weight = {r["step"] - 1: r["train/reverse/weight"] for r in straight.history}  # by step index
  rate = {r["step"] - 1: r["data/grammar/rate"] for r in straight.history}
  assert all(weight[s] == 1.0 and rate[s] > 0 for s in range(hook.effective))
  assert all(weight[s] == 0.0 and rate[s] == 0.0 for s in range(hook.effective, 10))

  # Decided at step 4, saved at step 6 while still pending, resumed without the hook: same run.
  first = recipes.run(cfg.replace(**{"train.steps": 6}), tmp_path / "resumed",
                         extra_hooks=[FeedbackHook(at=4)], evaluate=False)
  assert all(r["train/reverse/weight"] == 1.0 for r in first.history)
  resumed = recipes.run(cfg, tmp_path / "resumed", evaluate=False)
  assert [r["train/loss"] for r in first.history + resumed.history] == \
      [r["train/loss"] for r in straight.history]
  assert [r["train/reverse/weight"] for r in resumed.history] == [1.0, 0.0, 0.0, 0.0]  # from 7


def _as_format_1(src, dst):
  """Rewrites the latest checkpoint of `src` in the layout of mtjax before TrainState.extra."""
  manager = ocp.CheckpointManager(src / "checkpoints")
  step = manager.latest_step()
  state = ocp.PyTreeCheckpointer().restore(src / "checkpoints" / str(step) / "state")
  assert "extra" not in state or not state["extra"]
  state.pop("extra", None)
  items = {k: manager.restore(step, args=ocp.args.Composite(**{k: ocp.args.JsonRestore()}))[k]
           for k in ("loader", "config", "run")}
  manager.close()
  items["run"].pop("format_version")
  old = ocp.CheckpointManager(dst / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
  old.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          **{k: ocp.args.JsonSave(v) for k, v in items.items()}))
  old.wait_until_finished()
  old.close()
  return step


def test_format_1_checkpoint_migrates_and_a_newer_one_is_refused(tmp_path):
  cfg = tiny_config(**{"train.steps": 4, "optimizer.decay_steps": 4})
  straight = recipes.run(cfg, tmp_path / "straight", evaluate=False)
  recipes.run(cfg.replace(**{"train.steps": 2}), tmp_path / "new", evaluate=False)
  assert _as_format_1(tmp_path / "new", tmp_path / "old") == 2
  resumed = recipes.run(cfg, tmp_path / "old", evaluate=False)
  assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in straight.history[2:]]

  # A checkpoint from a newer mtjax: refused by name, nothing touched.
  run_dir = tmp_path / "straight" / "checkpoints" / "4" / "run"
  facts_file = next(p for p in run_dir.rglob("*") if p.is_file() and p.read_text().startswith("{"))
  facts = json.loads(facts_file.read_text())
  facts_file.write_text(json.dumps(dict(facts, format_version=99)))
  with pytest.raises(BadInputError, match="checkpoint format 99 by a newer mtjax"):
    recipes.run(cfg.replace(**{"train.steps": 5}), tmp_path / "straight", evaluate=False)
  assert (tmp_path / "straight" / "checkpoints" / "4").is_dir()


def test_setup_restores_what_the_loop_saved(tmp_path):
  cfg = tiny_config(**{"train.steps": 3})
  result = recipes.run(cfg, tmp_path, evaluate=False)
  setup = setup_lib.build(cfg, workdir=tmp_path)
  setup.checkpointer.close()
  assert setup.restored_step == 3 and setup.loader_state["step"] == 3
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(setup.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_save_records_the_loader_state_as_it_was_at_the_save(tmp_path):
  """The JSON items are written by the async save's thread: a batch source that keeps mutating
  its state dict after the save (RL's prompt cursors) must not leak a later state into it."""
  from mtjax.train import checkpoint as checkpoint_lib
  cfg = tiny_config()
  state = {"w": jnp.arange(4.0)}
  loader_state = {"step": 3, "cursors": {"a": 1}}
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, cfg.checkpoint)
  assert checkpointer.save(3, state, loader_state, cfg, {"decay_steps": 10})
  loader_state["step"], loader_state["cursors"]["a"] = 4, 99  # the source draws on
  checkpointer.close()
  reader = checkpoint_lib.Checkpointer(tmp_path, cfg.checkpoint, read_only=True)
  assert reader.restore(3, state)[1] == {"step": 3, "cursors": {"a": 1}}
  reader.close()


def test_the_progress_bar_labels_the_mean_loss_and_the_summed_objective(tmp_path, capsys):
  """The bar shows the mean of the per-task losses (what the end line reports) and the
  objective train/loss labelled as a sum, so the two numbers cannot be confused."""
  result = recipes.run(tiny_config(**{"train.progress": True, "train.steps": 4,
                                      "train.log_every": 2}), tmp_path)
  names = tiny_config().data.tasks
  lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
  shown = [line for line in lines if "mean_loss=" in line][-1]
  # The row the bar last showed (the loop reads a step's metrics one step late).
  row = next(r for r in result.history if "train/loss" in r
             and f"objective_sum={r['train/loss']:.3f}" in shown)
  mean = np.mean([row[f"train/{n}/loss"] for n in names if row.get(f"train/{n}/tokens", 1) > 0])
  assert f"mean_loss={mean:.3f}" in shown and len(names) > 1 and mean < row["train/loss"]
