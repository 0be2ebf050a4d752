"""DoRA (model.lora.kind=dora), the adapter plug-in added as one module: on a pretrained tiny
Llama it starts equal to its base, trains only A, B and the magnitude, and matches PEFT 0.21 (the
adapter directory loaded by peft onto the same base, and the merged export read by transformers)
to 1e-4; a per-task run routes each token to its task's adapter (its merged export)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import tiny_config
from mtjax.model.llama import Decoder
from mtjax.train import setup as setup_lib

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _cfg(source, **dotted):
  return tiny_config(**{"model.pretrained": str(source), "model.lora.kind": "dora",
                        "model.lora.targets": TARGETS, "model.lora.rank": 4,
                        "model.lora.alpha": 8.0, "optimizer.lr": 3e-2,
                        "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.0,
                        "model.dtype": "float32", "train.steps": 4, "train.log_every": 1,
                        **dotted})


def _logits(spec, params, tokens, task=0):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  ids = np.full_like(tokens, task)
  return np.asarray(nnx.merge(graphdef, params)(
      jnp.asarray(tokens), jnp.asarray(np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)),
      jnp.asarray(np.ones_like(tokens)), adapter_ids=jnp.asarray(ids)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(a tiny random HF Llama directory, its torch model, sample tokens)."""
  pytest.importorskip("transformers")
  import hf_models
  source = tmp_path_factory.mktemp("dora") / "llama"
  reference = hf_models.make("llama", source)
  tokens = np.random.RandomState(0).randint(3, hf_models.VOCAB, (2, 12))
  return source, reference, tokens


@pytest.fixture(scope="module")
def dora_run(base, tmp_path_factory):
  import mtjax.recipes
  workdir = tmp_path_factory.mktemp("dora_run") / "run"
  mtjax.recipes.run(_cfg(base[0]), str(workdir))
  return workdir


def test_dora_starts_at_its_base_and_trains_only_its_variables(base, dora_run):
  import hf_models
  source, reference, tokens = base
  fresh = setup_lib.build(setup_lib.workdir_config(dora_run))  # the base + fresh adapters
  np.testing.assert_allclose(_logits(fresh.spec, jax.device_get(fresh.state.params), tokens),
                             hf_models.logits(reference, tokens), atol=1e-4)
  run = setup_lib.from_workdir(dora_run)
  flat0 = traverse_util.flatten_dict(jax.device_get(fresh.state.params), sep="/")
  flat1 = traverse_util.flatten_dict(jax.device_get(run.state.params), sep="/")
  moved = {k for k in flat0 if not np.array_equal(flat0[k], flat1[k])}
  adapter = {k for k in flat0 if k.endswith(("_lora_a", "_lora_b", "_lora_magnitude"))}
  assert moved == adapter  # A, B and the magnitude train; the pretrained base is untouched
  # The magnitude starts at the base weight's row norms (the model is its base) and then moves.
  w = np.asarray(flat0["layers/attn/q"])  # [layers, d, n, h]: rows are (n, h)
  np.testing.assert_allclose(flat0["layers/attn/q_lora_magnitude"][:, 0],
                             np.sqrt((w ** 2).sum(axis=1)), rtol=1e-6)


def test_dora_matches_peft_adapter_and_merged_exports(base, dora_run, tmp_path):
  peft = pytest.importorskip("peft")
  import torch

  import hf_models
  from mtjax.loading import export_run
  from mtjax.model import pretrained
  source, reference, tokens = base
  run = setup_lib.from_workdir(dora_run)
  adapted = _logits(run.spec, jax.device_get(run.state.params), tokens)
  assert not np.allclose(adapted, hf_models.logits(reference, tokens), atol=1e-3)  # it trained

  peft_dir = tmp_path / "adapter"
  assert sorted(export_run(dora_run, peft_dir, adapters_only=True)) == [
      "adapter_config.json", "adapter_model.safetensors"]
  config = json.loads((peft_dir / "adapter_config.json").read_text())
  assert config["use_dora"] is True and config["peft_type"] == "LORA" and config["r"] == 4
  model = peft.PeftModel.from_pretrained(reference, str(peft_dir)).eval()
  with torch.no_grad():
    got = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, adapted, atol=1e-4)  # peft's DoRA on the same base

  merged = tmp_path / "merged"
  export_run(dora_run, merged)
  np.testing.assert_allclose(pretrained.forward(merged, tokens), adapted, atol=1e-4)


def test_per_task_dora_routes_each_token_to_its_task(base, tmp_path):
  import mtjax.recipes
  from mtjax.loading import export_run
  from mtjax.model import pretrained
  source, _, tokens = base
  workdir = tmp_path / "per_task"
  mtjax.recipes.run(_cfg(source, **{"model.lora.per_task": True}), str(workdir))
  run = setup_lib.from_workdir(workdir)
  params = jax.device_get(run.state.params)
  out = tmp_path / "addition"
  export_run(workdir, out, task="addition")  # task 1's adapter folded in
  np.testing.assert_allclose(pretrained.forward(out, tokens),
                             _logits(run.spec, params, tokens, task=1), atol=1e-4)
  assert not np.allclose(_logits(run.spec, params, tokens, task=0),
                         _logits(run.spec, params, tokens, task=1), atol=1e-4)
