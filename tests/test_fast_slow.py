"""Fast/slow training (issue 21): per-task soft prompts (the fast weights) beside the model (the
slow weights). A task's soft prompt reaches only its own tokens (other tasks' logits
bit-identical), the two groups take their own learning rates on their own steps (against a hand
computation of AdamW), bad settings are named, and a killed fast/slow run resumes exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from conftest import DEMO, host_batch, sigkill_resume_runs, tiny_config
from mtjax import config as config_lib
from mtjax.config import OptimizerConfig
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError
from mtjax.model.soft_prompt import soft_prompt_embeddings
from mtjax.parallel import sharding
from mtjax.train import optimizer as optimizer_lib
from mtjax.train import setup as setup_lib

P = 4


def _cfg(**dotted):
  base = {"model.soft_prompt.length": P, "model.dtype": "float32"}
  return tiny_config(**{**base, **dotted})


def _flat(params):
  return dict(traverse_util.flatten_dict(jax.device_get(params), sep="/"))


def test_slots_end_every_prompt_and_count_as_prompt_tokens():
  cfg = _cfg()
  tok = tokenizer_lib.for_config(cfg)
  assert isinstance(tok, tokenizer_lib.SlotTokenizer) and tok.slot_id == 259  # byte vocab: 259
  prompt, target = tokenizer_lib.encode_example(tok, "ab", "cd")
  base_prompt, base_target = tokenizer_lib.encode_example(tok.base, "ab", "cd")
  np.testing.assert_array_equal(prompt, np.concatenate([base_prompt, [259] * P]))
  np.testing.assert_array_equal(target, base_target)
  assert tokenizer_lib.prompt_count(tok, "ab") == 2 + P
  batch = host_batch(cfg)
  slots = batch["inputs"] == 259
  # Every example: P slots, each right before the first loss-carrying pair's input... the pair
  # whose target is the first target token: the last slot predicts the target's first token.
  last_slot = slots & ~np.roll(slots, -1, axis=1)
  assert last_slot.sum() * P == slots.sum() > 0
  np.testing.assert_array_equal(batch["loss_mask"][last_slot], 1.0)
  assert not batch["loss_mask"][slots & ~last_slot].any()


def test_slot_rows_against_numpy_also_after_a_left_cut():
  table = jnp.arange(2 * P * 3, dtype=jnp.float32).reshape(2, P, 3)
  s = 99
  # task 1: a whole example; task 0: its first two slots cut away (prompt_left); then padding.
  tokens = jnp.array([[1, 5, s, s, s, s, 7, 1, s, s, 8, 0, 0]])
  tasks = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, -1, -1]])
  is_slot, rows = soft_prompt_embeddings(table, tokens, tasks, s)
  want_rows = {2: (1, 0), 3: (1, 1), 4: (1, 2), 5: (1, 3), 8: (0, 2), 9: (0, 3)}
  np.testing.assert_array_equal(np.flatnonzero(is_slot[0]), sorted(want_rows))
  for col, (task, row) in want_rows.items():
    np.testing.assert_array_equal(rows[0, col], table[task, row])


def _logits(run, params, batch):
  model = nnx.merge(run.graphdef, params)
  return np.asarray(model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                          jnp.asarray(batch["segment_ids"]), adapter_ids=jnp.asarray(batch["task_ids"])))


def _from_first_slot(batch) -> np.ndarray:
  """Per token: whether a slot of its own example is at or before it."""
  out = np.zeros(batch["inputs"].shape, bool)
  for r, (tokens, segments) in enumerate(zip(batch["inputs"], batch["segment_ids"])):
    seen = False
    for c in range(len(tokens)):
      if c and segments[c] != segments[c - 1]:
        seen = False
      seen |= bool(tokens[c] == 259)
      out[r, c] = seen
  return out


def test_a_soft_prompt_changes_only_its_tasks_rows():
  cfg = _cfg()
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  batch = host_batch(cfg)
  params = jax.device_get(run.state.params)
  before = _logits(run, params, batch)
  for task in range(cfg.num_tasks):
    changed = jax.tree.map(lambda x: x, params)
    changed["soft_prompt"] = params["soft_prompt"].copy()
    changed["soft_prompt"][task] += 1.0
    after = _logits(run, changed, batch)
    own = batch["task_ids"] == task
    others = ~own & (batch["task_ids"] >= 0)  # padding carries no task and no loss
    assert own.any() and others.any()
    np.testing.assert_array_equal(after[others], before[others])  # bit for bit
    # Its own tokens see the change from their example's first slot on (causal), not before.
    moved = np.abs(after - before).max(axis=-1) > 1e-4
    np.testing.assert_array_equal(moved[own], _from_first_slot(batch)[own])


def _fast_slow_reference(cfg, total_steps, params, grads_per_step):
  """AdamW by hand per group: global-norm clipping over all trained gradients, then the fast group at lr
  on steps s % fast_every == 0 and the slow one at lr * slow_lr_ratio on s % slow_every == 0,
  each with its own moments and bias-correction count; decoupled decay on slow matrices only."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = ["/".join(str(k.key) for k in path) for path, _ in leaves]
  p = [np.asarray(x, np.float64) for _, x in leaves]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  count = {"fast": 0, "slow": 0}
  for s, grads in enumerate(grads_per_step):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    frozen = "slow" if cfg.slow_lr_ratio == 0 else "fast" if cfg.fast_every == 0 else None
    if frozen:  # a frozen group's gradients are dropped before the clip
      g = [0 * x if (name == "soft_prompt") == (frozen == "fast") else x for x, name in zip(g, names)]
    norm = np.sqrt(sum(float((x ** 2).sum()) for x in g))
    if norm > cfg.clip_norm:
      g = [x * cfg.clip_norm / norm for x in g]
    for group, every, lr in (("fast", cfg.fast_every, cfg.lr),
                             ("slow", cfg.slow_every, cfg.lr * cfg.slow_lr_ratio)):
      if group == frozen or s % every:
        continue
      t = count[group] = count[group] + 1
      for i, name in enumerate(names):
        if (name == "soft_prompt") != (group == "fast"):
          continue
        m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * g[i]
        v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * g[i] ** 2
        direction = (m[i] / (1 - cfg.b1 ** t)) / (np.sqrt(v[i] / (1 - cfg.b2 ** t)) + cfg.eps)
        if group == "slow" and p[i].ndim >= 2 and name != "token_embed":
          direction = direction + cfg.weight_decay * p[i]
        p[i] = p[i] - lr * direction
  return jax.tree.unflatten(jax.tree.structure(params), p)


