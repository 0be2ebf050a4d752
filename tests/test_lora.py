"""LoRA (model.lora): the adapter model starts equal to its base, only adapters train (the base
bit-identical, no optimizer state for it), per-task adapters, merged and PEFT exports."""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import host_batch, tiny_config
from mtjax import config as config_lib
from mtjax.errors import BadInputError
from mtjax.model import lora as lora_lib
from mtjax.model.llama import Decoder
from mtjax.model.lora import is_lora_path
from mtjax.parallel import sharding
from mtjax.train import setup as setup_lib

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _cfg(**dotted):
  base = {"model.lora.targets": TARGETS, "model.lora.rank": 4, "model.lora.alpha": 8.0,
          "optimizer.lr": 1e-2, "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.0,
          "model.dtype": "float32"}
  return tiny_config(**{**base, **dotted})


def _flat(params) -> dict[str, Any]:
  return dict(traverse_util.flatten_dict(jax.device_get(params), sep="/"))


def _logits(spec, params, batch):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  model = nnx.merge(graphdef, params)
  return np.asarray(model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                          jnp.asarray(batch["segment_ids"]),
                          adapter_ids=jnp.asarray(batch["task_ids"])))


def _base_params(params):
  flat = _flat(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_lora_path(k)},
                                      sep="/")


def _train(run, cfg, steps):
  step = run.jit_step()
  state = run.state
  num_tasks = cfg.num_tasks
  with jax.set_mesh(run.mesh):
    for i in range(steps):
      batch = {k: jax.device_put(v, sharding.named(run.mesh, sharding.BATCH_AXES))
               for k, v in host_batch(run.config, start=i).items()}
      state, metrics = step(state, batch, np.ones(num_tasks, np.float32),
                            np.zeros(num_tasks, np.float32))
  assert int(metrics["skipped_steps"]) == 0
  return state


def test_bad_lora_config_is_named():
  for override, field in (("--config.model.lora.rank=0", "model.lora.rank"),
                          ("--config.model.lora.targets=q,wq", "model.lora.targets"),
                          ("--config.model.lora.dropout=1.5", "model.lora.dropout")):
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
      config_lib.load("configs/demo.py:tiny", [override])
  # A rank above d_model (tiny: 32) is no low-rank adapter at all.
  with pytest.raises(BadInputError, match=r"model\.lora\.rank: 100000 is more than model\.d_model 32"):
    config_lib.load("configs/demo.py:tiny", ["--config.model.lora.targets=q,v",
                                             "--config.model.lora.rank=100000"])
  config_lib.load("configs/demo.py:tiny", ["--config.model.lora.targets=q,v",
                                           "--config.model.lora.rank=32"])


def test_init_equals_base_then_only_adapters_train_without_base_optimizer_state(capsys):
  cfg = _cfg()
  run = setup_lib.build(cfg)
  assert "optimizer state:" in capsys.readouterr().err
  batch = host_batch(run.config)
  params0 = jax.device_get(run.state.params)
  np.testing.assert_array_equal(_logits(run.spec, params0, batch),
                                _logits(run.spec.without_lora(), _base_params(params0), batch))
  # optimizer state: Adam moments of the adapters only (2x their size, plus scalar counts)
  flat0 = _flat(params0)
  adapter_size = sum(v.size for k, v in flat0.items() if is_lora_path(k))
  state_size = sum(np.size(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x))
  assert state_size == 2 * adapter_size
  base_shapes = {v.shape for k, v in flat0.items() if not is_lora_path(k)}
  adapter_shapes = {v.shape for k, v in flat0.items() if is_lora_path(k)}
  moment_shapes = {np.shape(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x)}
  assert moment_shapes <= adapter_shapes and not moment_shapes & (base_shapes - adapter_shapes)

  state = _train(run, cfg, 3)
  flat1 = _flat(state.params)
  for k, v in flat0.items():
    if is_lora_path(k):
      assert not np.array_equal(v, flat1[k]), k  # A and B both moved (A from step 2)
    else:
      np.testing.assert_array_equal(v, flat1[k], err_msg=k)  # the base: bit-identical


def test_dropout_trains_and_is_off_without_a_key():
  cfg = _cfg(**{"model.lora.dropout": 0.5})
  run = setup_lib.build(cfg)
  state = _train(run, cfg, 2)
  params = jax.device_get(state.params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(run.spec, nnx.Rngs(0))))
  model = nnx.merge(graphdef, params)
  batch = {k: jnp.asarray(v) for k, v in host_batch(run.config).items()}
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  plain = np.asarray(model(*args))
  np.testing.assert_array_equal(plain, np.asarray(model(*args)))  # no key: no dropout
  dropped = np.asarray(model(*args, dropout_key=jax.random.key(1)))
  assert not np.allclose(plain, dropped)


