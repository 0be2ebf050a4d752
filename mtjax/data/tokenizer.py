"""Tokenizers: byte-level (default, no download), a local HuggingFace tokenizer.json, or a local
SentencePiece model. `data.tokenizer` is "byte", "hf:<path/to/tokenizer.json>" or
"spm:<path/to/model>". Every tokenizer exposes the same special tokens (pad/bos/eos ids): the
loader adds BOS and EOS itself, so `encode` never adds them. `Tokenizer` is the interface the
loader, evaluation and CLI use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

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


class HfTokenizer:
  """A local HuggingFace `tokenizer.json` (the `tokenizers` package; nothing is downloaded)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    self._tok = Tokenizer.from_file(path)
    vocab = self._tok.get_vocab(with_added_tokens=True)

    def find(names: Sequence[str]) -> int | None:
      return next((vocab[n] for n in names if n in vocab), None)

    def require(names: Sequence[str], what: str) -> int:
      found = find(names)
      if found is None:
        raise BadInputError("data.tokenizer", f"{path} has no {what.upper()} token (looked for "
                            f"{', '.join(names)})")
      return found

    self.bos_id: int = require(_BOS, "bos")
    self.eos_id: int = require(_EOS, "eos")
    pad = find(_PAD)
    self.pad_id: int = self.eos_id if pad is None else pad
    self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def count(self, text: str) -> int:
    return len(self.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._tok.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])


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
  """"byte" | "hf:<tokenizer.json>" | "spm:<model>"; a bad name or file is a BadInputError."""
  if name == "byte":
    return ByteTokenizer()
  kind, _, path = name.partition(":")
  if kind not in ("hf", "spm") or not path:
    raise BadInputError("data.tokenizer", f"expected byte, hf:<path> or spm:<path>, got {name!r}")
  if not os.path.isfile(path):
    raise BadInputError("data.tokenizer", f"file not found: {path}")
  try:
    return HfTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)
  except BadInputError:
    raise
  except Exception as e:  # a file that is not a tokenizer of that kind
    raise BadInputError("data.tokenizer", f"cannot load {path} as {kind} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
