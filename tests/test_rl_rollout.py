"""Rollouts from the KV-cache sampler: one compilation per prompt bucket, one rollout shape per
run, the sampler's log-probs equal the update's forward pass on the padded rollout, rewards from
the tasks' verifiers and advantages as GRPO / DARLING define them, reproducible by (seed, step)."""

import functools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mtjax import tasks as task_registry
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.data.rows import encode_example
from mtjax.rl import rollout as rollout_lib
from mtjax.rl import update as rl

WIDTH, SAMPLES = 8, 4


@functools.cache
def _run():
  from mtjax.train import setup as setup_lib
  return setup_lib.build(tiny_config(), devices=jax.devices()[:1])


def _prompts(cfg, tok, count, long_every=2):
  """count prompts of the run's tasks in turn; every long_every-th one made longer than 32 tokens
  (so two prompt buckets are used)."""
  tasks = [task_registry.get(t) for t in cfg.data.tasks]
  out = []
  for i in range(count):
    task_id = i % len(tasks)
    example = tasks[task_id].source.load("train", 0, "stop").examples[i]
    prompt = example.prompt + (" " * 30 if i % long_every == 0 else "")
    tokens, _ = encode_example(tok, prompt, example.target)
    out.append(rollout_lib.Prompt(np.asarray(tokens), task_id, example))
  return out, tasks


def _sampler(diversity="none", prompts=4):
  run = _run()
  cfg = run.config
  tok = tokenizer_lib.for_data(cfg.data)
  tasks = [task_registry.get(t) for t in cfg.data.tasks]
  return run, cfg, tok, rollout_lib.RolloutSampler(
      run.graphdef, run.spec, run.mesh, tok, tasks, prompts=prompts, num_samples=SAMPLES,
      max_new_tokens=WIDTH, buckets=(32, 64), diversity=diversity)


def test_rollout_shapes_compiles_and_log_probs():
  run, cfg, tok, sampler = _sampler()
  prompts, tasks = _prompts(cfg, tok, 4)
  assert {sampler.bucket(len(p.tokens)) for p in prompts} == {32, 64}
  first = sampler(run.state.params, prompts, seed=0, step=0)
  second = sampler(run.state.params, prompts, seed=0, step=1)
  assert sampler.compiles == {32: 1, 64: 1}  # one compilation per bucket, none on the 2nd call
  for r in (first, second):
    assert {k: v.shape for k, v in r.arrays.items()}["tokens"] == (4 * SAMPLES, 64 + WIDTH)
  # The sampler's log-probs (temperature 1) are the update's forward pass on the padded rollout.
  logp, _ = rl.make_token_stats_fn(run.graphdef)(run.state.params, first.arrays)
  mask = first.arrays["completion_mask"]
  assert mask.sum() >= 4 * SAMPLES
  np.testing.assert_allclose(np.asarray(logp) * mask, first.arrays["old_logp"], atol=1e-4)
  # Rewards: the task's verifier on the decoded text; advantages: reward - group mean, / std.
  for i, p in enumerate(prompts):
    for s in range(SAMPLES):
      assert first.rewards[i, s] == float(tasks[p.task_id].is_correct(p.example, first.texts[i][s]))
  r = first.rewards
  std = r.std(axis=1, ddof=1, keepdims=True)
  expected = np.where(std > 0, (r - r.mean(axis=1, keepdims=True)) / (std + 1e-6), 0.0)
  np.testing.assert_allclose(first.advantages, expected, atol=1e-5)
  np.testing.assert_array_equal(first.arrays["task_ids"], np.repeat([p.task_id for p in prompts], SAMPLES))
  # Reproducible by (seed, step); another step samples other completions.
  again = sampler(run.state.params, prompts, seed=0, step=0)
  assert again.texts == first.texts
  assert second.texts != first.texts


def test_darling_advantages_from_canonical_classes():
  run, cfg, tok, sampler = _sampler("darling")
  prompts, _ = _prompts(cfg, tok, 4)
  r = sampler(run.state.params, prompts, seed=1, step=0)
  for i in range(len(prompts)):
    texts = [" ".join(t.split()) for t in r.texts[i]]  # the default canonical form
    sizes = np.array([texts.count(t) for t in texts], np.float64)
    div = np.maximum((SAMPLES - sizes) / (SAMPLES - 1), 0.1)
    reward = r.rewards[i] * div
    np.testing.assert_allclose(r.advantages[i], reward - reward.mean(), atol=1e-6)


def test_wrong_prompt_count_is_refused():
  run, cfg, tok, sampler = _sampler()
  prompts, _ = _prompts(cfg, tok, 3)
  with pytest.raises(ValueError, match="expected 4"):
    sampler(run.state.params, prompts, seed=0, step=0)
