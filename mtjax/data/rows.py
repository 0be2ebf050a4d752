"""Materializing planned rows: tokenize the planned examples and write them with numpy.

The loader's main process plans every batch (which example goes to which row, where, how many
pairs); this module turns one plan of rows into the batch arrays. It runs in the main process
(data.workers = 0) or in worker processes (`python -m mtjax.data.rows`, fed over pipes): the same
function either way, so batches are bit-identical for any number of workers. It imports numpy
and the tokenizers only, never JAX, grain or the task registry: a worker gets example texts.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from mtjax.data.tokenizer import ByteTokenizer, Tokenizer, encode_example

PAD_TASK_ID = -1
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids")


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding batch of the contract's arrays."""
  out: dict[str, np.ndarray] = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
  out["loss_mask"] = np.zeros((rows, seq_len), np.float32)
  out["task_ids"].fill(PAD_TASK_ID)
  return out


def place(out: dict[str, np.ndarray], row: int, start: int, n: int, example: dict[str, Any],
          task: int, segment: int) -> None:
  """Writes the first n (input, target) pairs of a tokenized example at out[row, start:]. An
  example whose prompt is cut (data.truncate=prompt_left) is cut first: pipeline.fit_example or
  pipeline.apply_fit."""
  ids, sl = example["tokens"], slice(start, start + n)
  out["inputs"][row, sl] = ids[:n]
  out["targets"][row, sl] = ids[1 : n + 1]
  # Pair t predicts ids[t + 1]: in the loss when that token belongs to the target.
  out["loss_mask"][row, sl] = np.arange(1, n + 1) >= example["target_start"]
  out["segment_ids"][row, sl] = segment
  out["positions"][row, sl] = np.arange(n)
  out["task_ids"][row, sl] = task


@dataclasses.dataclass
class Slots:
  """The planned examples of some rows, in row order: example k goes to row[k] (relative to the
  first materialized row) at column start[k], n[k] pairs, with its task and segment id, its
  prompt's first cut[k] tokens dropped (BOS kept; None: no cuts)."""

  row: np.ndarray
  start: np.ndarray
  n: np.ndarray
  task: np.ndarray
  segment: np.ndarray
  prompts: list[str]  # the example texts, as the pipeline formats them
  targets: list[str]
  cut: np.ndarray | None = None

  def part(self, a: int, b: int, first_row: int) -> Slots:
    """Slots a..b, their rows relative to `first_row`."""
    return Slots(self.row[a:b] - first_row, self.start[a:b], self.n[a:b], self.task[a:b],
                 self.segment[a:b], self.prompts[a:b], self.targets[a:b],
                 None if self.cut is None else self.cut[a:b])


