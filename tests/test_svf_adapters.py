"""SVF experts as a model adapter (model.svf, issue 20): each token sees its task's expert weight
(checked against numpy's SVD of the base), tokens of tasks without an expert see the base
bit-identically, only p trains (at model.svf.lr), trainable parameter counts by hand, the basis
from a loaded base and through a checkpoint, a task's merged export."""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import host_batch, is_adapter_path, tiny_config
from mtjax import config as config_lib
from mtjax.errors import BadInputError
from mtjax.model.llama import Decoder
from mtjax.parallel import sharding
from mtjax.train import setup as setup_lib

SVF_LR = 3e-2


def _cfg(**dotted):
  base = {"model.svf.enabled": True, "model.svf.lr": SVF_LR, "optimizer.lr": 1e-3,
          "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.0, "model.dtype": "float32"}
  return tiny_config(**{**base, **dotted})


def _flat(params) -> dict[str, Any]:
  return dict(traverse_util.flatten_dict(jax.device_get(params), sep="/"))


def _logits(spec, params, batch, adapter_ids=None):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  model = nnx.merge(graphdef, params)
  ids = batch["task_ids"] if adapter_ids is None else adapter_ids
  return np.asarray(model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                          jnp.asarray(batch["segment_ids"]), adapter_ids=jnp.asarray(ids)))


def _numpy_expert(w: np.ndarray, z: np.ndarray, n_in: int) -> np.ndarray:
  """Transformer-squared's W' = U diag(S z) V^T sum(S) / sum(S z), from numpy's own SVD."""
  m = w.reshape(int(np.prod(w.shape[:n_in])), -1).astype(np.float64)
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  out = (u * (s * z)) @ vt * (s.sum() / (s * z).sum())
  return out.reshape(w.shape)


def _base_of(flat: dict[str, Any], replace: dict[str, np.ndarray] | None = None) -> Any:
  """The pure base params (no SVF entries), with some projections replaced."""
  out = {k: v for k, v in flat.items() if "_svf_" not in k}
  out.update(replace or {})
  return traverse_util.unflatten_dict(out, sep="/")


def _random_p(run) -> dict[str, Any]:
  flat = _flat(run.state.params)
  rng = np.random.default_rng(0)
  for k, v in flat.items():
    if k.endswith("_svf_p"):
      flat[k] = (rng.normal(size=v.shape) * 1.5).astype(v.dtype)  # experts far from uniform
  return flat


def test_bad_svf_config_is_named():
  for overrides, field in (
      (["--config.model.svf.enabled=true", "--config.model.svf.targets=gate,wq"], "model.svf.targets"),
      (["--config.model.svf.enabled=true", "--config.model.svf.lr=0"], "model.svf.lr"),
      (["--config.model.svf.enabled=true", "--config.model.lora.targets=q"], "model.svf.enabled"),
      (["--config.model.svf.enabled=true", "--config.optimizer.ema=0.9"], "optimizer.ema")):
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
      config_lib.load("configs/demo.py:tiny", overrides)


