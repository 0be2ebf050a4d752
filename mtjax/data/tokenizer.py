"""Tokenizers: byte-level (default, no download), a local HuggingFace tokenizer.json, or a local
SentencePiece model. `data.tokenizer` is "byte", "hf:<path/to/tokenizer.json>" or
"spm:<path/to/model>". Every tokenizer exposes the same special tokens (pad/bos/eos ids): the
loader adds BOS and EOS itself, so `encode` never adds them. `Tokenizer` is the interface the
loader, evaluation and CLI use.

data.format=chat (`for_data`) wraps an HF tokenizer whose directory has a chat template in a
`ChatTokenizer`: each example is then the prompt rendered as a user turn with the generation
prompt, and the target followed by the template's end-of-turn text (`encode_example`); the
end-of-turn token is its EOS and where generation stops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

from mtjax.errors import BadInputError


class Tokenizer(Protocol):
  """What every tokenizer exposes. `encode` adds no special tokens; `decode` stops at the first
  EOS and drops special tokens; `count(text)` is `len(encode(text))`, possibly cheaper."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def bos_id(self) -> int: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def stop_ids(self) -> tuple[int, ...]: ...  # generation ends at any of these (eos_id first)
  def encode(self, text: str) -> np.ndarray: ...
  def count(self, text: str) -> int: ...
  def decode(self, ids: Iterable[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """Ids 0..2 are PAD, BOS, EOS; byte b is id b + 3."""

  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  offset: int = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.offset

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.eos_id,)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

  def count(self, text: str) -> int:
    return len(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
    return data.decode("utf-8", errors="replace")


_BOS = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>")
_EOS = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>")
_PAD = ("<pad>", "[PAD]", "<|pad|>")


def _token_name(value: object) -> str | None:
  """tokenizer_config.json writes a special token as a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _ids(value: object) -> list[int]:
  if isinstance(value, bool) or value is None:
    return []
  if isinstance(value, int):
    return [value]
  return [int(v) for v in value] if isinstance(value, list) else []


class HfTokenizer:
  """A local (or gs://) HuggingFace `tokenizer.json` (the `tokenizers` package; nothing is
  downloaded). `path` may be the file or an HF model directory holding it. BOS, EOS and PAD come
  from the directory's tokenizer_config.json, generation_config.json and config.json when they
  name them, else from the usual token names; generation stops at any of the EOS ids they give
  (`stop_ids`: e.g. Llama 3 instruct's <|eot_id|> beside <|end_of_text|>)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    given = epath.Path(path)
    file = given / "tokenizer.json" if given.is_dir() else given
    if not file.exists():
      raise BadInputError("data.tokenizer", f"file not found: {file}")
    self._tok = Tokenizer.from_str(file.read_text())
    vocab = self._tok.get_vocab(with_added_tokens=True)
    configs = {}
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
      sibling = file.parent / name
      if sibling.exists():
        try:
          configs[name] = json.loads(sibling.read_text())
        except ValueError as e:
          raise BadInputError(str(sibling), f"not valid JSON ({e})") from None
    tok_cfg = configs.get("tokenizer_config.json", {})
    id_cfgs = [configs.get("generation_config.json", {}), configs.get("config.json", {})]

    def named(key: str) -> int | None:
      name = _token_name(tok_cfg.get(f"{key}_token"))
      if name is not None and name not in vocab:
        raise BadInputError(str(file.parent / "tokenizer_config.json"),
                            f"{key}_token {name!r} is not in the vocabulary of {file}")
      return vocab[name] if name is not None else None

    def configured(key: str) -> list[int]:
      for cfg in id_cfgs:
        ids = _ids(cfg.get(f"{key}_token_id"))
        if ids:
          return ids
      return []

    def by_names(names: Sequence[str]) -> int | None:
      return next((vocab[n] for n in names if n in vocab), None)

    def pick(key: str, names: Sequence[str]) -> int | None:
      for found in (named(key), next(iter(configured(key)), None), by_names(names)):
        if found is not None:
          return found
      return None

    bos, eos = pick("bos", _BOS), pick("eos", _EOS)
    for key, found, names in (("bos", bos, _BOS), ("eos", eos, _EOS)):
      if found is None:
        raise BadInputError("data.tokenizer", f"{file} has no {key.upper()} token (looked in "
                            f"its configs and for {', '.join(names)})")
    assert bos is not None and eos is not None
    self.bos_id: int = bos
    self.eos_id: int = eos
    pad = pick("pad", _PAD)
    self.pad_id: int = self.eos_id if pad is None else pad
    self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *configured("eos")]))
    self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
    # What a chat template sees (as transformers passes tokenizer_config's special tokens).
    self.special_tokens: dict[str, str] = {
        f"{key}_token": name for key in ("bos", "eos", "pad", "unk")
        if (name := _token_name(tok_cfg.get(f"{key}_token"))) is not None}
    for key, found in (("bos", self.bos_id), ("eos", self.eos_id)):
      self.special_tokens.setdefault(f"{key}_token", self._tok.id_to_token(found) or "")
    self.chat_template: str | None = _chat_template(file.parent, tok_cfg)
    # Whether text is BOS + ids (tokenizer_config's add_bos_token; absent: yes). Training prompts
    # always get BOS; this is for raw prompts to a model loaded without a run (mtjax generate).
    self.add_bos: bool = bool(tok_cfg.get("add_bos_token", True))
    self.source = str(given)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def count(self, text: str) -> int:
    return len(self.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    ids = _until_stop([int(i) for i in ids], self.stop_ids)
    return self._tok.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])