@pytest.mark.multidevice
def test_adapters_shard_like_their_base():
  run = setup_lib.build(_cfg(**{"mesh.fsdp": 4, "mesh.tensor": 2}))
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(run.state.params, sep="/"))
  q_a, q_b = flat["layers/attn/q_lora_a"].sharding.spec, flat["layers/attn/q_lora_b"].sharding.spec
  assert tuple(q_a) == (None, None, "fsdp", None)  # [layers, T, d: embed, r]
  assert tuple(q_b) == (None, None, None, "tensor", None)  # [layers, T, r, n: heads, h]
  down_b = flat["layers/mlp/down_lora_b"].sharding.spec
  assert tuple(down_b) == (None, None, None, "fsdp")


def test_per_task_adapters_train_only_on_their_tasks_tokens():
  cfg = _cfg(**{"model.lora.per_task": True,
                "data.mixture": {"reverse": 1.0, "addition": 1.0, "grammar": 0.0}})
  run = setup_lib.build(cfg)
  flat0 = _flat(run.state.params)
  assert flat0["layers/attn/q_lora_a"].shape[1] == 3  # [layers, T, d, r]
  state = _train(run, run.config, 3)
  flat1 = _flat(state.params)
  for k in (k for k in flat0 if is_lora_path(k)):
    before, after = flat0[k], flat1[k]
    assert not np.array_equal(before[:, 0], after[:, 0]), k
    assert not np.array_equal(before[:, 1], after[:, 1]), k
    assert not np.array_equal(after[:, 0], after[:, 1]), k  # two tasks, two adapters
    np.testing.assert_array_equal(before[:, 2], after[:, 2], err_msg=k)  # never sampled: unchanged
  # A token uses its task's adapter: the logits of a batch depend on its task ids.
  batch = host_batch(run.config)
  with_ids = _logits(run.spec, flat_tree(flat1), batch)
  shifted = dict(batch, task_ids=np.where(batch["task_ids"] >= 0, 2, -1))
  assert not np.allclose(with_ids, _logits(run.spec, flat_tree(flat1), shifted))
  with pytest.raises(BadInputError, match="--task"):
    lora_lib.adapter_index(run.spec, run.config.data.tasks, None)
  merged = lora_lib.merge(flat_tree(flat1), run.spec, lora_lib.adapter_index(
      run.spec, run.config.data.tasks, "grammar"))
  np.testing.assert_allclose(_logits(run.spec, flat_tree(flat1), shifted),
                             _logits(run.spec.without_lora(), merged, shifted), atol=1e-4)


def flat_tree(flat):
  return traverse_util.unflatten_dict(flat, sep="/")