def test_each_token_sees_its_tasks_expert_and_other_tasks_the_base():
  cfg = _cfg(**{"model.svf.targets": ("q", "o", "gate", "up", "down")})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  flat = _random_p(run)
  params = traverse_util.unflatten_dict(flat, sep="/")
  batch = host_batch(run.config)
  adapted = _logits(run.spec, params, batch)
  base_spec = run.spec.without_adapters()
  task_ids = np.asarray(batch["task_ids"])
  n_in = {"q": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
  group = {"q": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
  for t in range(cfg.num_tasks):
    replaced = {}
    for target, k in n_in.items():
      path = f"layers/{group[target]}/{target}"
      z = 1 / (1 + np.exp(-flat[path + "_svf_p"][:, t].astype(np.float64)))  # [layers, r]
      replaced[path] = np.stack([_numpy_expert(w, z[i], k)
                                 for i, w in enumerate(flat[path])]).astype(np.float32)
    reference = _logits(base_spec, _base_of(flat, replaced), batch)
    mask = task_ids == t
    assert mask.any()
    np.testing.assert_allclose(adapted[mask], reference[mask], atol=2e-4, err_msg=f"task {t}")
  # A task without an expert (an id past the run's tasks): the base itself, bit for bit.
  ids = np.where(task_ids == 0, 99, task_ids)
  base = _logits(base_spec, _base_of(flat), batch)
  np.testing.assert_array_equal(_logits(run.spec, params, batch, ids)[ids == 99],
                                base[ids == 99])


def _train(run, steps):
  step = run.jit_step()
  state = run.state
  num_tasks = run.config.num_tasks
  with jax.set_mesh(run.mesh):
    for i in range(steps):
      batch = {k: jax.device_put(v, sharding.named(run.mesh, sharding.BATCH_AXES))
               for k, v in host_batch(run.config, start=i).items()}
      state, metrics = step(state, batch, np.ones(num_tasks, np.float32),
                            np.zeros(num_tasks, np.float32))
  assert int(metrics["skipped_steps"]) == 0
  return state, metrics


def test_only_p_trains_at_its_own_learning_rate():
  run = setup_lib.build(_cfg())
  flat0 = _flat(run.state.params)
  p_size = sum(v.size for k, v in flat0.items() if is_adapter_path(k))
  assert p_size and all(k.endswith("_svf_p") for k in flat0 if is_adapter_path(k))
  state_size = sum(np.size(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x))
  assert state_size == 2 * p_size  # Adam moments of p only
  state, metrics = _train(run, 1)
  np.testing.assert_allclose(float(metrics["lr"]), SVF_LR, rtol=1e-6)  # not optimizer.lr
  flat1 = _flat(state.params)
  for k, v in flat0.items():
    if is_adapter_path(k):
      # Adam's first step moves each coordinate by lr * g / (|g| + eps): lr where g is not tiny.
      step_size = np.abs(flat1[k] - v)
      assert step_size.max() <= SVF_LR * (1 + 1e-5), k
      assert np.median(step_size) > 0.9 * SVF_LR, k
    else:
      np.testing.assert_array_equal(v, flat1[k], err_msg=k)  # base and SVD basis: bit-identical


@pytest.mark.parametrize("dotted,kind", [
    ({"model.svf.enabled": True, "model.svf.targets": ("q", "k", "o", "gate", "down")}, "svf"),
    ({"model.lora.targets": ("q", "v", "down"), "model.lora.rank": 4, "model.lora.per_task": True},
     "lora_per_task"),
    ({"model.lora.targets": ("q", "v", "down"), "model.lora.rank": 4}, "lora_shared"),
])
def test_trainable_parameter_counts(dotted, kind, capsys):
  cfg = tiny_config(**dotted)
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  m = cfg.model
  d, f, n, k, h, L = (m.d_model, m.mlp_dim, m.num_heads, m.num_kv_heads,
                      m.head_dim or m.d_model // m.num_heads, m.num_layers)
  shapes = {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d), "gate": (d, f),
            "up": (d, f), "down": (f, d)}
  T = cfg.num_tasks
  if kind == "svf":  # one z per singular value: min(in, out) per matrix, per layer and task
    expected = sum(L * T * min(shapes[t]) for t in cfg.model.svf.targets)
  else:  # A [in, r] and B [r, out] per layer (and task)
    tasks = T if kind == "lora_per_task" else 1
    expected = sum(L * tasks * 4 * sum(shapes[t]) for t in cfg.model.lora.targets)
  flat = _flat(run.state.params)
  assert sum(v.size for p, v in flat.items() if is_adapter_path(p)) == expected
  assert f"({expected:,} trainable" in capsys.readouterr().err


def test_basis_from_a_loaded_base_and_through_a_checkpoint(tmp_path):
  """A run from an exported base computes U, S, V^T of the loaded projections (U S V^T = W);
  the basis is stored with the checkpoint and restored with it; the exported task expert equals
  the run's model on that task's tokens."""
  import mtjax.recipes
  from mtjax.loading import export_run
  from mtjax.model import pretrained
  base_dir, export = tmp_path / "base", tmp_path / "export"
  mtjax.recipes.run(tiny_config(**{"train.steps": 2, "model.dtype": "float32"}), str(base_dir))
  export_run(base_dir, export)
  cfg = _cfg(**{"model.pretrained": str(export), "model.pinned": ("data.tokenizer",),
                "train.steps": 3, "train.log_every": 1})
  fresh = setup_lib.build(cfg)
  flat = _flat(fresh.state.params)
  loaded = _flat(setup_lib.from_workdir(base_dir).state.params)
  for path in [p[:-len("_svf_u")] for p in flat if p.endswith("_svf_u")]:
    u, s, vt = flat[path + "_svf_u"], flat[path + "_svf_s"], flat[path + "_svf_vt"]
    w = flat[path]
    np.testing.assert_array_equal(w, loaded[path])
    rebuilt = np.einsum("lmr,lr,lrn->lmn", u.reshape(u.shape[0], -1, s.shape[-1]), s,
                        vt.reshape(vt.shape[0], s.shape[-1], -1)).reshape(w.shape)
    np.testing.assert_allclose(rebuilt, w, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(s, np.linalg.svd(
        w.reshape(w.shape[0], -1, vt.shape[-1]), compute_uv=False), rtol=1e-5)
  workdir = tmp_path / "svf_run"
  result = mtjax.recipes.run(cfg, str(workdir))
  assert result.compiles == 1  # per-task experts routed inside one step: one compile per run
  run = setup_lib.from_workdir(workdir)
  restored = _flat(run.state.params)
  for k, v in flat.items():
    if "_svf_" in k and not k.endswith("_svf_p"):
      np.testing.assert_array_equal(restored[k], v, err_msg=k)  # the basis, as computed at start
  assert any(not np.array_equal(restored[k], v) for k, v in flat.items() if k.endswith("_svf_p"))
  with pytest.raises(BadInputError, match="--task"):
    export_run(workdir, tmp_path / "x")
  out = tmp_path / "task1"
  export_run(workdir, out, task=run.config.data.tasks[1])
  assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == cfg.model.num_layers
  tokens = host_batch(run.config)["inputs"][:2]
  rows = {"inputs": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
          "segment_ids": np.ones_like(tokens), "task_ids": np.ones_like(tokens)}
  np.testing.assert_allclose(pretrained.forward(out, tokens),
                             _logits(run.spec, jax.device_get(run.state.params), rows), atol=1e-4)