def _chat_template(directory: epath.Path, tok_cfg: dict[str, Any]) -> str | None:
  """tokenizer_config.json's chat_template (a string, or a list of {name, template}: the one
  named "default"), else the directory's chat_template.jinja; None when there is none."""
  template = tok_cfg.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default", next(iter(named.values()), None))
  if isinstance(template, str) and template:
    return template
  jinja = directory / "chat_template.jinja"
  if jinja.exists():
    return jinja.read_text() or None
  return None


_MARK = "MTJAXTARGETMARK"  # assistant content that no template changes


class ChatTokenizer:
  """data.format=chat: an HF tokenizer whose examples go through its chat template (rendered as
  transformers' apply_chat_template renders it). An example is two pieces: the prompt as a user
  turn with the generation prompt (`prompt_ids`; the template adds BOS itself where it has one),
  and the target followed by the template's end-of-turn text (`target_ids`). The end-of-turn
  token is `eos_id` (the loss's EOS, and the first of `stop_ids`, where generation stops).

  The end of a turn is derived once: the conversation [user, assistant] rendered without the
  generation prompt is the prompt's rendering, then what the template writes before the
  assistant content (usually nothing), the content, then the end-of-turn text."""

  def __init__(self, base: Tokenizer):
    template = getattr(base, "chat_template", None)
    if not isinstance(base, HfTokenizer) or not template:
      what = (f"the tokenizer {base.source!r} has no chat_template (tokenizer_config.json or "
              "chat_template.jinja)" if isinstance(base, HfTokenizer)
              else f"the {type(base).__name__} has no chat template")
      raise BadInputError("data.format", f"chat needs a tokenizer with a chat template, and {what}; "
                          "use data.format=plain or a tokenizer (model directory) with one")
    self.base: HfTokenizer = base
    self.template: str = template
    self._compiled: Any = None
    prompt = self.render_prompt(_MARK)
    full = self.render([{"role": "user", "content": _MARK},
                        {"role": "assistant", "content": _MARK}], add_generation_prompt=False)
    rest = full[len(prompt):]
    if not full.startswith(prompt) or _MARK not in rest:
      raise BadInputError("data.format", "the chat template's rendering of [user, assistant] does "
                          "not begin with its rendering of the user turn and generation prompt, "
                          "so the target cannot follow the prompt as a second piece")
    self.before_target, _, self.end_of_turn = rest.partition(_MARK)
    eot = [int(i) for i in base.encode(self.end_of_turn)]
    if not eot:
      raise BadInputError("data.format", "the chat template writes nothing after an assistant "
                          "turn, so there is no end-of-turn token to stop generation at")
    added = set(base._tok.get_added_tokens_decoder())
    self._eot_len = len(eot)
    self._stop_at = next((i for i, t in enumerate(eot) if t in added), 0)
    self.eos_id: int = eot[self._stop_at]
    self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *base.stop_ids]))
    self.bos_id: int = base.bos_id
    self.pad_id: int = base.pad_id
    self.vocab_size: int = base.vocab_size

  def __getstate__(self) -> dict[str, Any]:  # the compiled template does not pickle
    return {**self.__dict__, "_compiled": None}

  def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if self._compiled is None:
      self._compiled = _compile(self.template)
    try:
      return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.base.special_tokens)
    except Exception as e:  # a template error (raise_exception) or a bad template
      raise BadInputError("data.format", f"the chat template failed to render "
                          f"({type(e).__name__}: {e})") from None

  def render_prompt(self, prompt: str) -> str:
    return self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)

  def prompt_ids(self, prompt: str) -> np.ndarray:
    return self.base.encode(self.render_prompt(prompt))

  def target_ids(self, target: str) -> np.ndarray:
    return self.base.encode(self.before_target + target + self.end_of_turn)

  def generated_count(self, target: str) -> int:
    """Tokens generated before the end-of-turn token for this target."""
    return len(self.target_ids(target)) - self._eot_len + self._stop_at

  def encode(self, text: str) -> np.ndarray:
    return self.base.encode(text)

  def count(self, text: str) -> int:
    return self.base.count(text)

  def decode(self, ids: Iterable[int]) -> str:
    ids = _until_stop([int(i) for i in ids], self.stop_ids)
    return self.base._tok.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])