@pytest.mark.parametrize("slow_lr_ratio,fast_every,slow_every",
                         [(0.1, 1, 2), (0.3, 2, 1), (0.0, 1, 1), (0.5, 0, 1)])
def test_groups_take_their_own_lr_on_their_own_steps(slow_lr_ratio, fast_every, slow_every):
  cfg = OptimizerConfig(lr=0.05, schedule="constant", warmup_steps=0, weight_decay=0.5,
                        clip_norm=1.0, eps=1e-3, slow_lr_ratio=slow_lr_ratio,
                        fast_every=fast_every, slow_every=slow_every)
  rng = np.random.default_rng(0)
  shapes = {"soft_prompt": (3, 2, 4), "token_embed": (7, 4), "lm_head": (4, 7)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in shapes.items()}
           for scale in (2.0, 0.1, 1.0, 0.5)]
  tx, _ = optimizer_lib.make_optimizer(cfg, total_steps=4)
  state, got = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, got)
    got = optax.apply_updates(got, updates)
  want = _fast_slow_reference(cfg, 4, params, grads)
  for k in shapes:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  moments = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x))
  if slow_lr_ratio == 0:  # fast only: no optimizer state for the frozen slow weights
    assert moments == 2 * params["soft_prompt"].size
  if fast_every == 0:  # slow only: the soft prompts stay as they were, with no optimizer state
    np.testing.assert_array_equal(got["soft_prompt"], params["soft_prompt"])
    assert moments == 2 * sum(v.size for k, v in params.items() if k != "soft_prompt")
  else:
    assert not np.array_equal(got["soft_prompt"], params["soft_prompt"])


def test_the_real_step_moves_slow_weights_on_slow_steps_only():
  cfg = _cfg(**{"optimizer.slow_lr_ratio": 0.1, "optimizer.slow_every": 2,
                "optimizer.warmup_steps": 0})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  step = run.jit_step()
  state, T = run.state, cfg.num_tasks
  history = [_flat(state.params)]
  with jax.set_mesh(run.mesh):
    for i in range(3):
      batch = {k: jax.device_put(v, sharding.named(run.mesh, sharding.BATCH_AXES))
               for k, v in host_batch(cfg, start=i).items()}
      state, metrics = step(state, batch, np.ones(T, np.float32), np.zeros(T, np.float32))
      history.append(_flat(state.params))
  assert int(metrics["skipped_steps"]) == 0
  for s in range(3):
    a, b = history[s], history[s + 1]
    assert not np.array_equal(a["soft_prompt"], b["soft_prompt"])  # fast: every step
    slow_moved = [not np.array_equal(a[k], b[k]) for k in a if k != "soft_prompt"]
    assert all(slow_moved) if s % 2 == 0 else not any(slow_moved), s


def test_bad_fast_slow_settings_are_named():
  for overrides, field in (
      (["--config.model.soft_prompt.length=-1"], "model.soft_prompt.length"),
      (["--config.model.soft_prompt.length=4", "--config.model.lora.targets=q"], "model.soft_prompt.length"),
      (["--config.model.soft_prompt.length=200"], "model.soft_prompt.length"),
      (["--config.optimizer.slow_lr_ratio=0.1"], "optimizer.slow_lr_ratio"),  # no fast weights
      (["--config.model.soft_prompt.length=4", "--config.optimizer.slow_lr_ratio=-1"], "optimizer.slow_lr_ratio"),
      (["--config.model.soft_prompt.length=4", "--config.optimizer.fast_every=-1"], "optimizer.fast_every"),
      (["--config.model.soft_prompt.length=4", "--config.optimizer.fast_every=0",
        "--config.optimizer.slow_lr_ratio=0"], "optimizer.fast_every"),
      (["--config.model.soft_prompt.length=4", "--config.optimizer.slow_every=2",
        "--config.optimizer.param_groups={'lm_head': 0.5}"], "optimizer.param_groups")):
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
      config_lib.load(f"{DEMO}:tiny", overrides)
  cfg = _cfg(**{"model.vocab_size": 256 + 3})  # the byte vocabulary fills the model's: no slot
  with pytest.raises(BadInputError, match="model.soft_prompt.length"):
    tokenizer_lib.for_config(cfg)


