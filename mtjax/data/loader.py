"""The mixture loader: per-task Grain pipelines, the task sampler, packing into [batch, seq_len].

For each step the loader asks the schedule for that step's rates, draws each next example's task
from the sampler, takes that task's next example (its own shuffled, repeated Grain pipeline,
read by index), and packs greedily: an example goes into the current row if it fits, else the
row is closed and the example starts the next one; every batch starts with fresh rows.

So the GLOBAL batch at step s is a function of (seed, s, the rates used so far) only, and the
loader state is small, JSON-serializable and independent of the process count:
`{"step", "credits": [T], "cursors": {task: n}, "truncated", "skipped", "feedback"}`.
Each process plans the whole global batch from example lengths (cheap) and tokenizes and
materializes only its own rows.

Rates fed back by the trainer (`set_rates`) take effect `feedback_lag` (data.feedback_lag, at
least prefetch + 1) steps after the last consumed step (batches already prefetched keep theirs)
and hold until the schedule's next stage begins. They are recorded in the state, so a restored loader replays the same stream.

Batch contract (../DESIGN.md): inputs, targets, loss_mask (float32, 1 on target tokens only),
segment_ids (0 = padding), positions, task_ids (per token; padding = -1, never a real task).
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grain
import numpy as np

from mtjax.config import Config
from mtjax.data import pipeline
from mtjax.data.mixture import Sampler, Schedule, normalized
from mtjax.data.tokenizer import Tokenizer

PAD_TASK_ID = -1
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids")
FEEDBACK_LAG_EXTRA = 1  # the producer may hold one finished batch beyond the queue

T = TypeVar("T")


@dataclasses.dataclass
class HostBatch:
  arrays: dict[str, np.ndarray]  # this process's rows
  step: int  # the step this batch is for
  rates: np.ndarray  # [T] the sampling rates used for it
  state_after: dict[str, Any]  # loader state once this batch is consumed
  packing_efficiency: float  # non-pad fraction of the GLOBAL batch


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding batch of the contract's arrays."""
  out: dict[str, np.ndarray] = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
  out["loss_mask"] = np.zeros((rows, seq_len), np.float32)
  out["task_ids"].fill(PAD_TASK_ID)
  return out


def place(out: dict[str, np.ndarray], row: int, start: int, n: int, example: dict[str, Any],
          task: int, segment: int) -> None:
  """Writes the first n (input, target) pairs of a tokenized example at out[row, start:]."""
  ids, sl = example["tokens"], slice(start, start + n)
  out["inputs"][row, sl] = ids[:n]
  out["targets"][row, sl] = ids[1 : n + 1]
  # Pair t predicts ids[t + 1]: in the loss when that token belongs to the target.
  out["loss_mask"][row, sl] = np.arange(1, n + 1) >= example["target_start"]
  out["segment_ids"][row, sl] = segment
  out["positions"][row, sl] = np.arange(n)
  out["task_ids"][row, sl] = task


def _item(dataset: grain.MapDataset[T], index: int) -> T:
  """dataset[index]. Grain types it Optional (an element dropped by a filter); these datasets
  have no filter, so None never comes."""
  item = dataset[index]
  assert item is not None
  return item


def pack(tokens: Sequence[grain.MapDataset[dict[str, Any]]],
         lengths: Sequence[grain.MapDataset[int]], sampler: Sampler,
         cursors: list[int], rates: np.ndarray, batch_size: int, seq_len: int,
         rows: slice = slice(None)) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
  """Packs one global batch, advancing `sampler` and `cursors` in place.

  The plan (which example goes where) is made for every row from example LENGTHS alone; only the
  rows in `rows` (this process's) are materialized from tokens. Returns (arrays of those rows,
  truncated count per task over the global batch, packing efficiency of the global batch).
  An example of n tokens gives n-1 (input, target) pairs; one longer than seq_len pairs is
  truncated (and counted).
  """
  first, stop, _ = rows.indices(batch_size)
  out = empty_batch(stop - first, seq_len)
  truncated = np.zeros(len(tokens), np.int64)
  row, fill, segment, used = 0, 0, 0, 0
  pending = None
  while row < batch_size:
    if pending is None:
      before = sampler.state()
      task = sampler.draw(rates)
      pending = (task, int(_item(lengths[task], cursors[task])), before)
    task, length, _ = pending
    n = min(length - 1, seq_len)
    if fill + n > seq_len:  # close the row; the example starts the next one
      row, fill, segment = row + 1, 0, 0
      continue
    truncated[task] += length - 1 > seq_len
    segment += 1
    if first <= row < stop:
      place(out, row - first, fill, n, _item(tokens[task], cursors[task]), task, segment)
    cursors[task] += 1
    fill += n
    used += n
    pending = None
  if pending is not None:  # drawn but not placed: undo the draw; the next batch draws again
    sampler.credits = np.asarray(pending[2])
  return out, truncated, used / (batch_size * seq_len)


