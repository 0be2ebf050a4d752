"""GRPO runs end to end (rl.algorithm=grpo): one compilation of the update, one sampler
compilation per prompt bucket, the reference model kept (and checkpointed), exact resume after
SIGKILL, clear errors for settings RL does not take."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import DEMO, sigkill_resume_runs, tiny_config
from mtjax import recipes
from mtjax.errors import BadInputError

def _parity_task():
  """The demo's reverse prompts with a verifier an untrained model passes about half the time
  (an output of even length): groups with mixed rewards, so advantages are not all zero."""
  from mtjax import tasks
  src = tasks.get("reverse")
  tasks.register(tasks.Task("rl_parity", src.source, lambda example, output: len(output) % 2 == 0),
                 replace=True)
  return {"data.tasks": ("rl_parity", "reverse"), "data.mixture": {"rl_parity": 1.0, "reverse": 1.0},
          "eval.tasks": ()}


RL = {"rl.algorithm": "grpo", "rl.prompts": 4, "rl.samples": 4, "rl.epochs": 2,
      "train.entropy_coefs": {}, "train.log_every": 1}


def test_grpo_run_compiles_once_and_keeps_its_reference(tmp_path):
  cfg = tiny_config(**{**RL, **_parity_task(), "train.steps": 4, "rl.kl_coef": 0.1,
                       "optimizer.lr": 1e-2, "optimizer.warmup_steps": 0})
  result = recipes.run(cfg, tmp_path)
  rows = [r for r in result.history if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert result.compiles == 1 and all(r["perf/compiles"] == 1 for r in rows)
  # One sampler compilation per prompt bucket used, none after the first steps.
  assert rows[-1]["perf/sampler_compiles"] == rows[0]["perf/sampler_compiles"] >= 1
  for r in rows:
    for t in cfg.data.tasks:
      if f"rl/{t}/reward" in r:
        assert 0 <= r[f"rl/{t}/reward"] <= r[f"rl/{t}/pass@4"] <= 1
        assert 0.25 <= r[f"rl/{t}/distinct@4"] <= 1
  assert rows[-1]["rl/kl"] > 0  # the policy moved away from the reference
  assert rows[0]["rl/old_logp_gap"] < 1e-3  # sampler and trainer score the same policy
  # The reference is the starting model, unchanged, beside the trained params.
  from mtjax.train import setup as setup_lib
  start = setup_lib.build(cfg).state.params
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(result.state.extra["reference"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(result.state.params)))


def test_grpo_with_lora_uses_the_frozen_base_as_reference(tmp_path):
  cfg = tiny_config(**{**RL, **_parity_task(), "train.steps": 3, "rl.kl_coef": 0.1,
                       "optimizer.lr": 3e-2, "optimizer.warmup_steps": 0, "model.lora.targets": ("q", "v"), "model.lora.rank": 4})
  result = recipes.run(cfg, tmp_path)
  assert "reference" not in result.state.extra  # no copy: the base with B = 0 is the reference
  rows = [r for r in result.history if "train/loss" in r]
  assert result.compiles == 1 and rows[-1]["rl/kl"] > 0


@pytest.mark.multidevice
def test_rl_settings_it_does_not_take_exit_2():
  with pytest.raises(BadInputError, match="train.weighting.method"):
    tiny_config(**{**RL, "train.weighting.method": "famo"})
  with pytest.raises(BadInputError, match="train.entropy_coefs"):
    tiny_config(**{**RL, "train.entropy_coefs": {"reverse": 0.1}})
  with pytest.raises(BadInputError, match="rl.samples"):
    tiny_config(**{**RL, "rl.samples": 1})
  with pytest.raises(BadInputError, match="rl.diversity"):
    tiny_config(**{**RL, "rl.diversity": "entropy"})
  with pytest.raises(BadInputError, match="rl.prompts: rl.prompts x rl.samples = 6"):
    from mtjax.train import setup as setup_lib
    setup_lib.build(tiny_config(**{**RL, "rl.prompts": 3, "rl.samples": 2}))  # 8 devices


@pytest.mark.slow
def test_sigkill_resume_of_a_grpo_run_matches_a_straight_run(tmp_path):
  steps = 16
  args = ["--config", f"{DEMO}:tiny", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.checkpoint.every=6", "--config.rl.algorithm=grpo", "--config.rl.prompts=4",
          "--config.rl.samples=4", "--config.rl.epochs=2", "--config.rl.diversity=darling",
          "--config.train.entropy_coefs={}"]
  straight, killed = sigkill_resume_runs(tmp_path, args, steps, checkpoint_step=6, step_delay=0.3)
  rows = lambda workdir: [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  a, b = rows(straight), rows(killed)
  assert [r["step"] for r in b] == list(range(1, steps + 1))
  keys = [k for k in a[-1] if k.startswith("rl/") or k.startswith("train/") or k.startswith("data/")]
  assert [[r.get(k) for k in keys] for r in b] == [[r.get(k) for k in keys] for r in a]
  restore = lambda w: ocp.PyTreeCheckpointer().restore(w / "checkpoints" / str(steps) / "state")
  for x, y in zip(jax.tree.leaves(restore(straight)), jax.tree.leaves(restore(killed))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
