"""Where a task's examples come from. Every source gives random access to a split's examples
(`Source`: load(split, seed, on_bad_record) -> Loaded).

- GeneratorSource: a Python function (split, seed) -> examples (in memory).
- JsonlSource: a user's JSONL files (UTF-8), with configurable instruction/prompt/target fields.
- ArrayRecordSource: ArrayRecord files whose records are JSON objects (read lazily).
- TfdsSource: a TFDS dataset in array_record format through `tfds.data_source` (no TensorFlow),
  built offline on first use by its builder.

A record that cannot be parsed is reported with file and line (or record index): the run stops
(`data.on_bad_record="stop"`, the default) or, for JSONL, skips it and counts it ("skip").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from etils import epath

from mtjax.errors import BadInputError
from mtjax.tasks import Example


@dataclasses.dataclass
class Loaded:
  examples: Sequence[Example]  # random access: len() and [i]
  skipped: int = 0  # bad records skipped (on_bad_record="skip")


class Source(Protocol):
  """What every source shares: a split's examples, loaded (or opened lazily) with random access.

  `seed` is for sources that generate their examples; the others ignore it (the pipeline
  shuffles). `on_bad_record` is "stop" (raise a BadInputError) or "skip" (count in `skipped`).
  """

  def load(self, split: str, seed: int, on_bad_record: str = "stop") -> Loaded: ...


@dataclasses.dataclass(frozen=True)
class Fields:
  """Which record fields make an Example. `instruction` is a literal used when the record has none."""

  prompt: str = "input"
  target: str = "target"
  instruction_field: str = "instruction"
  instruction: str = ""

  def example(self, record: Any) -> Example:
    if not isinstance(record, Mapping):
      raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    values = {}
    for key in (self.prompt, self.target):
      if key not in record:
        raise ValueError(f"missing field {key!r} (has {sorted(record)})")
      value = record[key]
      values[key] = value.decode("utf-8") if isinstance(value, bytes) else value
      if not isinstance(values[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    instruction = record.get(self.instruction_field, self.instruction)
    if isinstance(instruction, bytes):
      instruction = instruction.decode("utf-8")
    if not isinstance(instruction, str):  # a list would be str()'d into "['...']" and trained on
      raise ValueError(f"field {self.instruction_field!r} must be a string, got "
                       f"{type(instruction).__name__}")
    used = (self.prompt, self.target, self.instruction_field)
    meta = {k: v for k, v in record.items() if k not in used}  # for the scorer
    return Example(str(instruction), values[self.prompt], values[self.target], meta)


@dataclasses.dataclass(frozen=True)
class GeneratorSource:
  make: Callable[[str, int], Sequence[Example]]

  def load(self, split: str, seed: int, on_bad_record: str = "stop") -> Loaded:
    return Loaded(self.make(split, seed))


@dataclasses.dataclass(frozen=True)
class JsonlSource:
  files: Mapping[str, Sequence[str]]  # split -> paths
  fields: Fields = Fields()

  def load(self, split: str, seed: int, on_bad_record: str = "stop") -> Loaded:
    del seed  # order is the files' order; the pipeline shuffles
    if split not in self.files:
      raise BadInputError("data", f"JSONL task has no {split!r} split (has {sorted(self.files)})")
    examples, skipped = [], 0
    for path in self.files[split]:
      p = _readable_file(path, "a JSONL file")
      try:
        f = p.open("rb")
      except OSError as e:
        raise BadInputError(str(path), f"cannot be read ({e.strerror or e})") from None
      with f:
        for lineno, raw in enumerate(f, 1):
          if not raw.strip():
            continue
          if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows)
            raw = raw[3:]
          try:
            examples.append(self.fields.example(json.loads(raw.decode("utf-8"))))
          except (ValueError, UnicodeDecodeError, RecursionError) as e:
            if on_bad_record == "skip":
              skipped += 1
              continue
            raise BadInputError(f"{path}:{lineno}", f"bad record ({_one_line(e)}); set "
                                "data.on_bad_record=skip to skip and count such lines") from None
    if not examples:
      raise BadInputError(str(self.files[split][0]), f"no usable records in the {split!r} split")
    return Loaded(examples, skipped)


def _readable_file(path: str, what: str) -> epath.Path:
  """The path of a data file that exists and is a file (not a directory), or a BadInputError."""
  p = epath.Path(path)
  if not p.exists():
    raise BadInputError(str(path), "file not found")
  if p.is_dir():
    raise BadInputError(str(path), f"is a directory, expected {what}")
  return p


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:300] + ("..." if len(text) > 300 else "")


class Records(Protocol):
  """Random-access records (grain's and TFDS's array_record data sources)."""

  def __len__(self) -> int: ...
  def __getitem__(self, index: int, /) -> Any: ...


class _Decoded(Sequence[Example]):
  """Lazily decodes records of a random-access source into Examples."""

  def __init__(self, records: Records, fields: Fields, where: str,
               decode: Callable[[Any], Any]):
    self._records, self._fields, self._where, self._decode = records, fields, where, decode

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> Example:
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    try:
      return self._fields.example(self._decode(self._records[i]))
    except (ValueError, UnicodeDecodeError) as e:
      raise BadInputError(f"{self._where}#record {i}", f"bad record ({e})") from None


@dataclasses.dataclass(frozen=True)
class ArrayRecordSource:
  files: Mapping[str, Sequence[str]]  # split -> paths; each record a UTF-8 JSON object
  fields: Fields = Fields()

  def load(self, split: str, seed: int, on_bad_record: str = "stop") -> Loaded:
    import grain
    if split not in self.files:
      raise BadInputError("data", f"ArrayRecord task has no {split!r} split (has {sorted(self.files)})")
    paths = list(self.files[split])
    for path in paths:
      _readable_file(path, "an ArrayRecord file")
    # grain declares its base class under a platform.system() test pyright cannot evaluate, so the
    # type it sees is the Windows placeholder (no __len__/__getitem__).
    try:
      records = cast(Records, grain.sources.ArrayRecordDataSource(paths))
    except Exception as e:  # not ArrayRecord files, unreadable, ...: name them, no traceback
      raise BadInputError(",".join(paths), f"cannot be read as ArrayRecord files "
                          f"({type(e).__name__}: {_one_line(e)})") from None
    return Loaded(_Decoded(records, self.fields, ",".join(paths), lambda r: json.loads(r)))


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TFDS dataset (array_record), built into `data_dir` by `builder` on first use."""

  name: str  # e.g. "mtjax_structured/copy"
  builder: Callable[[str], Any]  # data_dir -> a tfds builder (its class registers the name)
  fields: Fields = Fields()

  def load(self, split: str, seed: int, on_bad_record: str = "stop") -> Loaded:
    del seed  # the suite's content is fixed by its builder version; the pipeline shuffles
    import tensorflow_datasets as tfds
    from mtjax.tasks import data_dir
    directory = data_dir()
    builder = self.builder(directory)
    if not builder.is_prepared():
      import sys
      print(f"building task suite {self.name} into {directory} (once)", file=sys.stderr)
      tfds.display_progress_bar(False)
      builder.download_and_prepare()
    # Typed for every form of `split` (a list or None give a list or dict); one name gives one.
    records = cast(Records, tfds.data_source(self.name, data_dir=directory, split=split))
    return Loaded(_Decoded(records, self.fields, f"tfds:{self.name}[{split}]", lambda r: r))
