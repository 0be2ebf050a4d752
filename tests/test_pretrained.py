"""HF checkpoints in and out (mtjax.model.pretrained), each checked against transformers itself:
tiny random Llama / Mistral / Qwen2 / Qwen3 models made by transformers' own config classes and
save_pretrained (tests/hf_models.py), never hard-coded numbers.

- parity of logits (both config.json RoPE forms), on packed rows too, and the sliding window's effect;
- greedy generation token for token;
- train from a pretrained directory, export, and transformers loading the export (also sharded);
- streaming a checkpoint into a (fsdp, tensor) mesh, and in bfloat16;
- bad input: one `error:` line and exit 2, the workdir untouched;
- config.json parsing of the RoPE forms and of Qwen2's sliding-window switch.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest
from conftest import DEMO, REPO, tiny_config

pytest.importorskip("torch")
pytest.importorskip("transformers")
import hf_models  # noqa: E402  (needs torch)

from mtjax.errors import BadInputError  # noqa: E402

TOL = 1e-4
SEQ = 16


def _tokens(batch: int = 2, length: int = SEQ, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, hf_models.VOCAB, (batch, length))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
  return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def family_models(hf_root):
  """family -> (directory, transformers model); each built on first use, once per module."""
  cache: dict[str, tuple[pathlib.Path, object]] = {}

  def get(family: str):
    if family not in cache:
      directory = hf_root / family
      cache[family] = (directory, hf_models.make(family, directory))
    return cache[family]
  return get


@contextlib.contextmanager
def _session_lock(path: pathlib.Path):
  """A lock shared by this session's xdist workers (their basetemps share a parent)."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _make_hf_checkpoint():
  """bench/make_hf_checkpoint.py (bench/ is not a package), imported by path."""
  spec = importlib.util.spec_from_file_location("make_hf_checkpoint",
                                                REPO / "bench" / "make_hf_checkpoint.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(DIR, W, E): bench's tiny HF checkpoint, a 2-step run from it, and `mtjax export` of the run.
  Made once per session: xdist workers share it through their basetemps' common parent."""
  from mtjax import cli
  root = tmp_path_factory.getbasetemp().parent / "pretrained-roundtrip"
  root.mkdir(exist_ok=True)
  source, workdir, export = root / "tiny-llama", root / "run", root / "export"
  with _session_lock(root.parent / "pretrained-roundtrip.lock"):
    if not (root / "done").exists():
      for p in (source, workdir, export):
        shutil.rmtree(p, ignore_errors=True)
      _make_hf_checkpoint().write(str(source), "tiny")
      assert cli.main(["train", "--config", f"{DEMO}:tiny", f"--config.model.pretrained={source}",
                       "--config.train.steps=2", "--config.train.progress=false",
                       "--workdir", str(workdir)]) == 0
      assert cli.main(["export", "--workdir", str(workdir), "--out", str(export)]) == 0
      (root / "done").write_text("")
  return source, workdir, export


def _auto_model(directory):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(str(directory),
                                                           dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- 1. parity


@pytest.mark.parametrize("form", ["legacy", "rope_parameters"])
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_forward_matches_transformers(family_models, hf_root, family, form):
  from mtjax.model.pretrained import forward
  source, model = family_models(family)
  directory = hf_models.with_rope_form(source, hf_root / f"{family}-{form}", form)
  config = json.loads((directory / "config.json").read_text())
  assert ("rope_parameters" in config) == (form == "rope_parameters")
  tokens = _tokens()
  ref = hf_models.logits(model, tokens)
  got = forward(directory, tokens)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def _packed_rows():
  """Two rows of SEQ tokens: three and two sequences, each from position 0, padding at the end."""
  return hf_models.packed_rows(_tokens(seed=1), [(5, 6, 3), (7, 6)])


def _decoder_logits(directory, tokens, segment_ids, positions, **spec_changes):
  """mtjax's Decoder (as load_replicated gives it, nnx.merge) on packed rows."""
  import dataclasses

  import jax
  from flax import nnx

  from mtjax.model import pretrained
  spec = dataclasses.replace(pretrained.spec_for(directory), **spec_changes)
  params, graphdef = pretrained.load_replicated(directory, spec)
  apply = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
  return np.asarray(apply(params, *(np.asarray(x, np.int32)
                                    for x in (tokens, positions, segment_ids))))


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_packed_rows_match_transformers_per_segment(family_models, family):
  directory, model = family_models(family)
  tokens, segment_ids, positions = _packed_rows()
  ref = hf_models.packed_reference(model, tokens, segment_ids)
  got = _decoder_logits(directory, tokens, segment_ids, positions)
  real = segment_ids != 0
  np.testing.assert_allclose(got[real], ref[real], rtol=0, atol=TOL)


def test_mistral_sliding_window_matters(family_models):
  """Disabling the window (4 < the sequences) moves the logits far from transformers': the
  parity tests above would catch a window that is ignored."""
  directory, model = family_models("mistral")
  assert json.loads((directory / "config.json").read_text())["sliding_window"] == 4
  tokens, segment_ids, positions = _packed_rows()
  ref = hf_models.packed_reference(model, tokens, segment_ids)
  real = segment_ids != 0
  windowed = _decoder_logits(directory, tokens, segment_ids, positions)
  full = _decoder_logits(directory, tokens, segment_ids, positions, sliding_window=0)
  assert np.abs(windowed[real] - ref[real]).max() <= TOL
  assert np.abs(full[real] - ref[real]).max() > 100 * TOL
  # Only positions past the window differ: up to 4 tokens into a segment nothing is cut off.
  early = real & (positions < 4)
  np.testing.assert_allclose(full[early], ref[early], rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- 2. generation


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_greedy_generation_matches_transformers(family_models, family):
  import torch

  import mtjax
  directory, model = family_models(family)
  loaded = mtjax.load(directory)
  eos = model.generation_config.eos_token_id
  assert loaded.tokenizer.eos_id == eos == 2 and set(loaded.tokenizer.stop_ids) == {eos}
  new = 20
  for seed in (3, 4):
    prompt = np.random.RandomState(seed).randint(3, hf_models.VOCAB, 6)
    with torch.no_grad():
      out = model.generate(torch.as_tensor(prompt[None], dtype=torch.long),
                           attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                           do_sample=False, max_new_tokens=new, pad_token_id=0)
    ref = out[0, len(prompt):].numpy().tolist()
    if eos in ref:  # transformers stops at EOS (and pads after it)
      ref = ref[:ref.index(eos) + 1]
    # The reference's top-2 margins along its own sequence: compare up to the first near-tie.
    logits = hf_models.logits(model, np.concatenate([prompt, ref])[None])[0]
    steps = logits[len(prompt) - 1:len(prompt) - 1 + len(ref)]
    top2 = np.sort(steps, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    assert (np.argmax(steps, axis=-1) == np.asarray(ref)).all()
    n = int(np.argmax(margins < 1e-3)) if (margins < 1e-3).any() else len(ref)
    got = loaded.generate_ids([prompt], max_new_tokens=new, temperature=0)[0].tolist()
    if len(got) < new:  # mtjax stopped at a stop token, which it leaves out
      got = got + [eos]
    assert n >= 5, f"too many near-ties to compare ({margins})"
    assert got[:n] == ref[:n], (got, ref, margins)
    if n == len(ref):
      assert got == ref


def test_greedy_generation_stops_where_transformers_does(family_models, hf_root):
  """An extra EOS id in generation_config.json (as Llama 3 instruct has): both stop at it."""
  import torch

  import mtjax
  source, model = family_models("llama")
  prompt = np.random.RandomState(3).randint(3, hf_models.VOCAB, 6)
  kwargs = dict(attention_mask=torch.ones((1, len(prompt)), dtype=torch.long), do_sample=False,
                max_new_tokens=20, pad_token_id=0)
  with torch.no_grad():
    free = model.generate(torch.as_tensor(prompt[None]), **kwargs)[0, len(prompt):].tolist()
  stop = next(t for t in free[3:] if t not in free[:3])  # a token it reaches only after 3 steps
  directory = hf_root / "llama-stop"
  shutil.copytree(source, directory)
  generation = json.loads((directory / "generation_config.json").read_text())
  generation["eos_token_id"] = [2, stop]
  (directory / "generation_config.json").write_text(json.dumps(generation))
  with torch.no_grad():
    ref = model.generate(torch.as_tensor(prompt[None]), eos_token_id=[2, stop],
                         **kwargs)[0, len(prompt):].tolist()
  assert ref == free[:free.index(stop) + 1]
  loaded = mtjax.load(directory)
  assert set(loaded.tokenizer.stop_ids) == {2, stop}
  got = loaded.generate_ids([prompt], max_new_tokens=20, temperature=0)[0].tolist()
  assert got + [stop] == ref  # mtjax leaves the stop token out


# ----------------------------------------------------------------------------- 3. round trip


def test_export_round_trip_with_transformers(trained):
  from mtjax.model.pretrained import forward
  source, _, export = trained
  tokens = _tokens(length=12)
  ref = hf_models.logits(_auto_model(export), tokens)
  got = forward(export, tokens)
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
  assert np.abs(got - forward(source, tokens)).max() > 1e-3  # training changed them


def test_exported_tokenizer_loads_in_transformers(trained):
  import transformers

  from mtjax.data import tokenizer as tokenizer_lib
  _, _, export = trained
  theirs = transformers.AutoTokenizer.from_pretrained(str(export))
  ours = tokenizer_lib.get(f"hf:{export}")
  for text in ("reverse: hello -> olleh", "addition: 12+34 -> 46", "the big red dog chases a cat"):
    assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text).tolist()
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
      ours.bos_id, ours.eos_id, ours.pad_id)
  config = json.loads((export / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)


def test_export_in_shards_loads_in_transformers(trained, tmp_path):
  from mtjax.loading import export_run
  from mtjax.model import tensorfile
  _, workdir, export = trained
  out = tmp_path / "sharded"
  files = export_run(workdir, out, max_shard_bytes=40_000)
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  n = len(shards)
  assert n >= 3 and not (out / "model.safetensors").exists()
  assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert set(shards) | {"model.safetensors.index.json"} <= set(files)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  assert set(index["weight_map"]) == set(tensorfile.tensor_names(export))
  tokens = _tokens(length=12)
  ref = hf_models.logits(_auto_model(export), tokens)
  np.testing.assert_allclose(hf_models.logits(_auto_model(out), tokens), ref, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 4. sharded load


def _single_device_params(directory, param_dtype="float32"):
  from mtjax.model import pretrained
  from mtjax.model.pretrained import _flat
  spec = pretrained.spec_for(directory, param_dtype=param_dtype)
  params, _ = pretrained.load_replicated(directory, spec)
  return {k: np.asarray(v) for k, v in _flat(params).items()}


@pytest.mark.multidevice
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_streaming_load_into_fsdp_tensor_mesh(family_models, family):
  import jax

  from mtjax.model.pretrained import _flat
  from mtjax.train import setup as setup_lib
  from mtjax.train.state import param_shardings
  directory, _ = family_models(family)
  config = tiny_config(**{"model.pretrained": str(directory), "mesh.fsdp": 4, "mesh.tensor": 2})
  run = setup_lib.build(config)
  assert dict(run.mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 4, "tensor": 2}
  expected = _single_device_params(directory)
  _, _, wanted = param_shardings(run.mesh, run.spec)
  params, wanted = _flat(run.state.params), _flat(wanted)
  assert set(params) == set(expected)
  split = 0
  for path, x in params.items():
    assert isinstance(x.sharding, jax.sharding.NamedSharding), path
    assert x.sharding.is_equivalent_to(wanted[path], x.ndim), (path, x.sharding, wanted[path])
    split += not x.sharding.is_fully_replicated
    for shard in x.addressable_shards:  # every device holds its own rows of the HF tensor
      np.testing.assert_array_equal(np.asarray(shard.data), expected[path][shard.index],
                                    err_msg=path)
    np.testing.assert_array_equal(np.asarray(x), expected[path], err_msg=path)
  assert split >= len(params) // 2, "most parameters should be split over the mesh"
  for path in ("token_embed", "layers/attn/q", "layers/attn/k", "layers/mlp/down"):
    assert not params[path].sharding.is_fully_replicated, path


@pytest.mark.multidevice
def test_streaming_load_bfloat16(family_models):
  import jax.numpy as jnp
  import ml_dtypes

  from mtjax.model.pretrained import _flat
  from mtjax.train import setup as setup_lib
  directory, _ = family_models("llama")
  config = tiny_config(**{"model.pretrained": str(directory), "model.param_dtype": "bfloat16",
                          "mesh.fsdp": 4, "mesh.tensor": 2})
  run = setup_lib.build(config)
  assert run.spec.param_dtype == "bfloat16" and run.spec.tie_embeddings
  expected = _single_device_params(directory)
  params = _flat(run.state.params)
  assert set(params) == set(expected)
  for path, x in params.items():
    assert x.dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(np.asarray(x), expected[path].astype(ml_dtypes.bfloat16),
                                  err_msg=path)


# ----------------------------------------------------------------------------- 5. bad input


@pytest.fixture(scope="module")
def bench_tiny(tmp_path_factory):
  """bench/make_hf_checkpoint.py's tiny checkpoint (no torch), once per module."""
  directory = tmp_path_factory.mktemp("bench") / "tiny-llama"
  _make_hf_checkpoint().write(str(directory), "tiny")
  return directory


@pytest.fixture
def bad_dir(tmp_path, bench_tiny):
  """A copy of bench's tiny checkpoint to break, and an existing workdir whose files must survive."""
  def make():
    directory = tmp_path / "model"
    shutil.copytree(bench_tiny, directory)
    return directory
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("an earlier run's notes\n")
  (workdir / "metrics").mkdir()
  (workdir / "metrics" / "old.jsonl").write_text('{"step": 1}\n')
  return make, workdir


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _train(capsys, directory, workdir, *extra, check=True):
  from mtjax import cli
  before = _snapshot(workdir)
  capsys.readouterr()
  rc = cli.main(["train", "--config", f"{DEMO}:tiny", f"--config.model.pretrained={directory}",
                 "--config.train.steps=1", "--config.train.progress=false",
                 "--workdir", str(workdir), *(["--check"] if check else []), *extra])
  err = capsys.readouterr().err
  after = _snapshot(workdir)
  for name, data in before.items():  # nothing in the existing workdir is lost or changed
    assert after.get(name) == data, name
  return rc, err


def _one_error(rc, err) -> str:
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
  return lines[0]


def test_bad_input_missing_config_json(bad_dir, capsys):
  make, workdir = bad_dir
  directory = make()
  (directory / "config.json").unlink()
  line = _one_error(*_train(capsys, directory, workdir))
  assert "config.json" in line and "missing" in line


@pytest.mark.parametrize("check", [True, False], ids=["check", "train"])
def test_bad_input_missing_weights(bad_dir, capsys, check):
  make, workdir = bad_dir
  directory = make()
  (directory / "model.safetensors").unlink()
  line = _one_error(*_train(capsys, directory, workdir, check=check))
  assert "no weights" in line and "safetensors" in line


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors",
                                   "model.bin", 7])
def test_bad_input_index_naming_a_file_outside_the_directory(bad_dir, capsys, shard):
  """model.safetensors.index.json may only name *.safetensors files in the directory itself."""
  make, workdir = bad_dir
  directory = make()
  (directory / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.embed_tokens.weight": shard}}))
  line = _one_error(*_train(capsys, directory, workdir, check=True))
  assert "model.safetensors.index.json" in line and "inside this directory" in line


def test_bad_input_unknown_architecture(bad_dir, capsys):
  from mtjax.model.pretrained import ARCHITECTURES
  make, workdir = bad_dir
  directory = make()
  config = json.loads((directory / "config.json").read_text())
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (directory / "config.json").write_text(json.dumps(config))
  line = _one_error(*_train(capsys, directory, workdir))
  assert "GPT2LMHeadModel" in line
  assert all(name in line for name in ARCHITECTURES)


def test_bad_input_conflicting_shape(bad_dir, capsys):
  make, workdir = bad_dir
  directory = make()
  assert json.loads((directory / "config.json").read_text())["hidden_size"] == 32
  line = _one_error(*_train(capsys, directory, workdir, "--config.model.d_model=64"))
  assert "d_model" in line and "64" in line and "hidden_size" in line and "32" in line
  rc, err = _train(capsys, directory, workdir, "--config.model.d_model=32")
  assert rc == 0 and "error:" not in err, err


def _rewrite_weights(directory, change):
  """model.safetensors rewritten through tensorfile.write with `change(name, array)` (None drops)."""
  from mtjax.model import tensorfile
  tf = tensorfile.TensorFile(directory / "model.safetensors")
  arrays = {n: np.array(tf.read(n)) for n in tf.entries}
  arrays = {n: a for n, a in ((n, change(n, a)) for n, a in arrays.items()) if a is not None}
  (directory / "model.safetensors").unlink()
  tensorfile.write(directory, [(n, a.shape, a.dtype) for n, a in arrays.items()],
                   arrays.__getitem__)


@pytest.mark.parametrize("check", [True, False], ids=["check", "train"])
def test_bad_input_missing_tensor(bad_dir, capsys, check):
  make, workdir = bad_dir
  directory = make()
  gone = "model.layers.1.mlp.up_proj.weight"
  _rewrite_weights(directory, lambda n, a: None if n == gone else a)
  line = _one_error(*_train(capsys, directory, workdir, check=check))
  assert gone in line and "missing" in line


@pytest.mark.parametrize("check", [True, False], ids=["check", "train"])
def test_bad_input_misshaped_tensor(bad_dir, capsys, check):
  make, workdir = bad_dir
  directory = make()
  name = "model.layers.0.self_attn.k_proj.weight"  # [kv_heads * head_dim, d] = [16, 32]
  _rewrite_weights(directory, lambda n, a: a[:8] if n == name else a)
  line = _one_error(*_train(capsys, directory, workdir, check=check))
  assert name in line and "[8, 32]" in line and "[16, 32]" in line


def test_bad_input_tokenizer_larger_than_embedding(bad_dir, capsys):
  from mtjax.data import tokenizer as tokenizer_lib
  make, workdir = bad_dir
  directory = make()
  vocab = tokenizer_lib.get(f"hf:{directory}").vocab_size
  config = json.loads((directory / "config.json").read_text())
  config["vocab_size"] = vocab - 8
  (directory / "config.json").write_text(json.dumps(config))
  line = _one_error(*_train(capsys, directory, workdir))
  assert line.startswith("error: data.tokenizer: ") and str(vocab) in line and str(vocab - 8) in line
  # generate and mtjax.load refuse it the same way (ids past the embedding were clamped silently)
  from mtjax import cli
  rc = cli.main(["generate", "--model", str(directory), "--prompt", "ab", "--max_new_tokens", "2"])
  line = _one_error(rc, capsys.readouterr().err)
  assert f"the tokenizer has {vocab} tokens, more than the {vocab - 8} rows" in line


# ----------------------------------------------------------------------------- 6. config parsing


def _fields(tmp_path, **config):
  from mtjax.model.pretrained import model_fields
  base = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32,
              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=64, vocab_size=128)
  (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
  return model_fields(tmp_path)


def _transformers_rope(tmp_path) -> dict:
  """transformers' own reading of the same config.json (its normalized rope_parameters)."""
  import transformers
  return dict(transformers.AutoConfig.from_pretrained(str(tmp_path)).rope_parameters)


def test_model_fields_legacy_rope_scaling_with_type(tmp_path):
  fields = _fields(tmp_path, rope_theta=40_000.0, rope_scaling={"type": "linear", "factor": 4.0})
  assert fields["rope_type"] == "linear" and fields["rope_scaling"] == {"factor": 4.0}
  assert fields["rope_theta"] == 40_000.0
  theirs = _transformers_rope(tmp_path)
  assert (theirs["rope_type"], theirs["rope_theta"], theirs["factor"]) == (
      fields["rope_type"], fields["rope_theta"], fields["rope_scaling"]["factor"])


def test_model_fields_rope_parameters(tmp_path):
  rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  fields = _fields(tmp_path, rope_parameters=rope)
  theirs = _transformers_rope(tmp_path)
  assert fields["rope_type"] == theirs["rope_type"] == "llama3"
  assert fields["rope_theta"] == theirs["rope_theta"] == 500_000.0
  assert fields["rope_scaling"] == {k: float(theirs[k]) for k in (
      "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def test_model_fields_default_rope_theta(tmp_path):
  fields = _fields(tmp_path)
  theirs = _transformers_rope(tmp_path)
  assert fields["rope_type"] == theirs["rope_type"] == "default"
  assert fields["rope_theta"] == theirs["rope_theta"] and fields["rope_scaling"] == {}


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_model_fields_unsupported_rope_type(tmp_path, where):
  rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
  if where == "rope_parameters":
    rope["rope_theta"] = 10_000.0
  with pytest.raises(BadInputError, match="yarn"):
    _fields(tmp_path, **{where: rope})


@pytest.mark.parametrize("use", [False, True])
def test_model_fields_qwen2_use_sliding_window(tmp_path, use):
  config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096,
                use_sliding_window=use, max_window_layers=0 if use else 28)
  fields = _fields(tmp_path, **config)
  assert fields["sliding_window"] == (4096 if use else 0)
  assert fields["qkv_bias"] and not fields["out_bias"] and not fields["qk_norm"]


@pytest.mark.parametrize("flags, field", [
    (["--temperature", "nan"], "--temperature/--top_k/--top_p"),
    (["--temperature", "inf"], "--temperature/--top_k/--top_p"),
    (["--top_p", "nan"], "--temperature/--top_k/--top_p"),
    (["--max_new_tokens", "1000000000"], "--max_new_tokens"),
    (["--max_new_tokens", "0"], "--max_new_tokens"),
])
def test_bad_generation_settings_exit_2_before_loading(flags, field, capsys, tmp_path):
  from mtjax import cli
  rc = cli.main(["generate", "--model", str(tmp_path / "not-loaded"), "--prompt", "ab", *flags])
  line = _one_error(rc, capsys.readouterr().err)
  assert line.startswith(f"error: {field}: expected")


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 32.7}, "hidden_size: expected an integer, got 32.7"),
    ({"hidden_size": "32"}, "hidden_size: expected an integer, got '32'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers: expected at least 1, got 0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers: expected at least 1, got -1"),
    ({"num_attention_heads": 0}, "num_attention_heads: expected at least 1, got 0"),
    ({"num_attention_heads": 3}, "num_attention_heads 3 is not a multiple of num_key_value_heads 2"),
    ({"vocab_size": True}, "vocab_size: expected an integer, got True"),
    ({"sliding_window": -5}, "sliding_window: expected at least 0, got -5"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps: expected a finite number, got nan"),
    ({"rope_theta": "abc"}, "rope_theta: expected a finite number, got 'abc'"),
    ({"rope_theta": 0}, "rope_theta: expected a positive number, got 0"),
    ({"rope_scaling": "linear"}, "rope_scaling: expected a JSON object, got 'linear'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}},
     "rope_scaling.factor: expected a finite number, got nan"),
])
def test_model_fields_refuse_values_of_the_wrong_type_or_range(tmp_path, changes, message):
  """config.json values are type- and range-checked, the key named (never truncated: 32.7 -> 32,
  never a traceback)."""
  from mtjax.errors import BadInputError
  with pytest.raises(BadInputError) as e:
    _fields(tmp_path, **changes)
  assert message in str(e.value) and str(e.value).startswith(str(tmp_path / "config.json"))


def test_a_config_json_that_is_a_directory_is_bad_input(tmp_path):
  from mtjax.errors import BadInputError
  from mtjax.model.pretrained import model_fields
  (tmp_path / "config.json").mkdir()
  with pytest.raises(BadInputError, match="config.json: cannot be read"):
    model_fields(tmp_path)


# ----------------------------------------------------------------------------- fuzz: 300 cases

FUZZ_VALUES = [0, -1, 1.5, 32.7, "abc", "32", None, True, [], {}, float("nan"), float("inf"),
               "double", "plus_one"]
FUZZ_KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
             "intermediate_size", "vocab_size", "head_dim", "rms_norm_eps", "rope_theta",
             "sliding_window", "tie_word_embeddings", "rope_scaling", "architectures"]


