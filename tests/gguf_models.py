"""Tiny random Llama GGUF files written by the `gguf` package's own GGUFWriter, the way llama.cpp's
converter writes them: q/k rows permuted for its rope (convert_hf_to_gguf.py LlamaModel.permute,
copied here as the reference), 2-D weights in the chosen tensor type (norms F32), a byte-level BPE
vocabulary with merges, CONTROL tokens and one USER_DEFINED token, a ChatML template."""

from __future__ import annotations

import pathlib

import numpy as np

D, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 64, 4, 2, 16, 96, 2  # in-dims divisible by 32 (blocks)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
WORDS = ["the", "hello", "world", "ing", "in", "er", "an", "is", "def", "return"]
# Whitespace runs with merges of their own: where GPT-2's regex and a digit split first differ.
RUNS = ["ĠĠ", "ĠĠĠ", "ĊĊ", "ĊĊĊĊ", "ĉĉ"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's table, as openai/gpt-2 encoder.py writes it."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def vocabulary() -> tuple[list[str], list[int], list[str]]:
  """(tokens, token types, merges): control tokens first (as SmolLM2's file), the 256 bytes, then
  the tokens the merges build (each word, also with a leading space 'Ġ')."""
  alphabet = [bytes_to_unicode()[b] for b in range(256)]
  tokens = CONTROL + alphabet
  types = [3] * len(CONTROL) + [1] * 256
  merges: list[str] = []
  for word in WORDS:
    for spelled in (word, "Ġ" + word):
      current = spelled[0]
      for ch in spelled[1:]:
        merged = current + ch
        if merged not in tokens:
          merges.append(f"{current} {ch}")
          tokens.append(merged)
          types.append(1)
        current = merged
  for run in RUNS:
    merges.append(f"{run[:-1]} {run[-1]}" if len(run) != 4 else f"{run[:2]} {run[2:]}")
    tokens.append(run)
    types.append(1)
  tokens += USER_DEFINED
  types += [4] * len(USER_DEFINED)
  return tokens, types, merges


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_weights(vocab: int, seed: int = 0, tied: bool = True, d: int = D,
               head_dim: int = HEAD_DIM, mlp: int = MLP) -> dict[str, np.ndarray]:
  """Random weights in transformers' layout and names ([out, in])."""
  D, HEAD_DIM, MLP = d, head_dim, mlp  # noqa: N806  (the module's shape, unless given)
  rng = np.random.RandomState(seed)
  w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, D)),
       "model.norm.weight": 1 + rng.normal(0, 0.1, D)}
  if not tied:
    w["lm_head.weight"] = rng.normal(0, 0.2, (vocab, D))
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, D)
    w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, D)
    w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.2, (HEADS * HEAD_DIM, D))
    w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.2, (KV_HEADS * HEAD_DIM, D))
    w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.2, (KV_HEADS * HEAD_DIM, D))
    w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (D, HEADS * HEAD_DIM))
    w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.2, (MLP, D))
    w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.2, (MLP, D))
    w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.2, (D, MLP))
  return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
  if hf in GGUF_NAMES:
    return GGUF_NAMES[hf]
  _, _, i, *rest = hf.split(".")
  return f"blk.{i}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"


# Where each K-quant block keeps its float16 scale(s) (ggml's block_q*_K structs).
K_QUANT_HALVES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(tensor_type: str, rows: int, cols: int, rng: np.random.RandomState) -> np.ndarray:
  """Random K-quant data for a [rows, cols] tensor (gguf-py cannot quantize to K types): random
  bytes, each block's float16 scales set to small finite values. [rows, bytes per row] uint8."""
  import gguf
  qt = gguf.GGMLQuantizationType[tensor_type]
  block, size = gguf.GGML_QUANT_SIZES[qt]
  raw = rng.randint(0, 256, (rows, cols // block, size)).astype(np.uint8)
  for at in K_QUANT_HALVES[tensor_type]:
    halves = (rng.uniform(0.002, 0.02, (rows, cols // block)) * rng.choice([-1, 1], (rows, cols // block)))
    raw[:, :, at:at + 2] = halves.astype(np.float16).view(np.uint8).reshape(rows, cols // block, 2)
  return raw.reshape(rows, -1)


def write(path: pathlib.Path, tensor_type: str = "F32", *, seed: int = 0, tied: bool = True,
          arch: str = "llama", drop_key: str | None = None, pre: str = "smollm",
          raw_type: tuple[str, str] | None = None, d: int = D, head_dim: int = HEAD_DIM,
          mlp: int = MLP, drop_tensor: str | None = None) -> dict[str, np.ndarray]:
  """Writes a tiny GGUF; returns its HF-layout float32 weights (before quantization; for a K-quant
  type, the 2-D tensors hold random blocks instead). drop_key: leave that metadata key out;
  raw_type: (tensor, type) stored as zero bytes of that type (a type mtjax does not read)."""
  import gguf
  from gguf import quants
  tokens, types, merges = vocabulary()
  weights = hf_weights(len(tokens), seed, tied, d, head_dim, mlp)
  rng = np.random.RandomState(seed + 1)
  D, HEAD_DIM, MLP = d, head_dim, mlp  # noqa: N806
  writer = gguf.GGUFWriter(str(path), arch)
  meta = {
      f"{arch}.block_count": LAYERS, f"{arch}.context_length": 256, f"{arch}.embedding_length": D,
      f"{arch}.feed_forward_length": MLP, f"{arch}.attention.head_count": HEADS,
      f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.rope.freq_base": 10_000.0,
      f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.dimension_count": HEAD_DIM,
      f"{arch}.vocab_size": len(tokens)}
  for key, value in meta.items():
    if key == drop_key:
      continue
    if isinstance(value, float):
      writer.add_float32(key, value)
    else:
      writer.add_uint32(key, value)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_add_bos_token(False)
  writer.add_chat_template(TEMPLATE)
  for hf, w in weights.items():
    name = gguf_name(hf)
    if name == drop_tensor:
      continue
    if ".attn_q." in name:
      w = permute(w, HEADS, HEADS)
    elif ".attn_k." in name:
      w = permute(w, HEADS, KV_HEADS)
    if raw_type is not None and name == raw_type[0]:
      qt = gguf.GGMLQuantizationType[raw_type[1]]
      block, size = gguf.GGML_QUANT_SIZES[qt]
      raw = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
      writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
    elif w.ndim == 2 and tensor_type in K_QUANT_HALVES:
      raw = random_blocks(tensor_type, w.shape[0], w.shape[1], rng)
      writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[tensor_type])
    elif w.ndim == 1 or tensor_type == "F32":
      writer.add_tensor(name, w)
    elif tensor_type == "F16":
      writer.add_tensor(name, w.astype(np.float16))
    else:
      qt = gguf.GGMLQuantizationType[tensor_type]
      writer.add_tensor(name, quants.quantize(w, qt), raw_dtype=qt)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return weights