STATE_ITEM = "checkpoint item 'loader'"  # where a restored loader state comes from


def validate_state(state: Any, task_names: Sequence[str]) -> dict[str, Any]:
  """A deep copy of a restored loader state, checked key by key against the run's tasks; a state
  of another shape (a damaged or hand-edited checkpoint) is a BadInputError naming the item."""
  from mtjax.errors import BadInputError

  def bad(what: str) -> BadInputError:
    return BadInputError(STATE_ITEM, f"{what} (expected {{'step', 'credits', 'cursors', "
                         "'truncated', 'skipped', 'feedback'} as this mtjax writes it)")

  def count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

  def rates(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == len(task_names) and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                for v in value))

  if not isinstance(state, Mapping):
    raise bad(f"is a {type(state).__name__}, not a mapping")
  missing = [k for k in ("step", "credits", "cursors", "truncated", "skipped", "feedback")
             if k not in state]
  if missing:
    raise bad(f"has no {', '.join(repr(k) for k in missing)}")
  if not count(state["step"]):
    raise bad(f"'step' is {state['step']!r}, not a step number")
  if not rates(state["credits"]):
    raise bad(f"'credits' is not a list of {len(task_names)} numbers (one per task)")
  for key in ("cursors", "truncated", "skipped"):
    value = state[key]
    if not isinstance(value, Mapping) or sorted(value) != sorted(task_names) or \
        not all(count(v) for v in value.values()):
      raise bad(f"{key!r} is not a count per task of this run ({list(task_names)})")
  feedback = state["feedback"]
  if not isinstance(feedback, (list, tuple)) or not all(
      isinstance(f, (list, tuple)) and len(f) == 2 and count(f[0]) and rates(f[1]) for f in feedback):
    raise bad("'feedback' is not a list of [step, rates per task]")
  return {"step": state["step"], "credits": list(state["credits"]),
          **{k: dict(state[k]) for k in ("cursors", "truncated", "skipped")},
          "feedback": [[s, list(r)] for s, r in feedback]}


