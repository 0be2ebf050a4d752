"""Safetensors headers that lie are refused (exit 2), with the safetensors library's own reader
(safe_open) as the oracle: whatever it rejects, mtjax rejects; integer and boolean tensors, which
it reads, are refused by mtjax's weight dtypes."""

import json
import struct

import numpy as np
import pytest

from mtjax.errors import BadInputError
from mtjax.model.tensorfile import TensorFile

safetensors = pytest.importorskip("safetensors")


def _file(tmp_path, header, data: bytes):
  raw = json.dumps(header).encode()
  path = tmp_path / "model.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


def _valid():
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.ones(4, dtype=np.float32)
  header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
  return header, a.tobytes() + b.tobytes()


def _oracle_accepts(path) -> bool:
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        f.get_tensor(name)
    return True
  except Exception:  # noqa: BLE001  (any refusal counts)
    return False


def _ours_accepts(path) -> bool:
  try:
    tf = TensorFile(path)
    for name in tf.entries:
      tf.read(name)
    return True
  except BadInputError:
    return False


MUTATIONS = {
    "valid": lambda h: None,
    "negative_offset": lambda h: h["a"].update(data_offsets=[-8, 24]),
    "past_the_end": lambda h: h["b"].update(data_offsets=[24, 48]),
    "f16_over_f32_bytes": lambda h: h["a"].update(dtype="F16"),
    "shape_too_big": lambda h: h["a"].update(shape=[3, 3]),
    "string_dim": lambda h: h["a"].update(shape=["2", 3]),
    "string_offsets": lambda h: h["a"].update(data_offsets=["0", "24"]),
    "entry_not_object": lambda h: h.update(a=[1, 2]),
    "overlap": lambda h: h["b"].update(data_offsets=[8, 24], shape=[4]),
    "hole": lambda h: (h["a"].update(shape=[2, 2], data_offsets=[0, 16])),
    "metadata_not_object": lambda h: h.update(__metadata__=[1]),
    "unknown_dtype": lambda h: h["a"].update(dtype="F8_E9"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_lying_header_is_refused_whenever_safetensors_refuses_it(mutation, tmp_path):
  header, data = _valid()
  MUTATIONS[mutation](header)
  path = _file(tmp_path, header, data)
  oracle = _oracle_accepts(path)
  assert oracle == (mutation == "valid"), "the oracle itself"
  assert _ours_accepts(path) == oracle


def test_random_header_corruptions_agree_with_safetensors(tmp_path):
  """200 random edits of offsets and shapes: mtjax never accepts what safetensors refuses, and
  accepts what it accepts."""
  rng = np.random.default_rng(0)
  for i in range(200):
    header, data = _valid()
    name = str(rng.choice(["a", "b"]))
    if rng.random() < 0.5:
      header[name]["data_offsets"][int(rng.integers(2))] += int(rng.integers(-12, 13))
    else:
      shape = header[name]["shape"]
      shape[int(rng.integers(len(shape)))] += int(rng.integers(-2, 3))
    path = _file(tmp_path, header, data)
    assert _ours_accepts(path) == _oracle_accepts(path), (i, header)


@pytest.mark.parametrize("dtype, array", [("I8", np.ones(4, np.int8)), ("BOOL", np.ones(4, bool)),
                                          ("I64", np.ones(4, np.int64))])
def test_integer_and_boolean_tensors_are_no_weights(dtype, array, tmp_path):
  header = {"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, array.nbytes]}}
  path = _file(tmp_path, header, array.tobytes())
  assert _oracle_accepts(path)  # consistent on its own
  with pytest.raises(BadInputError, match=f"unsupported dtype '{dtype}'"):
    TensorFile(path)


@pytest.mark.parametrize("dtype, code", [(np.float32, "F32"), (np.float16, "F16")])
def test_nan_weights_are_refused_naming_the_tensor(dtype, code, tmp_path):
  array = np.ones(4, dtype)
  array[2] = np.nan
  path = _file(tmp_path, {"w": {"dtype": code, "shape": [4], "data_offsets": [0, array.nbytes]}},
               array.tobytes())
  tf = TensorFile(path)  # the header is consistent: the values are read on demand
  with pytest.raises(BadInputError, match=r"tensor w: NaN or Inf weights \(rows 0:4\)"):
    tf.read("w")
  tf.read("w", (0, 2))  # rows without it read fine