def _compile(template: str) -> Any:
  """The template compiled as transformers compiles chat templates (sandboxed, trim_blocks,
  lstrip_blocks, loop controls, raise_exception, tojson without HTML escaping, strftime_now)."""
  import datetime

  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
             sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise BadInputError("data.format", f"the chat template does not compile ({e})") from None


@dataclasses.dataclass(frozen=True)
class SlotTokenizer:
  """model.soft_prompt: a tokenizer whose prompt piece ends with `slots` copies of `slot_id` (a
  spare id past the base's vocabulary, so no text encodes to it), where the model puts the task's
  soft prompt. Every length rule counts the slots as prompt tokens; data.truncate=prompt_left
  cuts a prompt from its left, so the slots (at its end) go last."""

  base: Any
  slots: int
  slot_id: int

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size

  @property
  def pad_id(self) -> int:
    return self.base.pad_id

  @property
  def bos_id(self) -> int:
    return self.base.bos_id

  @property
  def eos_id(self) -> int:
    return self.base.eos_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.base.stop_ids

  def encode(self, text: str) -> np.ndarray:
    return self.base.encode(text)

  def count(self, text: str) -> int:
    return self.base.count(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.base.decode([i for i in ids if i != self.slot_id])


def with_soft_prompt(tokenizer: Tokenizer, length: int, model_vocab: int) -> Tokenizer:
  """`tokenizer` with `length` soft-prompt slots per prompt (SlotTokenizer); the slot id is the
  first id past the tokenizer's vocabulary, which must be below the model's (`model_vocab`)."""
  if not length:
    return tokenizer
  slot_id = int(tokenizer.vocab_size)
  if slot_id >= model_vocab:
    raise BadInputError("model.soft_prompt.length", f"soft prompts need a spare token id: the "
                        f"tokenizer's vocabulary ({tokenizer.vocab_size}) fills the model's "
                        f"({model_vocab}); set model.vocab_size above it")
  return SlotTokenizer(tokenizer, length, slot_id)


def encode_example(tokenizer: Tokenizer, prompt: str, target: str) -> tuple[np.ndarray, np.ndarray]:
  """An example's two pieces: [BOS] prompt and target [EOS]; under data.format=chat
  (ChatTokenizer) the rendered user turn with the generation prompt, and the target with the
  end-of-turn text. The loss covers the second piece. With soft prompts (SlotTokenizer) the
  prompt piece ends with the slots."""
  if isinstance(tokenizer, SlotTokenizer):
    p, t = encode_example(tokenizer.base, prompt, target)
    return np.concatenate([p, np.full(tokenizer.slots, tokenizer.slot_id, np.int32)]).astype(np.int32), t
  if isinstance(tokenizer, ChatTokenizer):
    return tokenizer.prompt_ids(prompt), tokenizer.target_ids(target)
  return (np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32),
          np.concatenate([tokenizer.encode(target), [tokenizer.eos_id]]).astype(np.int32))


def prompt_count(tokenizer: Tokenizer, prompt: str) -> int:
  """The prompt piece's tokens but one (plain: the prompt's tokens, BOS not counted)."""
  if isinstance(tokenizer, SlotTokenizer):
    return prompt_count(tokenizer.base, prompt) + tokenizer.slots
  if isinstance(tokenizer, ChatTokenizer):
    return len(tokenizer.prompt_ids(prompt)) - 1
  return tokenizer.count(prompt)


def target_count(tokenizer: Tokenizer, target: str) -> int:
  """The target piece's tokens but one (plain: the target's tokens, EOS not counted)."""
  if isinstance(tokenizer, SlotTokenizer):
    return target_count(tokenizer.base, target)
  if isinstance(tokenizer, ChatTokenizer):
    return len(tokenizer.target_ids(target)) - 1
  return tokenizer.count(target)


def generated_count(tokenizer: Tokenizer, target: str) -> int:
  """Tokens generated for this target before the stop token (plain: its tokens)."""
  if isinstance(tokenizer, SlotTokenizer):
    return generated_count(tokenizer.base, target)
  if isinstance(tokenizer, ChatTokenizer):
    return tokenizer.generated_count(target)
  return tokenizer.count(target)


def _until_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
  for i, token in enumerate(ids):
    if token in stop_ids:
      return ids[:i]
  return ids


