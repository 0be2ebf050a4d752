"""Tokenizers. Byte-level by default: no download, every UTF-8 string round-trips."""

from __future__ import annotations

import dataclasses

import numpy as np


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

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
    return data.decode("utf-8", errors="replace")


def get(name: str) -> ByteTokenizer:
  if name == "byte":
    return ByteTokenizer()
  raise ValueError(f"unknown tokenizer {name!r}")