def tokenize(tokenizer: Tokenizer, prompts: Sequence[str],
             targets: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """[BOS] prompt target [EOS] of every example, concatenated (pipeline.Tokenize's tokens).
  Returns (flat tokens, offset of each example in them, target_start of each example)."""
  k = len(prompts)
  if type(tokenizer) is ByteTokenizer:  # bytes are tokens: one join and one add for the batch
    p = [s.encode() for s in prompts]
    t = [s.encode() for s in targets]
    lp = np.fromiter(map(len, p), np.int64, k)
    lt = np.fromiter(map(len, t), np.int64, k)
    sizes = lp + lt + 2
    offsets = np.zeros(k, np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    flat = np.empty(int(sizes.sum()), np.int32)
    flat[offsets] = tokenizer.bos_id
    flat[offsets + sizes - 1] = tokenizer.eos_id
    text = np.frombuffer(b"".join([x for pair in zip(p, t) for x in pair]), np.uint8)
    body = lp + lt  # where each example's text lands: after its BOS
    flat[np.arange(len(text)) + np.repeat(offsets + 1 - _starts(body), body)] = (
        text.astype(np.int32) + tokenizer.offset)
    return flat, offsets, lp + 1
  parts, offsets, target_starts, at = [], np.zeros(k, np.int64), np.zeros(k, np.int64), 0
  for i, (prompt, target) in enumerate(zip(prompts, targets)):
    p, t = encode_example(tokenizer, prompt, target)  # [BOS] prompt, target [EOS] (or chat's)
    parts += [p, t]
    offsets[i], target_starts[i] = at, len(p)
    at += len(p) + len(t)
  flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
  return flat, offsets, target_starts


def _starts(sizes: np.ndarray) -> np.ndarray:
  """Exclusive cumulative sum: where each of consecutive pieces of these sizes starts."""
  out = np.zeros(len(sizes), np.int64)
  np.cumsum(sizes[:-1], out=out[1:])
  return out


def materialize(tokenizer: Tokenizer, rows: int, seq_len: int, slots: Slots) -> dict[str, np.ndarray]:
  """The batch arrays of `rows` rows holding the planned slots (pad elsewhere): vectorized,
  equal to loader.place of every slot in turn (after pipeline.apply_fit of its cut): BOS, then
  the prompt from its token 1 + cut, the target and EOS; the loss on target tokens and EOS."""
  out = empty_batch(rows, seq_len)
  if not len(slots.n):
    return out
  flat, offsets, target_starts = tokenize(tokenizer, slots.prompts, slots.targets)
  n = slots.n.astype(np.int64)
  total = int(n.sum())
  first = _starts(n)  # where each slot starts among all written pairs
  pos = np.arange(total) - np.repeat(first, n)  # pair index within its example
  src = np.repeat(offsets, n) + pos  # token index of each pair's input in flat
  dest = np.repeat(slots.row.astype(np.int64) * seq_len + slots.start, n) + pos
  if slots.cut is not None and slots.cut.any():
    # A cut example skips its prompt's first `cut` tokens after BOS: pair 0 reads BOS, pair
    # t > 0 reads token t + cut, and every pair's target is token t + 1 + cut.
    cut = np.repeat(slots.cut.astype(np.int64), n)
    out["inputs"].reshape(-1)[dest] = flat[src + np.where(pos > 0, cut, 0)]
    out["targets"].reshape(-1)[dest] = flat[src + 1 + cut]
    out["loss_mask"].reshape(-1)[dest] = pos + 1 + cut >= np.repeat(target_starts, n)
  else:
    out["inputs"].reshape(-1)[dest] = flat[src]
    out["targets"].reshape(-1)[dest] = flat[src + 1]
    # Pair t predicts token t + 1: in the loss when that token belongs to the target.
    out["loss_mask"].reshape(-1)[dest] = pos + 1 >= np.repeat(target_starts, n)
  out["segment_ids"].reshape(-1)[dest] = np.repeat(slots.segment, n)
  out["positions"].reshape(-1)[dest] = pos
  out["task_ids"].reshape(-1)[dest] = np.repeat(slots.task, n)
  return out


# ---------------------------------------------------------------- worker processes

def _send(stream: IO[bytes], obj: Any) -> None:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  stream.write(struct.pack("<Q", len(data)))
  stream.write(data)
  stream.flush()


def _receive(stream: IO[bytes]) -> Any:
  head = stream.read(8)
  if len(head) < 8:
    raise EOFError
  (size,) = struct.unpack("<Q", head)
  data = stream.read(size)
  if len(data) < size:
    raise EOFError
  return pickle.loads(data)


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
  """A worker: the tokenizer first, then (rows, seq_len, slots) -> arrays until end of input
  (the parent closed the pipe or died: no orphan outlives it)."""
  tokenizer = _receive(inp)
  while True:
    try:
      rows, seq_len, slots = _receive(inp)
    except EOFError:
      return
    try:
      reply: Any = materialize(tokenizer, rows, seq_len, slots)
    except Exception as e:  # the parent raises it
      reply = RuntimeError(f"loader worker: {type(e).__name__}: {e}")
    _send(out, reply)


class Workers:
  """`count` worker processes that materialize rows. A batch's rows are cut into contiguous
  parts, one per worker; `submit` sends them and returns at once, `collect` gathers the parts
  of the oldest submitted batch. The processes are plain `python -m mtjax.data.rows` children
  (no multiprocessing start method: nothing of the parent's __main__ or JAX is imported)."""

  def __init__(self, count: int, tokenizer: Tokenizer):
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    self.procs: list[subprocess.Popen] = []
    try:
      for _ in range(count):
        proc = subprocess.Popen([sys.executable, "-m", "mtjax.data.rows"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)
        self.procs.append(proc)
        assert proc.stdin is not None
        _send(proc.stdin, tokenizer)
    except BaseException:
      self.close()
      raise
    self._pending: list[list[int]] = []  # per submitted batch: the workers given a part
    # One reader per worker drains its replies, so a worker never blocks writing one while the
    # parent blocks writing it the next request.
    self._replies: list[queue.Queue] = [queue.Queue() for _ in self.procs]
    self._readers = [threading.Thread(target=self._read, args=(w,), daemon=True,
                                      name=f"mtjax-loader-worker{w}") for w in range(count)]
    for reader in self._readers:
      reader.start()

  def _read(self, w: int) -> None:
    stdout = self.procs[w].stdout
    assert stdout is not None
    while True:
      try:
        reply = _receive(stdout)
      except (EOFError, OSError, ValueError):
        self._replies[w].put(EOFError())
        return
      self._replies[w].put(reply)

  def submit(self, rows: int, seq_len: int, slots: Slots) -> None:
    parts = []
    bounds = np.linspace(0, rows, len(self.procs) + 1).round().astype(int)
    for w, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      if hi <= lo:
        continue
      a, b = np.searchsorted(slots.row, [lo, hi])  # slots are in row order
      part = slots.part(int(a), int(b), int(lo))
      stdin = self.procs[w].stdin
      assert stdin is not None
      _send(stdin, (int(hi - lo), seq_len, part))
      parts.append(w)
    self._pending.append(parts)

  def collect(self, seq_len: int) -> dict[str, np.ndarray]:
    parts = self._pending.pop(0)
    got = []
    for w in parts:
      reply = self._replies[w].get()
      if isinstance(reply, EOFError):
        raise RuntimeError(f"loader worker {w} exited (code {self.procs[w].poll()})")
      if isinstance(reply, BaseException):
        raise reply
      got.append(reply)
    if not got:
      return empty_batch(0, seq_len)
    return {k: np.concatenate([g[k] for g in got]) for k in BATCH_KEYS}

  def close(self) -> None:
    """Ends every worker: closing its input ends it (killed if it does not exit in 5 s)."""
    for proc in self.procs:
      try:
        if proc.stdin is not None:
          proc.stdin.close()
      except OSError:  # already gone
        pass
    for proc in self.procs:
      try:
        proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for reader in getattr(self, "_readers", []):
      reader.join(timeout=5)  # its worker exited: the read ends
    for proc in self.procs:
      if proc.stdout is not None:
        proc.stdout.close()
    self._pending = []


if __name__ == "__main__":
  from mtjax.data import rows as _rows  # one module: the parent pickles mtjax.data.rows.Slots
  _out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)  # a stray print goes to stderr, never into the replies
  _rows._serve(sys.stdin.buffer, _out)
