"""Re-running in the same workdir resumes from the latest checkpoint with the same result."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mtjax import train
from mtjax.errors import BadInputError


def test_resume_matches_straight_run(tmp_path):
  # decay_steps fixed, so the learning-rate schedule does not depend on train.steps.
  cfg = tiny_config(**{"train.steps": 8, "optimizer.decay_steps": 8, "checkpoint.every": 2,
                       "mesh.fsdp": 8})
  straight = train.run(cfg, tmp_path / "a")
  first = train.run(cfg.replace(**{"train.steps": 5}), tmp_path / "b")
  assert int(first.state.step) == 5
  second = train.run(cfg, tmp_path / "b")  # resumes from step 5 (the end checkpoint)
  assert int(second.state.step) == 8 and [r["step"] for r in second.history] == [6, 7, 8]
  a = [r["train/loss"] for r in straight.history]
  b = [json.loads(l)["train/loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert b == a  # same process, same devices: bitwise
  for x, y in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert second.compiles == 1


def test_resume_with_other_model_is_refused(tmp_path):
  cfg = tiny_config(**{"train.steps": 2})
  train.run(cfg, tmp_path)
  with pytest.raises(BadInputError, match="model"):
    train.run(cfg.replace(**{"model.d_model": 64}), tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # nothing lost
