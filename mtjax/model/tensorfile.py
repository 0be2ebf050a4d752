"""Safetensors files read by slices and written by streaming, on local disks and gs://.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
raw little-endian, C-ordered tensor bytes. Reading only a range of a tensor's first axis is a
seek and one read, so a process fetches just the rows its devices hold and the whole model is
never in one host's memory; writing goes tensor by tensor, so export never holds a whole shard.
The `safetensors` package needs a local path and (to write) every tensor of a file at once,
which is why this small module exists.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from mtjax.errors import BadInputError

# Model weights only: integer and boolean tensors are consistent on their own but are no
# weights mtjax can load (quantized or mask tensors would be cast to float and trained on).
DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the format's own limit


class TensorFile:
  """One .safetensors file: its header, and reads of whole tensors or row ranges."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    try:
      with self.path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
          raise ValueError("shorter than its 8-byte header length")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER:
          raise ValueError(f"header length {size} is beyond the format's limit")
        header = json.loads(f.read(size))
        file_size = f.seek(0, 2)
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise BadInputError(str(self.path), f"not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
      raise BadInputError(str(self.path), "not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
      raise BadInputError(str(self.path), "__metadata__: expected a JSON object")
    self.metadata: dict[str, str] = metadata
    self._data_start = 8 + size
    self.entries: dict[str, dict[str, Any]] = header
    data_bytes = file_size - self._data_start
    for name, entry in header.items():
      self._check_entry(name, entry, data_bytes)
    # The format's own rule: the tensors tile the data region, no holes, no overlaps (an
    # overlap would hand one tensor another's bytes).
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    ends = [0] + [end for _, end in spans]
    if any(begin != ends[i] for i, (begin, _) in enumerate(spans)) or ends[-1] != data_bytes:
      raise BadInputError(str(self.path), f"the tensors' data_offsets do not tile its "
                          f"{data_bytes} data bytes (holes or overlaps)")

  def _check_entry(self, name: str, entry: Any, data_bytes: int) -> None:
    """A header entry that cannot lie: dtype in DTYPES, shape non-negative integers, offsets
    inside the data region and exactly the bytes the shape and dtype need (a header declaring F16
    over F32 bytes, or negative offsets, would otherwise read garbage)."""
    def bad(why: str) -> BadInputError:
      return BadInputError(str(self.path), f"tensor {name}: {why}")

    if not isinstance(entry, dict):
      raise bad("expected a JSON object with dtype, shape and data_offsets")
    if entry.get("dtype") not in DTYPES:
      raise bad(f"unsupported dtype {entry.get('dtype')!r} (model weights: {', '.join(DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
      raise bad(f"shape {shape!r}: expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
      raise bad(f"data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end")
    need = math.prod(shape) * np.dtype(DTYPES[entry["dtype"]]).itemsize
    if offsets[1] - offsets[0] != need:
      raise bad(f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape {shape} "
                f"of {entry['dtype']} needs {need}")
    if offsets[1] > data_bytes:
      raise bad(f"data_offsets {offsets} run past the file's {data_bytes} data bytes")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(DTYPES[self.entries[name]["dtype"]])

  def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor, or rows [start, stop) of its first axis, as a numpy array (its own dtype)."""
    entry, dtype = self.entries[name], self.dtype(name)
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if not shape:
      rows = None
    row_bytes = dtype.itemsize * math.prod(shape[1:]) if shape else dtype.itemsize
    start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
    offset = self._data_start + begin + start * row_bytes
    count = (stop - start) * row_bytes
    if offset + count > self._data_start + end:
      raise BadInputError(str(self.path), f"tensor {name}: rows {start}:{stop} run past its data")
    with self.path.open("rb") as f:
      f.seek(offset)
      data = f.read(count)
    if len(data) != count:
      raise BadInputError(str(self.path), f"tensor {name}: file truncated ({len(data)} of "
                          f"{count} bytes)")
    array = np.frombuffer(data, dtype=dtype)
    if not np.isfinite(array.astype(np.float32, copy=False) if dtype.itemsize == 2 else array).all():
      raise BadInputError(str(self.path), f"tensor {name}: NaN or Inf weights (rows "
                          f"{start}:{stop}); the model would train or decode on them silently")
    return array.reshape(((stop - start),) + shape[1:] if shape else ())


_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\.safetensors")


class TensorIndex:
  """Every tensor of a checkpoint directory: model.safetensors, or the shards named by
  model.safetensors.index.json (or any *.safetensors files, when there is no index)."""

  def __init__(self, directory: epath.PathLike):
    directory = epath.Path(directory)
    index = directory / "model.safetensors.index.json"
    files: list[epath.Path]
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInputError(str(index), f"expected JSON with a weight_map ({e})") from None
      for shard in shards:  # file names inside this directory only (no ../, no absolute path)
        if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
          raise BadInputError(str(index), f"weight_map names {shard!r}: expected a "
                              "*.safetensors file name inside this directory")
      files = [directory / f for f in shards]
    else:
      files = sorted(directory.glob("*.safetensors"))
    if not files:
      raise BadInputError(str(directory), "no weights: expected model.safetensors, "
                          "model.safetensors.index.json or *.safetensors")
    self.files = {f.name: TensorFile(f) for f in files}
    self.where: dict[str, TensorFile] = {}
    for tf in self.files.values():
      for name in tf.entries:
        self.where[name] = tf

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def file(self, name: str) -> TensorFile:
    try:
      return self.where[name]
    except KeyError:
      raise BadInputError(name, "missing tensor: not in any safetensors file of the "
                          "checkpoint") from None


def write(directory: epath.PathLike, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
          fetch: Callable[[str], np.ndarray], *, max_shard_bytes: int = 5 * 10**9,
          metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes tensors (name, shape, dtype), fetching each one's array only when its turn comes.

  One file `model.safetensors` when everything fits in max_shard_bytes, else
  `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` (transformers'
  layout). Returns the file names written.
  """
  directory = epath.Path(directory)
  shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
  size = 0
  for name, shape, dtype in tensors:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, shape, dtype))
    size += nbytes
  n = len(shards)
  names = (["model.safetensors"] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  total = 0
  weight_map: dict[str, str] = {}
  for file_name, shard in zip(names, shards):
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in shard:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = file_name
    total += offset
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # aligns the data, as the reference writer does
    with (directory / file_name).open("wb") as f:
      f.write(struct.pack("<Q", len(encoded)))
      f.write(encoded)
      for name, shape, dtype in shard:
        array = np.ascontiguousarray(fetch(name), dtype=dtype)
        if array.shape != tuple(shape):
          raise ValueError(f"{name}: fetched shape {array.shape}, declared {shape}")
        f.write(array.tobytes())
  if n > 1:
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    names.append("model.safetensors.index.json")
  return names


def tensor_names(directory: epath.PathLike) -> Iterable[str]:
  return TensorIndex(directory).where.keys()
