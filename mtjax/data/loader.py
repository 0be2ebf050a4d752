"""The mixture loader: packs the mixture into fixed [batch, seq_len] rows, with prefetching.

Packing is greedy and sequential over the mixture's examples: an example goes into the current
row if it fits, else the row is closed and the example starts the next one; every batch starts a
fresh row. So the global batch at step s depends only on (seed, weights, the index of its first
example), and the loader state is small and independent of the process count:
`{"next_example": int, "batches": int, "truncated": {...}, "skipped": {...}}`.

Batch contract (../DESIGN.md): inputs, targets, loss_mask (float32, 1 on target tokens only),
segment_ids (0 = padding), positions, task_ids (per token; padding = -1, never a real task).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mtjax.data import pipeline
from mtjax.data.tokenizer import ByteTokenizer

PAD_TASK_ID = -1
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids")


@dataclasses.dataclass
class HostBatch:
  arrays: dict[str, np.ndarray]  # this process's rows
  state_after: dict[str, Any]  # loader state once this batch is consumed
  packing_efficiency: float  # non-pad fraction of the global batch


def pack(dataset: grain.MapDataset, start: int, batch_size: int, seq_len: int,
         num_tasks: int) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
  """Packs examples start, start+1, ... into a global batch.

  Returns (arrays, index of the first unused example, truncated count per task).
  An example of n tokens gives n-1 (input, target) pairs; longer than seq_len pairs is truncated.
  """
  shape = (batch_size, seq_len)
  out = {k: np.zeros(shape, np.int32) for k in BATCH_KEYS}
  out["loss_mask"] = np.zeros(shape, np.float32)
  out["task_ids"].fill(PAD_TASK_ID)
  truncated = np.zeros(num_tasks, np.int64)
  index, row, fill, segment = start, 0, 0, 0
  pending = None
  while row < batch_size:
    if pending is None:
      pending = dataset[index]
      index += 1
    tokens, task_id = pending["tokens"], pending["task_id"]
    n = min(len(tokens) - 1, seq_len)
    if fill + n > seq_len:  # close the row; the example starts the next one
      row, fill, segment = row + 1, 0, 0
      continue
    if len(tokens) - 1 > seq_len:
      truncated[task_id] += 1
    sl = slice(fill, fill + n)
    segment += 1
    out["inputs"][row, sl] = tokens[:n]
    out["targets"][row, sl] = tokens[1 : n + 1]
    # Target token t (predicting tokens[t]) is in the loss when t >= target_start.
    out["loss_mask"][row, sl] = (np.arange(1, n + 1) >= pending["target_start"]).astype(np.float32)
    out["segment_ids"][row, sl] = segment
    out["positions"][row, sl] = np.arange(n)
    out["task_ids"][row, sl] = task_id
    fill += n
    pending = None
  if pending is not None:  # drawn but not placed: the next batch starts with it
    index -= 1
  return out, index, truncated


class MixtureLoader:
  """Iterator of HostBatch; `state` is where the NEXT batch starts (restorable exactly)."""

  def __init__(self, task_names: Sequence[str], weights: Mapping[str, float], *,
               tokenizer: ByteTokenizer, seed: int, batch_size: int, seq_len: int,
               prefetch: int = 2, process_index: int = 0, process_count: int = 1,
               state: Mapping[str, Any] | None = None):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} not divisible by {process_count} processes")
    self.task_names = tuple(task_names)
    self.weights = dict(weights)
    self.rates = pipeline.sampling_rates(self.task_names, self.weights)
    self.batch_size, self.seq_len = batch_size, seq_len
    self._rows = slice(process_index * batch_size // process_count,
                       (process_index + 1) * batch_size // process_count)
    self._dataset = pipeline.mixture_dataset(self.task_names, self.weights, tokenizer, seed)
    self.state = dict(state) if state else {
        "next_example": 0, "batches": 0,
        "truncated": {n: 0 for n in self.task_names}, "skipped": {n: 0 for n in self.task_names}}
    self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._prefetch = prefetch

  def _produce(self, state: dict[str, Any]) -> HostBatch:
    arrays, next_example, truncated = pack(self._dataset, state["next_example"], self.batch_size,
                                           self.seq_len, len(self.task_names))
    efficiency = float((arrays["segment_ids"] > 0).mean())
    after = {
        "next_example": next_example, "batches": state["batches"] + 1,
        "truncated": {n: state["truncated"][n] + int(truncated[i])
                      for i, n in enumerate(self.task_names)},
        "skipped": dict(state["skipped"]),
    }
    local = {k: v[self._rows] for k, v in arrays.items()}
    return HostBatch(local, after, efficiency)

  def _worker(self) -> None:
    state = self.state
    try:
      while not self._stop.is_set():
        batch = self._produce(state)
        state = batch.state_after
        while not self._stop.is_set():
          try:
            self._queue.put(batch, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced to the consumer, never swallowed
      self._queue.put(e)

  def __iter__(self) -> Iterator[HostBatch]:
    return self

  def __next__(self) -> HostBatch:
    if self._prefetch == 0:
      batch = self._produce(self.state)
    else:
      if self._thread is None:
        self._thread = threading.Thread(target=self._worker, daemon=True, name="mtjax-loader")
        self._thread.start()
      batch = self._queue.get()
      if isinstance(batch, BaseException):
        raise batch
    self.state = batch.state_after
    return batch

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