class SentencePieceTokenizer:
  """A local SentencePiece model file."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise BadInputError("data.tokenizer", f"{path} defines no BOS/EOS pieces (train it with "
                          "bos_id and eos_id >= 0)")
    self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.stop_ids: tuple[int, ...] = (self.eos_id,)
    self.vocab_size: int = self._sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def count(self, text: str) -> int:
    return len(self._sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._sp.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])


def get(name: str) -> Tokenizer:
  """"byte" | "hf:<tokenizer.json or an HF directory>" | "spm:<model>"; a bad name or file is a
  BadInputError."""
  if name == "byte":
    return ByteTokenizer()
  kind, _, path = name.partition(":")
  if kind not in ("hf", "spm") or not path:
    raise BadInputError("data.tokenizer", f"expected byte, hf:<path> or spm:<path>, got {name!r}")
  if kind == "spm" and not os.path.isfile(path):
    raise BadInputError("data.tokenizer", f"file not found: {path}")
  if kind == "hf" and not epath.Path(path).exists():
    raise BadInputError("data.tokenizer", f"file not found: {path}")
  try:
    return HfTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)
  except BadInputError:
    raise
  except Exception as e:  # a file that is not a tokenizer of that kind
    raise BadInputError("data.tokenizer", f"cannot load {path} as {kind} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def fingerprint(name: str) -> str:
  """What a tokenizer's token ids mean, as a sha256 of the files that define them (hf:
  tokenizer.json, spm: the model file; "byte": the name itself). A resume compares it: the same
  path with other contents would make every stored id another piece of text."""
  kind, _, path = name.partition(":")
  if kind == "hf":
    where = epath.Path(path)
    files = [where / "tokenizer.json"] if where.is_dir() else [where]
  elif kind == "spm":
    files = [epath.Path(path)]
  else:
    return name
  digest = hashlib.sha256()
  for file in files:
    digest.update(file.read_bytes())
  return digest.hexdigest()


def for_data(data: Any) -> Tokenizer:
  """The tokenizer of a DataConfig: data.tokenizer, under data.format=chat a ChatTokenizer (a
  BadInputError naming data.format when it has no chat template)."""
  tokenizer = get(data.tokenizer)
  if getattr(data, "format", "plain") == "chat":
    return ChatTokenizer(tokenizer)
  return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str | os.PathLike) -> str:
  """Trains a byte-level-free BPE tokenizer on `texts` and writes an HF tokenizer directory
  (tokenizer.json, tokenizer_config.json) with <pad>=0, <s>=1, </s>=2, <unk>=3; every character
  of `texts` is in the vocabulary. Returns the directory (use it as data.tokenizer=hf:DIR)."""
  from tokenizers import Tokenizer as HfTokenizerModel
  from tokenizers import decoders, models, trainers

  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  texts = list(texts)
  alphabet = sorted({c for t in texts for c in t})
  if vocab_size < len(specials) + len(alphabet):
    raise BadInputError("vocab_size", f"{vocab_size} is less than the {len(specials)} special "
                        f"tokens plus the {len(alphabet)} characters of the texts")
  tok = HfTokenizerModel(models.BPE(unk_token="<unk>"))
  tok.decoder = decoders.Fuse()  # type: ignore[attr-defined]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(texts, trainer)
  out = epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tokenizer.json").write_text(tok.to_str())
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
       "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000}, indent=2))
  return str(out)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, out: str | os.PathLike) -> str:
  """Trains a byte-level BPE (HF tokenizers, as GPT-2 and Llama 3: any text encodes, nothing is
  unknown) on `texts`. Specials <pad>=0, <s>=1 (BOS), </s>=2 (EOS). `out` is a directory
  (tokenizer.json + tokenizer_config.json) or a file path ending in .json (that file alone; the
  specials are found by name). Returns the path to use as data.tokenizer=hf:PATH."""
  from tokenizers import Tokenizer as HfTokenizerModel
  from tokenizers import decoders, models, pre_tokenizers, trainers

  specials = ["<pad>", "<s>", "</s>"]
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(specials) + len(alphabet):
    raise BadInputError("--vocab", f"{vocab_size} is less than the {len(specials)} special "
                        f"tokens plus the {len(alphabet)} byte symbols of a byte-level BPE")
  tok = HfTokenizerModel(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[attr-defined]
  tok.decoder = decoders.ByteLevel()  # type: ignore[attr-defined]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(texts, trainer)
  path = epath.Path(out)
  if str(out).endswith(".json"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str())
    return str(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.json").write_text(tok.to_str())
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
       "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000}, indent=2))
  return str(path)


def for_config(config: Any) -> Tokenizer:
  """The tokenizer of a run: for_data(config.data), with model.soft_prompt's slots (SlotTokenizer)."""
  tokenizer = for_data(config.data)
  length = config.model.soft_prompt.length
  if not length:
    return tokenizer
  model_vocab = config.model.vocab_size or -(-tokenizer.vocab_size // 128) * 128
  return with_soft_prompt(tokenizer, length, model_vocab)