def _header(path):
  import struct
  raw = path.read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + size]), raw[8 + size:]


def _write_header(path, header, data):
  import struct
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _mutate(directory, rng):
  """One random mutation of a copy of an HF directory: a config.json field, a safetensors header
  entry, or a model.safetensors.index.json. Returns its description."""
  kind = rng.choice(["config", "header", "index"], p=[0.4, 0.4, 0.2])
  if kind == "config":
    config = json.loads((directory / "config.json").read_text())
    key, value = str(rng.choice(FUZZ_KEYS)), FUZZ_VALUES[int(rng.integers(len(FUZZ_VALUES)))]
    old = config.get(key)
    if value == "double":
      value = old * 2 if isinstance(old, (int, float)) and not isinstance(old, bool) else 64
    elif value == "plus_one":
      value = old + 1 if isinstance(old, int) and not isinstance(old, bool) else 1
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    return f"config {key}={value!r}"
  if kind == "header":
    path = directory / "model.safetensors"
    header, data = _header(path)
    name = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
    field = str(rng.choice(["dtype", "shape", "data_offsets"]))
    entry = header[name]
    if field == "dtype":
      entry["dtype"] = str(rng.choice(["F16", "BF16", "F32", "I8", "BOOL", "F64", "X"]))
    elif field == "shape":
      if entry["shape"]:
        entry["shape"][int(rng.integers(len(entry["shape"])))] += int(rng.integers(-2, 3))
    else:
      entry["data_offsets"][int(rng.integers(2))] += int(rng.integers(-8, 9))
    _write_header(path, header, data)
    return f"header {name}.{field}={entry[field]!r}"
  header, _ = _header(directory / "model.safetensors")
  names = sorted(k for k in header if k != "__metadata__")
  target = str(rng.choice(["model.safetensors", "../model.safetensors", "/etc/passwd",
                           "missing.safetensors", "model.bin"]))
  weight_map = {n: target for n in names}
  if rng.random() < 0.3:
    weight_map.pop(names[int(rng.integers(len(names)))])
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return f"index -> {target}"


