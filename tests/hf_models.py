"""Tiny random HF checkpoints made by transformers itself (its config classes and save_pretrained):
the independent reference that tests/test_pretrained.py compares mtjax's import, generation and
export with. Needs torch and transformers (test dependencies)."""

from __future__ import annotations

import json
import pathlib
import shutil
import string

import numpy as np

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# The tokenizer every directory gets (mtjax.load and `mtjax train` need one): every printable
# character plus the demo tasks' words, at most VOCAB tokens.
CORPUS = [string.printable[:-2], "reverse: hello -> olleh", "addition: 12+34 -> 46",
          "grammar: the cat sees a dog .", "the a dog cat bird sees likes chases big small red"]


def _config(family: str):
  import transformers
  if family == "llama":  # llama3 RoPE scaling, tied embeddings
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
  if family == "mistral":  # a window shorter than the test sequences
    return transformers.MistralForCausalLM, transformers.MistralConfig(
        **COMMON, sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 20_000.0})
  if family == "qwen2":  # q/k/v biases
    return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 50_000.0})
  if family == "qwen3":  # q/k RMSNorm, head_dim != hidden / heads
    return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        **COMMON, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 30_000.0})
  raise ValueError(family)


def make(family: str, directory: pathlib.Path, seed: int = 0):
  """Writes a random `family` model (every parameter randomized: norms 1 + noise, biases
  non-zero) and a small BPE tokenizer to `directory`; returns the float32 torch model (eval)."""
  import torch

  from mtjax.data.tokenizer import train_bpe
  cls, config = _config(family)
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:  # biases
        p.normal_(0, 0.5)
      else:
        p.normal_(0, 0.2)
  model.save_pretrained(directory)
  train_bpe(CORPUS, VOCAB, directory)
  return model


def with_rope_form(source: pathlib.Path, out: pathlib.Path, form: str) -> pathlib.Path:
  """A copy of `source` whose config.json states RoPE as the legacy keys (rope_theta and
  rope_scaling at the top level, no rope_parameters) or as transformers 5's rope_parameters only."""
  if out.exists():
    return out
  shutil.copytree(source, out)
  config = json.loads((out / "config.json").read_text())
  params = dict(config.get("rope_parameters") or {})
  assert params, f"transformers wrote no rope_parameters: {config}"
  if form == "legacy":
    del config["rope_parameters"]
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = None if params.get("rope_type") == "default" else params
  else:
    assert form == "rope_parameters", form
    config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
  (out / "config.json").write_text(json.dumps(config, indent=2))
  return out


def logits(model, tokens) -> np.ndarray:
  """transformers' float32 logits for token ids [B, L] (each row one sequence)."""
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def packed_reference(model, tokens: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """transformers run separately on each packed segment, concatenated back into place (padding
  rows stay zero): the reference for a packed forward."""
  out = np.zeros(tokens.shape + (model.config.vocab_size,), np.float32)
  for b in range(tokens.shape[0]):
    for s in sorted(set(segment_ids[b].tolist()) - {0}):
      where = np.flatnonzero(segment_ids[b] == s)
      out[b, where] = logits(model, tokens[b, where][None])[0]
  return out


def packed_rows(tokens: np.ndarray, lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment_ids, positions) for rows packed with sequences of `lengths` per row (each
  from position 0), padding (token 0, segment 0) after them."""
  tokens = tokens.copy()
  segment_ids, positions = np.zeros_like(tokens), np.zeros_like(tokens)
  for b, row in enumerate(lengths):
    start = 0
    for s, n in enumerate(row, 1):
      segment_ids[b, start:start + n] = s
      positions[b, start:start + n] = np.arange(n)
      start += n
    tokens[b, start:] = 0
  return tokens, segment_ids, positions
