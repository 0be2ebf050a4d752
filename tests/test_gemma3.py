"""Gemma 3 text models (Gemma3ForCausalLM) in and out of mtjax, checked against transformers itself:
tiny random models made by its Gemma3TextConfig and save_pretrained, never hard-coded numbers.

- float32 logits equal transformers' (1e-4) with sliding and full layers and sequences longer than
  the window, both when the scan steps over whole repeats of the layer pattern and when the layer
  count is not a multiple of it (a per-layer lax.cond), on packed rows too;
- the window, the sliding layers' own RoPE base and query_pre_attn_scalar each matter;
- decoding with the KV cache equals the forward without one past the window;
- export -> transformers -> import: the same logits; config.json round trip.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
import hf_models  # noqa: E402  (needs torch)

TOL = 1e-4
SEQ = 16
WINDOW = 4
# layer types -> the scan's shape: a whole number of pattern repeats, or not (lax.cond per layer)
CASES = {"repeats": ["sliding_attention", "full_attention"] * 2,
         "remainder": ["sliding_attention", "sliding_attention", "full_attention",
                       "sliding_attention"]}


def _config(layer_types: list[str]):
  import transformers
  return transformers.Gemma3TextConfig(
      vocab_size=hf_models.VOCAB, hidden_size=32, intermediate_size=64,
      num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=WINDOW,
      layer_types=layer_types, query_pre_attn_scalar=24, bos_token_id=1, eos_token_id=2,
      pad_token_id=0, rope_parameters={
          "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})


def _make(directory: pathlib.Path, layer_types: list[str], seed: int = 0):
  """A random Gemma3ForCausalLM (norm weights non-zero) and a BPE tokenizer in `directory`."""
  import torch
  import transformers

  from mtjax.data.tokenizer import train_bpe
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(_config(layer_types)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0, 0.3 if "norm" in name else 0.2)
  model.save_pretrained(directory)
  train_bpe(hf_models.CORPUS, hf_models.VOCAB, directory)
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("gemma3")
  cache: dict[str, tuple[pathlib.Path, object]] = {}

  def get(case: str):
    if case not in cache:
      cache[case] = (root / case, _make(root / case, CASES[case]))
    return cache[case]
  return get


def _tokens(batch: int = 2, length: int = SEQ, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, hf_models.VOCAB, (batch, length))


def _decoder_logits(directory, tokens, segment_ids=None, positions=None, **spec_changes):
  import jax
  from flax import nnx

  from mtjax.model import pretrained
  tokens = np.asarray(tokens, np.int32)
  segment_ids = np.ones_like(tokens) if segment_ids is None else segment_ids
  positions = (np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
               if positions is None else positions)
  spec = dataclasses.replace(pretrained.spec_for(directory), **spec_changes)
  params, graphdef = pretrained.load_replicated(directory, spec)
  apply = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
  return np.asarray(apply(params, tokens, np.asarray(positions, np.int32),
                          np.asarray(segment_ids, np.int32)))


# ----------------------------------------------------------------------------- config


def test_model_fields(models):
  from mtjax.model import pretrained
  directory, _ = models("remainder")
  fields = pretrained.model_fields(directory)
  assert fields["layer_types"] == tuple(CASES["remainder"])
  assert (fields["sliding_window"], fields["rope_theta"], fields["rope_local_theta"]) == (
      WINDOW, 1_000_000.0, 100.0)
  assert fields["query_pre_attn_scalar"] == 24 and fields["head_dim"] == 16
  assert fields["tie_embeddings"] and fields["qk_norm"] and fields["activation"] == "gelu_tanh"
  assert fields["norm_plus_one"] and fields["post_norms"] and fields["embed_scale"]
  spec = pretrained.spec_for(directory)
  assert spec.kinds() == (True, True, False, True) and spec.period() == 3
  assert pretrained.spec_for(models("repeats")[0]).period() == 2


def test_model_fields_legacy_keys(tmp_path):
  """Hub configs of the older form: sliding_window_pattern, rope_theta, rope_local_base_freq."""
  from mtjax.model import pretrained
  config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 7,
            "intermediate_size": 64, "vocab_size": 128, "sliding_window": 8,
            "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
  (tmp_path / "config.json").write_text(json.dumps(config))
  fields = pretrained.model_fields(tmp_path)
  assert fields["layer_types"] == tuple(["sliding_attention", "sliding_attention",
                                         "full_attention"] * 2 + ["sliding_attention"])
  assert (fields["rope_theta"], fields["rope_local_theta"]) == (1e6, 1e4)
  assert (fields["rope_type"], fields["rope_scaling"]) == ("linear", {"factor": 8.0})
  assert (fields["head_dim"], fields["query_pre_attn_scalar"], fields["tie_embeddings"]) == (
      256, 256, True)


@pytest.mark.parametrize("key", ["final_logit_softcapping", "attn_logit_softcapping"])
def test_model_fields_refuses_softcapping(tmp_path, key):
  from mtjax.errors import BadInputError
  from mtjax.model import pretrained
  config = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 128, key: 30.0}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(BadInputError, match=key):
    pretrained.model_fields(tmp_path)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_transformers(models, case):
  from mtjax.model.pretrained import forward
  directory, model = models(case)
  tokens = _tokens()
  assert tokens.shape[1] > WINDOW
  ref = hf_models.logits(model, tokens)
  got = forward(directory, tokens)
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_rows_match_transformers_per_segment(models, case):
  directory, model = models(case)
  tokens, segment_ids, positions = hf_models.packed_rows(_tokens(seed=1), [(9, 4, 3), (7, 8)])
  ref = hf_models.packed_reference(model, tokens, segment_ids)
  got = _decoder_logits(directory, tokens, segment_ids, positions)
  real = segment_ids != 0
  np.testing.assert_allclose(got[real], ref[real], rtol=0, atol=TOL)


@pytest.mark.parametrize("change", [dict(sliding_window=0), dict(rope_local_theta=0.0),
                                    dict(query_pre_attn_scalar=0.0), dict(layer_types=())])
def test_each_gemma_switch_matters(models, change):
  """Turning one switch off moves the logits far from transformers': parity would catch it."""
  directory, model = models("remainder")
  tokens = _tokens()
  ref = hf_models.logits(model, tokens)
  assert np.abs(_decoder_logits(directory, tokens, **change) - ref).max() > 100 * TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_remat_and_grad_run(models, case):
  """Either scan under remat: the same logits, finite non-zero gradients for every layer."""
  import jax
  from flax import nnx

  from mtjax.model import pretrained
  directory, _ = models(case)
  tokens = _tokens()
  ref = _decoder_logits(directory, tokens)
  np.testing.assert_allclose(_decoder_logits(directory, tokens, remat="full"), ref, atol=1e-5)
  spec = dataclasses.replace(pretrained.spec_for(directory), remat="dots")
  params, graphdef = pretrained.load_replicated(directory, spec)
  t = np.asarray(tokens, np.int32)
  pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), t.shape)
  loss = lambda p: nnx.merge(graphdef, p)(t, pos, np.ones_like(t)).mean()
  grads = pretrained._flat(jax.grad(loss)(params))
  for path, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
    if path.startswith("layers/"):
      assert (np.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0).all(), path


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decoding_matches_forward_past_the_window(models, case):
  """Prefill then one token at a time with the KV cache: every step's logits equal the forward
  without a cache, far past the window."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mtjax.model import init_cache, pretrained
  directory, _ = models(case)
  spec = pretrained.spec_for(directory)
  params, graphdef = pretrained.load_replicated(directory, spec)
  tokens = np.asarray(_tokens(length=SEQ), np.int32)
  full = _decoder_logits(directory, tokens)
  prefill = 5
  cache = init_cache(spec, tokens.shape[0], SEQ)
  step = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p)(t, pos, jnp.ones_like(t), c))
  pos = np.broadcast_to(np.arange(prefill, dtype=np.int32), (2, prefill))
  logits, cache = step(params, tokens[:, :prefill], pos, cache)
  np.testing.assert_allclose(np.asarray(logits), full[:, :prefill], atol=TOL)
  for i in range(prefill, SEQ):
    logits, cache = step(params, tokens[:, i:i + 1], np.full((2, 1), i, np.int32), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, i], atol=TOL)


def test_greedy_generation_matches_transformers(models):
  import torch

  import mtjax
  directory, model = models("remainder")
  loaded = mtjax.load(directory)
  prompt = np.random.RandomState(3).randint(3, hf_models.VOCAB, 6)
  new = 12
  with torch.no_grad():
    out = model.generate(torch.as_tensor(prompt[None], dtype=torch.long),
                         attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                         do_sample=False, max_new_tokens=new, pad_token_id=0)
  ref = out[0, len(prompt):].numpy().tolist()
  eos = model.generation_config.eos_token_id
  if eos in ref:
    ref = ref[:ref.index(eos) + 1]
  logits = hf_models.logits(model, np.concatenate([prompt, ref])[None])[0]
  steps = logits[len(prompt) - 1:len(prompt) - 1 + len(ref)]
  top2 = np.sort(steps, axis=-1)[:, -2:]
  near = (top2[:, 1] - top2[:, 0]) < 1e-3
  n = int(np.argmax(near)) if near.any() else len(ref)
  got = loaded.generate_ids([prompt], max_new_tokens=new, temperature=0)[0].tolist()
  if len(got) < new:
    got = got + [eos]
  assert n >= 5 and got[:n] == ref[:n], (got, ref)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_round_trip_with_transformers(models, tmp_path, case):
  """mtjax params (changed from the source's) -> export -> transformers and mtjax agree; the
  re-imported parameters and config are the exported ones exactly."""
  import jax

  from mtjax.model import pretrained
  directory, _ = models(case)
  spec = pretrained.spec_for(directory)
  params, _ = pretrained.load_replicated(directory, spec)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                        params)
  out = tmp_path / "export"
  config = pretrained.hf_config(spec, bos_id=1, eos_id=2, pad_id=0)
  pretrained.export(params, spec, out, config=config, tokenizer_dir=directory, progress=False)
  again = pretrained.spec_for(out)
  assert again == spec
  back, _ = pretrained.load_replicated(out, again)
  flat, flat_back = pretrained._flat(params), pretrained._flat(back)
  assert set(flat) == set(flat_back)
  for path in flat:
    np.testing.assert_array_equal(np.asarray(flat_back[path]), np.asarray(flat[path]), path)
  tokens = _tokens(length=12)
  import torch
  import transformers
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  assert type(theirs).__name__ == "Gemma3ForCausalLM"
  ref = hf_models.logits(theirs, tokens)
  got = pretrained.forward(out, tokens)
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
  assert np.abs(got - pretrained.forward(directory, tokens)).max() > 1e-3


def test_export_from_scratch_config_loads_in_transformers(tmp_path):
  """A Gemma-3-shaped mtjax model never loaded from HF: its config.json alone makes a
  transformers model with the same logits."""
  import jax
  import torch
  import transformers
  from flax import nnx

  from mtjax.config import ModelConfig
  from mtjax.model import Decoder, ModelSpec, pretrained
  cfg = ModelConfig(d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=48, vocab_size=128, dtype="float32", tie_embeddings=True,
                    sliding_window=3, layer_types=("sliding_attention", "full_attention",
                                                   "sliding_attention"),
                    rope_theta=50_000.0, rope_local_theta=500.0, activation="gelu_tanh",
                    norm_plus_one=True, post_norms=True, embed_scale=True, qk_norm=True,
                    query_pre_attn_scalar=12.0)
  spec = ModelSpec.from_config(cfg, 128, "float32")
  model = Decoder(spec, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model))
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)
  out = tmp_path / "scratch"
  pretrained.export(params, spec, out, config=pretrained.hf_config(spec), progress=False)
  assert pretrained.spec_for(out) == spec
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  tokens = _tokens(length=10)
  np.testing.assert_allclose(pretrained.forward(out, tokens), hf_models.logits(theirs, tokens),
                             rtol=0, atol=TOL)


def test_train_from_pretrained_then_export_loads_in_transformers(models, tmp_path):
  """`mtjax train` from a Gemma 3 directory (its fields from config.json), `mtjax export`: the
  export is a Gemma3ForCausalLM whose logits transformers and mtjax agree on, changed by training."""
  from conftest import DEMO

  from mtjax import cli
  from mtjax.model import pretrained
  source, _ = models("remainder")
  workdir, out = tmp_path / "run", tmp_path / "export"
  assert cli.main(["train", "--config", f"{DEMO}:tiny", f"--config.model.pretrained={source}",
                   "--config.train.steps=2", "--config.train.progress=false",
                   "--workdir", str(workdir)]) == 0
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Gemma3ForCausalLM"]
  assert config["layer_types"] == CASES["remainder"]
  assert pretrained.spec_for(out) == pretrained.spec_for(source)
  import torch
  import transformers
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  tokens = _tokens(length=12)
  got = pretrained.forward(out, tokens)
  np.testing.assert_allclose(got, hf_models.logits(theirs, tokens), rtol=0, atol=TOL)
  assert np.abs(got - pretrained.forward(source, tokens)).max() > 1e-3


@pytest.mark.parametrize("implementation", ["reference", "splash", "triton"])
def test_attention_scale_reaches_every_kernel(implementation):
  """query_pre_attn_scalar's scale, given to attend: equal to pre-scaling q under the default
  H ** -0.5 (the Pallas kernels interpreted on CPU; cuDNN needs a GPU)."""
  import warnings

  import jax.numpy as jnp

  from mtjax.model import attention
  rng = np.random.default_rng(0)
  b, length, n, k, h = 1, 128, 2, 1, 16
  q, key, v = (jnp.asarray(rng.normal(size=(b, length, heads, h)), jnp.float32)
               for heads in (n, k, k))
  seg = jnp.ones((b, length), jnp.int32)
  scale = 24 ** -0.5
  attention._warned.clear()
  with warnings.catch_warnings():
    warnings.filterwarnings("error", "attention .* falls back")
    got = attention.attend(q, key, v, seg, implementation=implementation, scale=scale)
  want = attention.attend(q * (scale * h ** 0.5), key, v, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