def test_pretrained_directory_fuzz_loads_exactly_or_exits_2(bench_tiny, tmp_path):
  """300 seeded mutations of an HF directory (config.json fields of wrong types and ranges,
  safetensors header entries, shard indexes): each either reads every tensor the model needs
  exactly as the original holds it, or raises BadInputError (the CLI's one line, exit 2); never
  another exception (a traceback), never a silently different tensor."""
  import shutil

  from mtjax.errors import BadInputError
  from mtjax.model import pretrained
  reference_spec = pretrained.spec_for(bench_tiny)
  reference = pretrained.check_tensors(bench_tiny, reference_spec)
  originals = {t.name: reference.file(t.name).read(t.name) for t in pretrained.hf_tensors(reference_spec)}
  outcomes = {"loaded": 0, "refused": 0}
  for seed in range(300):
    rng = np.random.default_rng(seed)
    directory = tmp_path / f"case{seed}"
    shutil.copytree(bench_tiny, directory)
    what = _mutate(directory, rng)
    try:
      spec = pretrained.spec_for(directory)
      index = pretrained.check_tensors(directory, spec)
      tensors = {t.name: index.file(t.name).read(t.name) for t in pretrained.hf_tensors(spec)}
    except BadInputError:
      outcomes["refused"] += 1
    else:
      outcomes["loaded"] += 1
      for name, array in tensors.items():  # loaded: every tensor exactly the original's
        assert name in originals and array.dtype == originals[name].dtype, (seed, what, name)
        np.testing.assert_array_equal(array, originals[name], err_msg=f"{seed}: {what}")
    shutil.rmtree(directory)
  assert outcomes["loaded"] > 20 and outcomes["refused"] > 100, outcomes  # both kinds exercised
