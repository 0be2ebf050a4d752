"""Per-task train metrics are token-weighted means over the whole log window (not the logged step
alone), and a task without tokens in a window gets no loss/entropy/accuracy (never a fake 0.0).

Reference: every step's own per-task metrics, fetched by a hook of the same run, averaged here
with numpy."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from mtjax import recipes
from mtjax.train import hooks as hooks_lib
from mtjax.train import metrics as metrics_lib

import run_contract

STEPS, EVERY = 6, 3
TASKS = ("reverse", "addition", "grammar")
# grammar is not sampled in the first window (steps 1-3), sampled from step index 3 on.
STAGES = ((0, {"reverse": 1.0, "addition": 1.0, "grammar": 0.0}),
          (EVERY, {"reverse": 1.0, "addition": 1.0, "grammar": 1.0}))


class Recorder(hooks_lib.Hook):
  """Fetches every step's metrics (a host sync per step: fine in a test)."""

  def __init__(self):
    self.steps: dict[int, dict] = {}

  def after_step(self, loop, out):
    self.steps[out.done] = jax.device_get(
        {"objective": out.metrics["objective"], "per_task": out.metrics["per_task"]})


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
  cfg = tiny_config(**{"train.steps": STEPS, "train.log_every": EVERY, "data.tasks": TASKS,
                       "data.schedule": "stages", "data.mixture": {}, "data.stages": STAGES,
                       "optimizer.decay_steps": STEPS})
  workdir = tmp_path_factory.mktemp("window") / "run"
  recorder = Recorder()
  result = recipes.run(cfg, workdir, extra_hooks=[recorder])
  return result, recorder.steps, workdir


def _reference(steps: dict[int, dict], window: range, t: int) -> dict[str, float]:
  tokens = np.array([float(steps[s]["per_task"]["tokens"][t]) for s in window], np.float64)
  out = {"tokens": tokens.sum()}
  for key in ("loss", "entropy", "accuracy"):
    values = np.array([float(steps[s]["per_task"][key][t]) for s in window], np.float64)
    out[key] = float((values * tokens).sum() / tokens.sum()) if tokens.sum() else None
  return out


def test_logged_per_task_metrics_are_token_weighted_window_means(staged_run):
  result, steps, _ = staged_run
  rows = [r for r in result.history if "train/loss" in r]
  assert [r["step"] for r in rows] == [EVERY, STEPS]
  assert sorted(steps) == list(range(1, STEPS + 1))
  differs = False
  for row in rows:
    window = range(row["step"] - EVERY + 1, row["step"] + 1)
    # train/loss stays the logged step's own objective
    assert row["train/loss"] == float(steps[row["step"]]["objective"])
    for t, name in enumerate(TASKS):
      ref = _reference(steps, window, t)
      assert row[f"train/{name}/tokens"] == int(ref["tokens"])
      if not ref["tokens"]:
        continue
      for key in ("loss", "entropy", "accuracy"):
        np.testing.assert_allclose(row[f"train/{name}/{key}"], ref[key], rtol=1e-9, err_msg=key)
      last = steps[row["step"]]["per_task"]
      differs |= abs(row[f"train/{name}/loss"] - float(last["loss"][t])) > 1e-6
      assert row[f"train/{name}/tokens"] > float(last["tokens"][t])  # the whole window's tokens
  assert differs  # not the logged step's values


def test_a_task_without_tokens_in_a_window_has_no_means(staged_run):
  result, steps, workdir = staged_run
  first, second = [r for r in result.history if "train/loss" in r]
  assert all(float(steps[s]["per_task"]["tokens"][2]) == 0 for s in range(1, EVERY + 1))
  assert first["train/grammar/tokens"] == 0
  for key in ("loss", "entropy", "accuracy"):
    assert f"train/grammar/{key}" not in first  # not a fake 0.0
    assert f"train/reverse/{key}" in first
    assert f"train/grammar/{key}" in second
  assert first["data/grammar/rate"] == 0 and "warn/grammar/no_tokens" not in first
  stored = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert "train/grammar/loss" not in stored[0] and stored[0]["train/grammar/tokens"] == 0
  # The run contract (this repo's and the shared checker) accepts it.
  assert run_contract.check(workdir) == []
  shared = REPO.parent / "shared" / "tools" / "check_run.py"
  if shared.is_file():
    done = subprocess.run([sys.executable, str(shared), str(workdir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_plots_skip_a_window_without_tokens(tmp_path, monkeypatch):
  rows = [{"step": 3, "train/a/loss": 2.0, "train/a/tokens": 10, "train/b/tokens": 0},
          {"step": 6, "train/a/loss": 1.0, "train/a/tokens": 10, "train/b/loss": 3.0,
           "train/b/tokens": 5}]
  from matplotlib.axes import Axes
  drawn = []
  real_plot = Axes.plot

  def plot(self, xs, ys, **kwargs):
    drawn.append((kwargs.get("label"), list(xs), list(ys)))
    return real_plot(self, xs, ys, **kwargs)

  monkeypatch.setattr(Axes, "plot", plot)
  metrics_lib.plot_per_task(rows, ["a", "b"], tmp_path)
  assert ("b", [6], [3.0]) in drawn and ("a", [3, 6], [2.0, 1.0]) in drawn


def test_train_row_from_hand_made_window():
  steps = [{"loss": np.array([2.0, 0.0], np.float32), "entropy": np.array([1.0, 0.0], np.float32),
            "accuracy": np.array([0.5, 0.0], np.float32), "tokens": np.array([10, 0], np.float32)},
           {"loss": np.array([4.0, 0.0], np.float32), "entropy": np.array([3.0, 0.0], np.float32),
            "accuracy": np.array([0.0, 0.0], np.float32), "tokens": np.array([30, 0], np.float32)}]
  metrics = {"objective": 1.5, "grad_norm": 1.0, "lr": 0.1, "skipped_steps": 0,
             "per_task": steps[-1]}
  row = metrics_lib.train_row(2, metrics, ["a", "b"], np.ones(2), np.zeros(2),
                              window=metrics_lib.window_sums(steps))
  assert row["train/a/loss"] == pytest.approx((2 * 10 + 4 * 30) / 40)
  assert row["train/a/entropy"] == pytest.approx((1 * 10 + 3 * 30) / 40)
  assert row["train/a/accuracy"] == pytest.approx(5 / 40)
  assert row["train/a/tokens"] == 40 and row["train/b/tokens"] == 0
  assert not {"train/b/loss", "train/b/entropy", "train/b/accuracy"} & set(row)
  assert row["train/loss"] == 1.5