def _trained_run(tmp_path, **dotted):
  import mtjax.recipes
  cfg = _cfg(**{"train.steps": 3, "train.log_every": 1, **dotted})
  workdir = tmp_path / "run"
  mtjax.recipes.run(cfg, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
  """A 3-step run with one shared adapter on every target."""
  return _trained_run(tmp_path_factory.mktemp("shared"))


def test_merged_export_equals_adapter_model_and_peft_export(shared_run, tmp_path):
  from mtjax.loading import export_run
  from mtjax.model import pretrained
  workdir = shared_run
  run = setup_lib.from_workdir(workdir)
  batch = host_batch(run.config)
  tokens = batch["inputs"][:2]
  rows = {"inputs": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
          "segment_ids": np.ones_like(tokens), "task_ids": np.zeros_like(tokens)}
  params = jax.device_get(run.state.params)
  adapted = _logits(run.spec, params, rows)
  assert not np.allclose(adapted, _logits(run.spec.without_lora(), _base_params(params), rows))
  out = tmp_path / "merged"
  export_run(workdir, out)
  np.testing.assert_allclose(pretrained.forward(out, tokens), adapted, atol=1e-4)

  peft_dir = tmp_path / "adapter"
  files = export_run(workdir, peft_dir, adapters_only=True)
  assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
  config = json.loads((peft_dir / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
  assert sorted(config["target_modules"]) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  from safetensors.numpy import load_file
  tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
  a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
  b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
  d, n, h = run.spec.d_model, run.spec.num_heads, run.spec.head_dim
  assert a.shape == (4, d) and b.shape == (n * h, 4)


def test_peft_loads_the_adapter_export(shared_run, tmp_path):
  """peft (not an mtjax dependency) loads the adapter directory onto the base model."""
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  import transformers
  from mtjax.loading import export_run
  from mtjax.model import pretrained
  workdir = shared_run
  run = setup_lib.from_workdir(workdir)
  tokens = host_batch(run.config)["inputs"][:2]
  rows = {"inputs": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
          "segment_ids": np.ones_like(tokens), "task_ids": np.zeros_like(tokens)}
  params = jax.device_get(run.state.params)
  adapted = _logits(run.spec, params, rows)
  peft_dir = tmp_path / "adapter"
  export_run(workdir, peft_dir, adapters_only=True)
  out = tmp_path / "merged"
  export_run(workdir, out)
  base_dir = tmp_path / "base"  # the run's base model as HF weights: merge of zero adapters
  zero = {k: (np.zeros_like(v) if k.endswith("_lora_b") else v) for k, v in _flat(params).items()}
  pretrained.export(lora_lib.merge(flat_tree(zero), run.spec), run.spec.without_lora(), base_dir,
                    config=json.loads((out / "config.json").read_text()), progress=False)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, str(peft_dir)).eval()
  with torch.no_grad():
    got = model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, adapted, atol=1e-4)


def test_per_task_run_evaluates_with_generation_and_exports_one_task(tmp_path):
  from mtjax.loading import export_run
  from mtjax.model import pretrained
  workdir = _trained_run(tmp_path, **{"model.lora.per_task": True, "eval.every": 3,
                                      "eval.num_examples": 4, "eval.num_generate": 2,
                                      "eval.num_samples": 0})
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("eval/reverse/accuracy" in r for r in rows)
  with pytest.raises(BadInputError, match="--task"):
    export_run(workdir, tmp_path / "x")
  with pytest.raises(BadInputError, match="--task"):
    export_run(workdir, tmp_path / "y", task="nope")
  run = setup_lib.from_workdir(workdir)
  out = tmp_path / "addition"
  export_run(workdir, out, task="addition")
  tokens = host_batch(run.config)["inputs"][:2]
  rows_ = {"inputs": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
           "segment_ids": np.ones_like(tokens), "task_ids": np.ones_like(tokens)}  # addition: 1
  np.testing.assert_allclose(pretrained.forward(out, tokens),
                             _logits(run.spec, jax.device_get(run.state.params), rows_), atol=1e-4)
  # mtjax.load: logits for a task's adapter (it asked for adapter_ids and crashed before); the
  # same numbers as the addition export; an unknown task named.
  import mtjax
  model = mtjax.load(workdir)
  np.testing.assert_allclose(model.logits(tokens, task="addition"), pretrained.forward(out, tokens),
                             atol=1e-4)
  assert np.abs(model.logits(tokens) - model.logits(tokens, task="addition")).max() > 1e-6
  with pytest.raises(BadInputError, match="expected one of reverse, addition"):
    model.logits(tokens, task="nope")
  from mtjax import cli  # the CLI's --task reaches the same adapter
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "ab", "--task", "nope"]) == 2


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  """(a tiny random HF Llama, its torch model, a 3-step LoRA run on it)."""
  pytest.importorskip("transformers")
  pytest.importorskip("torch")
  import hf_models
  tmp = tmp_path_factory.mktemp("pretrained")
  source = tmp / "llama"
  reference = hf_models.make("llama", source)
  workdir = _trained_run(tmp, **{"model.pretrained": str(source),
                                 "model.lora.targets": ("q", "v", "down")})
  return source, reference, workdir


def _pretrained_rows():
  import hf_models
  tokens = np.random.RandomState(0).randint(3, hf_models.VOCAB, (2, 12))
  return tokens, {"inputs": tokens, "positions": np.broadcast_to(np.arange(12), tokens.shape),
                  "segment_ids": np.ones_like(tokens), "task_ids": np.zeros_like(tokens)}


def test_lora_on_a_pretrained_model_starts_at_it_and_trains_adapters_only(pretrained_run, tmp_path):
  import hf_models
  from mtjax.loading import export_run
  source, reference, workdir = pretrained_run
  tokens, rows = _pretrained_rows()
  fresh = setup_lib.build(setup_lib.workdir_config(workdir))  # no workdir: the base + fresh adapters
  np.testing.assert_allclose(_logits(fresh.spec, jax.device_get(fresh.state.params), rows),
                             hf_models.logits(reference, tokens), atol=1e-4)
  run = setup_lib.from_workdir(workdir)
  adapted = _logits(run.spec, jax.device_get(run.state.params), rows)
  assert not np.allclose(adapted, hf_models.logits(reference, tokens), atol=1e-4)  # it trained
  flat0, flat1 = _flat(fresh.state.params), _flat(run.state.params)
  for k, v in flat0.items():
    if not is_lora_path(k):
      np.testing.assert_array_equal(v, flat1[k], err_msg=k)  # the pretrained base: untouched
  peft_dir = tmp_path / "adapter"
  export_run(workdir, peft_dir, adapters_only=True)
  config = json.loads((peft_dir / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(source)
  assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]


def test_peft_loads_the_adapter_onto_the_pretrained_model(pretrained_run, tmp_path):
  peft = pytest.importorskip("peft")
  import torch
  from mtjax.loading import export_run
  source, reference, workdir = pretrained_run
  tokens, rows = _pretrained_rows()
  run = setup_lib.from_workdir(workdir)
  adapted = _logits(run.spec, jax.device_get(run.state.params), rows)
  peft_dir = tmp_path / "adapter"
  export_run(workdir, peft_dir, adapters_only=True)
  model = peft.PeftModel.from_pretrained(reference, str(peft_dir)).eval()
  with torch.no_grad():
    got = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, adapted, atol=1e-4)