class MixtureLoader:
  """Iterator of HostBatch. `state` is where the NEXT batch starts (restores exactly)."""

  def __init__(self, task_names: Sequence[str], schedule: Schedule, *, tokenizer: Tokenizer,
               seed: int, batch_size: int, seq_len: int, prefetch: int = 2,
               process_index: int = 0, process_count: int = 1,
               state: Mapping[str, Any] | None = None, on_bad_record: str = "stop",
               instructions: Mapping[str, str] | None = None, feedback_lag: int | None = None):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} not divisible by {process_count} processes")
    self.task_names = tuple(task_names)
    self.schedule = schedule
    self.batch_size, self.seq_len = batch_size, seq_len
    self.prefetch = prefetch
    min_lag = prefetch + FEEDBACK_LAG_EXTRA if prefetch else 0
    self.feedback_lag = min_lag if feedback_lag is None else feedback_lag
    if self.feedback_lag < min_lag:
      raise ValueError(f"feedback_lag {feedback_lag} < prefetch + {FEEDBACK_LAG_EXTRA} = {min_lag}")
    self._rows = slice(process_index * batch_size // process_count,
                       (process_index + 1) * batch_size // process_count)
    from mtjax.tasks import instruction_rewrite
    rewrites = {n: instruction_rewrite(n, (instructions or {}).get(n, "keep"), self.task_names, seed)
                for n in self.task_names}
    loaded = [pipeline.task_dataset(name, i, tokenizer, seed, on_bad_record=on_bad_record,
                                    rewrite=rewrites[name])
              for i, name in enumerate(self.task_names)]
    self._tokens = [d.tokens for d in loaded]
    self._lengths = [d.lengths for d in loaded]
    zeros = {n: 0 for n in self.task_names}
    self.state = validate_state(state, self.task_names) if state else {
        "step": 0, "credits": [0.0] * len(self.task_names), "cursors": dict(zeros),
        "truncated": dict(zeros), "skipped": {n: d.skipped for n, d in zip(self.task_names, loaded)},
        "feedback": []}
    self._lock = threading.Lock()
    self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @classmethod
  def from_config(cls, config: Config, *, process_index: int = 0, process_count: int = 1,
                  state: Mapping[str, Any] | None = None, prefetch: int | None = None) -> MixtureLoader:
    from mtjax.data import mixture
    from mtjax.data import tokenizer as tokenizer_lib
    from mtjax.resolve import resolve
    config = resolve(config)
    d = config.data
    prefetch = d.prefetch if prefetch is None else prefetch
    # max(): a caller that asks for more prefetch than the config still gets a valid lag.
    return cls(d.tasks, mixture.schedule_from_config(config), seed=config.seed,
               tokenizer=tokenizer_lib.get(d.tokenizer), batch_size=d.batch_size,
               seq_len=d.seq_len, prefetch=prefetch,
               process_index=process_index, process_count=process_count, state=state,
               on_bad_record=d.on_bad_record, instructions=d.instructions,
               feedback_lag=max(d.feedback_lag, prefetch + FEEDBACK_LAG_EXTRA if prefetch else 0))

  # -- rates ---------------------------------------------------------------------------------

  def set_rates(self, rates: Mapping[str, float]) -> int:
    """Feeds back new sampling rates; returns the step from which they apply."""
    vector = normalized([float(rates.get(n, 0.0)) for n in self.task_names])
    with self._lock:
      effective = self.state["step"] + self.feedback_lag
      self.state["feedback"].append([effective, vector.tolist()])
    return effective

  def rates_at(self, step: int, feedback: Sequence[Sequence[Any]]) -> np.ndarray:
    """Fed-back rates win from their step until the schedule's next stage begins."""
    stage_start = self.schedule.stage_start(step)
    with self._lock:
      latest = [w for s, w in feedback if stage_start <= s <= step]
    return np.asarray(latest[-1]) if latest else self.schedule.at(step)

  # -- production ----------------------------------------------------------------------------

  def _produce(self, state: dict[str, Any]) -> HostBatch:
    step = state["step"]
    rates = self.rates_at(step, self.state["feedback"])
    sampler = Sampler(len(self.task_names), state["credits"])
    cursors = [state["cursors"][n] for n in self.task_names]
    arrays, truncated, efficiency = pack(self._tokens, self._lengths, sampler, cursors, rates,
                                         self.batch_size, self.seq_len, self._rows)
    after = {
        "step": step + 1, "credits": sampler.state(),
        "cursors": dict(zip(self.task_names, cursors)),
        "truncated": {n: state["truncated"][n] + int(truncated[i])
                      for i, n in enumerate(self.task_names)},
        "skipped": dict(state["skipped"]),
    }
    return HostBatch(arrays, step, rates, after, efficiency)

  def _worker(self) -> None:
    state = copy.deepcopy(self.state)
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
    if self.prefetch == 0:
      batch = self._produce(self.state)
    else:
      if self._thread is None:
        self._thread = threading.Thread(target=self._worker, daemon=True, name="mtjax-loader")
        self._thread.start()
      batch = self._queue.get()
      if isinstance(batch, BaseException):
        raise batch
    with self._lock:  # the feedback list is the loader's own, appended to by set_rates
      self.state = dict(batch.state_after, feedback=self.state["feedback"])
    return batch

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