@pytest.mark.slow
def test_sigkill_resume_of_a_fast_slow_run_matches_a_straight_run(tmp_path):
  import orbax.checkpoint as ocp
  steps = 24
  args = ["--config", f"{DEMO}:tiny", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.checkpoint.every=10", f"--config.model.soft_prompt.length={P}",
          "--config.optimizer.slow_lr_ratio=0.2", "--config.optimizer.slow_every=3",
          "--config.optimizer.fast_every=2"]
  straight, killed = sigkill_resume_runs(tmp_path, args, steps, checkpoint_step=10)
  rows = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  a, b = rows(straight), rows(killed)
  assert [r["step"] for r in b] == list(range(1, steps + 1))
  assert [r["train/loss"] for r in b] == [r["train/loss"] for r in a]
  restore = lambda w: ocp.PyTreeCheckpointer().restore(w / "checkpoints" / str(steps) / "state")
  x, y = restore(straight), restore(killed)
  assert "soft_prompt" in x["params"]
  for u, w in zip(jax.tree.leaves(x), jax.tree.leaves(y)):  # fast state (soft prompts, moments) too
    np.testing.assert_array_equal(np.asarray(u), np.asarray(w))


def test_kl_drift_against_numpy_and_zero_at_the_start():
  from mtjax.eval.evaluate import Evaluator
  cfg = _cfg(**{"eval.drift": True, "eval.num_examples": 8, "eval.num_generate": 2,
                "eval.num_samples": 0, "train.loss_chunk": 48})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  reference = jax.device_get(run.state.extra["reference"])
  params = jax.device_get(run.state.params)
  evaluator = Evaluator(cfg, run.graphdef, run.spec, run.mesh, run.tokenizer)
  row = evaluator(params, 0, reference=reference)
  for name in cfg.data.tasks:
    assert row[f"eval/{name}/kl_drift"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= row[f"eval/{name}/accuracy"] <= 1.0  # generation reads the soft prompt too
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), params)
  row = evaluator(moved, 1, reference=reference)
  want_sum, want_n = np.zeros(cfg.num_tasks), np.zeros(cfg.num_tasks)
  for batch in evaluator.batches:  # numpy: the exact KL of the two softmaxes per loss token
    lp = _logits(run, moved, batch).astype(np.float64)
    lq = _logits(run, reference, batch).astype(np.float64)
    lp -= np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lp.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq - lq.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lq.max(-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    for t in range(cfg.num_tasks):
      mask = (batch["task_ids"] == t) & (batch["loss_mask"] > 0)
      want_sum[t] += kl[mask].sum()
      want_n[t] += mask.sum()
  for t, name in enumerate(cfg.data.tasks):
    assert row[f"eval/{name}/kl_drift"] == pytest.approx(want_sum[t] / want_n[t], rel=1e-4)
    assert row[f"eval/{name}/kl_drift"] > 1e-3


def test_an_exports_soft_prompts_of_another_shape_are_named(tmp_path):
  from mtjax.model import pretrained
  assert pretrained.read_soft_prompt(tmp_path, (3, 4, 32)) is None  # an export without them
  np.save(tmp_path / pretrained.SOFT_PROMPT_FILE, np.zeros((2, 4, 32), np.float32))
  with pytest.raises(BadInputError, match=r"mtjax_soft_prompt\.npy.*\(2, 4, 32\).*\(3, 4, 32\)"):
    pretrained.read_soft_prompt(tmp_path, (3, 4, 32))
  np.testing.assert_array_equal(pretrained.read_soft_prompt(tmp_path, (2, 4, 32)), 0.0)


@pytest.mark.parametrize("content, message", [
    (b"garbage, not an npy file", "not a readable .npy array"),
    (None, "expected finite floating-point soft prompts, got float32 with NaN/Inf"),
    ("ints", "expected finite floating-point soft prompts, got int64"),
    ("object", "not a readable .npy array"),  # a pickled object array: never unpickled
])
def test_a_garbage_soft_prompt_file_is_one_error_line(tmp_path, content, message):
  from mtjax.model import pretrained
  path = tmp_path / pretrained.SOFT_PROMPT_FILE
  if content is None:
    np.save(path, np.full((2, 4, 32), np.nan, np.float32))
  elif content == "ints":
    np.save(path, np.zeros((2, 4, 32), np.int64))
  elif content == "object":
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  else:
    path.write_bytes(content)
  with pytest.raises(BadInputError, match=message):
    pretrained.read_soft_prompt(tmp_path, (2, 4, 32))
