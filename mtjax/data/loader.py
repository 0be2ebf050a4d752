"""The mixture loader: per-task Grain pipelines, the task sampler, packing into [batch, seq_len].

For each step the loader asks the schedule for that step's rates, draws each next example's task
from the sampler, takes that task's next example (its own shuffled, repeated Grain pipeline,
read by index), and packs greedily: an example goes into the current row if it fits, else the
row is closed and the example starts the next one; every batch starts with fresh rows. An
example longer than seq_len pairs goes in as data.truncate says (pipeline.fit): prompt_left cuts
its prompt's first tokens, right keeps its first seq_len pairs, and one that cannot keep a target
token (or, with skip, any that does not fit whole) is skipped: its task's cursor moves on, the
draw stands and takes the task's next example, and it is counted in "too_long".

So the GLOBAL batch at step s is a function of (seed, s, the rates used so far) only, and the
loader state is small, JSON-serializable and independent of the process count:
`{"step", "credits": [T], "cursors": {task: n}, "truncated", "skipped", "too_long", "feedback"}`
(a state without "too_long", written by an earlier version, restores with zeros), plus
"mixing" when an online-mixing hook keeps its state there (`set_mixing`; mtjax.train.mixing: the
bandit's rewards and its window so far, so a resumed run decides the same rates; a state without
it restores as one without).
Each process plans the whole global batch from example lengths (cheap) and tokenizes and
materializes only its own rows.

Rates fed back by the trainer (`set_rates`) take effect `feedback_lag` (data.feedback_lag, at
least prefetch + 1) steps after the last consumed step (batches already prefetched keep theirs)
and hold until the schedule's next stage begins. They are recorded in the state, so a restored loader replays the same stream.
Instructions fed back by the instruction search (`set_instruction`, mtjax.recipes.fast_context)
take effect the same way and hold until the next one: from then on the task's examples are read
through `pipeline.with_instruction` (the same order; counted anew). The state keeps them under
"instructions" ([step, task, text] in feeding order) and the search's own state under
"instruction_search" (`set_search`).

Batch contract (../DESIGN.md): inputs, targets, loss_mask (float32, 1 on target tokens only),
segment_ids (0 = padding), positions, task_ids (per token; padding = -1, never a real task).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mtjax.config import Config
from mtjax.data import pipeline
from mtjax.data import rows as rows_lib
from mtjax.data.mixture import Sampler, Schedule, normalized
from mtjax.data.tokenizer import Tokenizer

PAD_TASK_ID = rows_lib.PAD_TASK_ID
BATCH_KEYS = rows_lib.BATCH_KEYS
empty_batch = rows_lib.empty_batch
place = rows_lib.place
FEEDBACK_LAG_EXTRA = 1  # the producer may hold one finished batch beyond the queue
# The loader state's entries the trainer feeds (set_rates, set_mixing, set_instruction,
# set_search): the loader's own, carried from batch to batch.
CARRIED = ("feedback", "mixing", "instructions", "instruction_search")
CHUNK = 1024  # cursors a task's order and lengths are read ahead in (at most)
FIRST_CHUNK = 64  # the first read: doubled each read up to CHUNK (a small split's order is slow)


@dataclasses.dataclass
class HostBatch:
  arrays: dict[str, np.ndarray]  # this process's rows
  step: int  # the step this batch is for
  rates: np.ndarray  # [T] the sampling rates used for it
  state_after: dict[str, Any]  # loader state once this batch is consumed
  packing_efficiency: float  # non-pad fraction of the GLOBAL batch
  plan: Plan | None = None  # where every example of the GLOBAL batch went (and its cut)


@dataclasses.dataclass
class Plan:
  """One global batch, planned: every example's place, and its source index per task."""

  row: np.ndarray  # [K] per packed example, in row order
  start: np.ndarray
  n: np.ndarray  # (input, target) pairs written
  task: np.ndarray
  segment: np.ndarray
  src: np.ndarray  # index of the example in its task's split
  truncated: np.ndarray  # [T] examples cut to seq_len
  efficiency: float
  cut: np.ndarray | None = None  # [K] prompt tokens dropped after BOS (prompt_left)
  too_long: np.ndarray | None = None  # [T] examples skipped (data.truncate)
  indexes: Sequence[pipeline.TaskIndex] | None = None  # per task, where its texts come from


class _Reader:
  """A task's next examples from its cursor, planned under data.truncate from the length index:
  (source index, prompt tokens cut, pairs written (0: skipped), whether it is cut), read up to
  CHUNK cursors ahead."""

  def __init__(self, index: pipeline.TaskIndex, seq_len: int, truncate: str = "prompt_left",
               name: str = ""):
    self.index, self.seq_len, self.truncate, self.name = index, seq_len, truncate, name
    self.base, self.items = 0, []
    self.chunk = FIRST_CHUNK

  def at(self, cursor: int) -> tuple[int, int, int, bool]:
    k = cursor - self.base
    if not 0 <= k < len(self.items):
      src = self.index.order(cursor, cursor + self.chunk)
      self.chunk = min(2 * self.chunk, CHUNK)
      counts = self.index.counts(src)
      cut, n = pipeline.fit_arrays(counts[:, 0], counts[:, 1], self.seq_len, self.truncate)
      cut_off = (n > 0) & (counts.sum(axis=1) + 1 > self.seq_len)
      self.base = cursor
      self.items = list(zip(src.tolist(), cut.tolist(), n.tolist(), cut_off.tolist()))
      k = 0
    return self.items[k]

  def require_one_fits(self) -> None:
    """Raises a BadInputError naming the task when no example of its split can be placed."""
    from mtjax.errors import BadInputError
    counts = self.index.counts(np.arange(self.index.size))
    prompt, target = counts[:, 0], counts[:, 1]
    if pipeline.fit_arrays(prompt, target, self.seq_len, self.truncate)[1].any():
      return
    need = {"prompt_left": int(target.min()) + 1, "right": int(prompt.min()) + 1,
            "skip": int((prompt + target).min()) + 1}[self.truncate]
    raise BadInputError(
        f"task {self.name!r}", f"no example of its train split ({self.index.size}) fits "
        f"data.seq_len={self.seq_len} with data.truncate={self.truncate}: the shortest target "
        f"has {int(target.min())} tokens (plus EOS), the shortest prompt {int(prompt.min())}, "
        f"the shortest example {int((prompt + target).min()) + 1} pairs; raise data.seq_len to "
        f"at least {need}" + (" or set data.truncate=prompt_left" if self.truncate != "prompt_left"
                              and (target + 1 <= self.seq_len).any() else ""))


def plan(readers: Sequence[_Reader], sampler: Sampler, cursors: list[int], rates: np.ndarray,
         batch_size: int, seq_len: int) -> Plan:
  """Plans one global batch from example lengths alone, advancing `sampler` and `cursors` in
  place. Each next example's task comes from the sampler; it goes into the current row if it
  fits, else the row is closed and it starts the next one. An example of n tokens gives n-1
  (input, target) pairs; one longer than seq_len pairs is cut as its reader's data.truncate says
  (counted in truncated) or skipped (counted in too_long; the draw takes the task's next one)."""
  credits = sampler.credits
  rates = np.asarray(rates, np.float64)
  # Sampler.draw, inlined: credits + 0 is credits and credits + -inf is -inf, so argmax over
  # this sum is its argmax over np.where(rates > 0, credits, -inf), float for float.
  mask = np.where(rates > 0, 0.0, -np.inf)
  masked = np.empty_like(credits)
  rows, starts, ns, tasks, segments, srcs, cuts = [], [], [], [], [], [], []
  truncated = [0] * len(readers)
  too_long = [0] * len(readers)
  row, fill, segment, used = 0, 0, 0, 0
  before = credits.copy()
  while True:
    before[:] = credits
    credits += rates
    np.add(credits, mask, out=masked)
    task = int(masked.argmax())  # ties: the lowest task index
    credits[task] -= 1.0
    src, cut, n, cut_off = readers[task].at(cursors[task])
    if not n:  # too long: skipped, for good (also when this draw is undone below)
      run = 0
      while not n:
        too_long[task] += 1
        cursors[task] += 1
        run += 1
        if run >= readers[task].index.size:  # as many skips as examples: does any fit at all?
          readers[task].require_one_fits()
          run = 0
        src, cut, n, cut_off = readers[task].at(cursors[task])
    if fill + n > seq_len:  # close the row; the example starts the next one
      row, fill, segment = row + 1, 0, 0
      if row == batch_size:  # drawn but not placed: undo the draw; the next batch draws again
        credits[:] = before
        break
    truncated[task] += cut_off
    segment += 1
    rows.append(row)
    starts.append(fill)
    ns.append(n)
    tasks.append(task)
    segments.append(segment)
    srcs.append(src)
    cuts.append(cut)
    cursors[task] += 1
    fill += n
    used += n
  def array(values: list[int]) -> np.ndarray:
    return np.asarray(values, np.int64)
  return Plan(array(rows), array(starts), array(ns), array(tasks), array(segments), array(srcs),
              array(truncated), used / (batch_size * seq_len), array(cuts), array(too_long))


def select(plan: Plan, indexes: Sequence[pipeline.TaskIndex], first: int, stop: int) -> rows_lib.Slots:
  """The slots of rows [first, stop) with their texts (rows relative to `first`); the plan's own
  indexes (an instruction in effect) win over `indexes`."""
  indexes = plan.indexes or indexes
  a, b = np.searchsorted(plan.row, [first, stop])
  prompts, targets = [], []
  for task, src in zip(plan.task[a:b].tolist(), plan.src[a:b].tolist()):
    example = indexes[task].example(src)
    prompts.append(example.prompt)
    targets.append(example.target)
  cut = None if plan.cut is None else plan.cut[a:b]
  return rows_lib.Slots(plan.row[a:b] - first, plan.start[a:b], plan.n[a:b], plan.task[a:b],
                        plan.segment[a:b], prompts, targets, cut)


STATE_ITEM = "checkpoint item 'loader'"  # where a restored loader state comes from


def validate_state(state: Any, task_names: Sequence[str]) -> dict[str, Any]:
  """A deep copy of a restored loader state, checked key by key against the run's tasks; a state
  of another shape (a damaged or hand-edited checkpoint) is a BadInputError naming the item. A
  state without "too_long" (written before data.truncate existed) restores with zeros; "mixing"
  (an online-mixing hook's state, mtjax.train.mixing, which checks its contents) is optional."""
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
  too_long = state.get("too_long", {n: 0 for n in task_names})
  for key, value in (*((k, state[k]) for k in ("cursors", "truncated", "skipped")),
                     ("too_long", too_long)):
    if not isinstance(value, Mapping) or sorted(value) != sorted(task_names) or \
        not all(count(v) for v in value.values()):
      raise bad(f"{key!r} is not a count per task of this run ({list(task_names)})")
  feedback = state["feedback"]
  if not isinstance(feedback, (list, tuple)) or not all(
      isinstance(f, (list, tuple)) and len(f) == 2 and count(f[0]) and rates(f[1]) for f in feedback):
    raise bad("'feedback' is not a list of [step, rates per task]")
  mixing = state.get("mixing")
  if mixing is not None and not isinstance(mixing, Mapping):
    raise bad(f"'mixing' is a {type(mixing).__name__}, not a mapping")
  instructions = state.get("instructions", [])
  if not isinstance(instructions, (list, tuple)) or not all(
      isinstance(f, (list, tuple)) and len(f) == 3 and count(f[0]) and f[1] in task_names
      and isinstance(f[2], str) for f in instructions):
    raise bad("'instructions' is not a list of [step, task, instruction]")
  search = state.get("instruction_search")
  if search is not None and not isinstance(search, Mapping):
    raise bad(f"'instruction_search' is a {type(search).__name__}, not a mapping")
  return {"step": state["step"], "credits": list(state["credits"]),
          **{k: dict(state[k]) for k in ("cursors", "truncated", "skipped")},
          "too_long": dict(too_long), "feedback": [[s, list(r)] for s, r in feedback],
          **({"mixing": copy.deepcopy(dict(mixing))} if mixing is not None else {}),
          **({"instructions": [[s, t, x] for s, t, x in instructions]} if instructions else {}),
          **({"instruction_search": copy.deepcopy(dict(search))} if search is not None else {})}


class MixtureLoader:
  """Iterator of HostBatch. `state` is where the NEXT batch starts (restores exactly)."""

  def __init__(self, task_names: Sequence[str], schedule: Schedule, *, tokenizer: Tokenizer,
               seed: int, batch_size: int, seq_len: int, prefetch: int = 2,
               process_index: int = 0, process_count: int = 1,
               state: Mapping[str, Any] | None = None, on_bad_record: str = "stop",
               instructions: Mapping[str, str] | None = None, feedback_lag: int | None = None,
               workers: int = 0, truncate: str = "prompt_left"):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} not divisible by {process_count} processes")
    self.task_names = tuple(task_names)
    self.schedule = schedule
    self.batch_size, self.seq_len = batch_size, seq_len
    if truncate not in ("prompt_left", "right", "skip"):
      raise ValueError(f"unknown truncation policy {truncate!r} (prompt_left, right or skip)")
    self.truncate = truncate
    self.prefetch = prefetch
    min_lag = prefetch + FEEDBACK_LAG_EXTRA if prefetch else 0
    self.feedback_lag = min_lag if feedback_lag is None else feedback_lag
    if self.feedback_lag < min_lag:
      raise ValueError(f"feedback_lag {feedback_lag} < prefetch + {FEEDBACK_LAG_EXTRA} = {min_lag}")
    self._rows = slice(process_index * batch_size // process_count,
                       (process_index + 1) * batch_size // process_count)
    from mtjax.tasks import instruction_rewrite
    modes = {n: (instructions or {}).get(n, "keep") for n in self.task_names}
    rewrites = {n: instruction_rewrite(n, modes[n], self.task_names, seed) for n in self.task_names}
    loaded = [pipeline.task_dataset(name, i, tokenizer, seed, on_bad_record=on_bad_record,
                                    rewrite=rewrites[name],
                                    rewrite_key=(modes[name], name, self.task_names, seed))
              for i, name in enumerate(self.task_names)]
    self._indexes = [d.index for d in loaded]
    self._variants: dict[tuple[int, str], tuple[pipeline.TaskIndex, _Reader]] = {}
    self._readers = [_Reader(d.index, seq_len, truncate, name)
                     for d, name in zip(loaded, self.task_names)]
    self._tokenizer = tokenizer
    zeros = {n: 0 for n in self.task_names}
    self.state = validate_state(state, self.task_names) if state else {
        "step": 0, "credits": [0.0] * len(self.task_names), "cursors": dict(zeros),
        "truncated": dict(zeros), "skipped": {n: d.skipped for n, d in zip(self.task_names, loaded)},
        "too_long": dict(zeros), "feedback": []}
    self._lock = threading.Lock()
    self._queue: queue.Queue = queue.Queue()
    # Batches planned and not yet consumed: at most prefetch + 1, as with a queue of `prefetch`
    # and one batch in hand, so fed-back rates (feedback_lag >= prefetch + 1) never miss one.
    self._planned = threading.Semaphore(prefetch + FEEDBACK_LAG_EXTRA)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._workers = rows_lib.Workers(workers, tokenizer) if workers > 0 else None

  @classmethod
  def from_config(cls, config: Config, *, process_index: int = 0, process_count: int = 1,
                  state: Mapping[str, Any] | None = None, prefetch: int | None = None) -> MixtureLoader:
    from mtjax.data import mixture
    from mtjax.data import tokenizer as tokenizer_lib
    from mtjax.data.resolve import resolve_data
    config = resolve_data(config)
    d = config.data
    prefetch = d.prefetch if prefetch is None else prefetch
    # max(): a caller that asks for more prefetch than the config still gets a valid lag.
    return cls(d.tasks, mixture.schedule_from_config(config), seed=config.seed,
               tokenizer=tokenizer_lib.for_config(config), batch_size=d.batch_size,
               seq_len=d.seq_len, prefetch=prefetch,
               process_index=process_index, process_count=process_count, state=state,
               on_bad_record=d.on_bad_record, instructions=d.instructions,
               feedback_lag=max(d.feedback_lag, prefetch + FEEDBACK_LAG_EXTRA if prefetch else 0),
               workers=d.workers, truncate=d.truncate)

  # -- rates ---------------------------------------------------------------------------------

  def set_rates(self, rates: Mapping[str, float]) -> int:
    """Feeds back new sampling rates; returns the step from which they apply."""
    vector = normalized([float(rates.get(n, 0.0)) for n in self.task_names])
    with self._lock:
      effective = self.state["step"] + self.feedback_lag
      self.state["feedback"].append([effective, vector.tolist()])
    return effective

  def set_mixing(self, mixing: Mapping[str, Any]) -> None:
    """Keeps an online-mixing hook's (JSON-serializable) state in the loader state under
    "mixing": checkpointed with it and restored with it (`state` after a restore has it)."""
    mixing = copy.deepcopy(dict(mixing))
    with self._lock:
      self.state["mixing"] = mixing

  def set_instruction(self, task: str, text: str) -> int:
    """Feeds back a task's instruction (the instruction search, mtjax.recipes.fast_context): its
    examples read `text` (pipeline.searched_instruction) from the returned step on, which is
    `feedback_lag` steps after the last consumed one, as for set_rates. Recorded in the state."""
    if task not in self.task_names:
      raise ValueError(f"unknown task {task!r}")
    with self._lock:
      effective = self.state["step"] + self.feedback_lag
      self.state.setdefault("instructions", []).append([effective, task, text])
    return effective

  def set_search(self, search: Mapping[str, Any]) -> None:
    """Keeps the instruction search's (JSON-serializable) state in the loader state under
    "instruction_search", checkpointed and restored with it (as set_mixing)."""
    search = copy.deepcopy(dict(search))
    with self._lock:
      self.state["instruction_search"] = search

  def instructions_at(self, step: int) -> dict[str, str]:
    """The fed-back instruction of each task that has one in effect at `step`."""
    with self._lock:
      schedule = list(self.state.get("instructions", []))
    out: dict[str, str] = {}
    for start, task, text in schedule:  # in order of feeding: the latest in effect wins
      if start <= step:
        out[task] = text
    return out

  def _source(self, i: int, text: str | None) -> tuple[pipeline.TaskIndex, _Reader]:
    """Task i's index and reader, or those of its examples with instruction `text`."""
    if text is None:
      return self._indexes[i], self._readers[i]
    key = (i, text)
    if key not in self._variants:
      index = pipeline.with_instruction(self._indexes[i], text)
      self._variants[key] = index, _Reader(index, self.seq_len, self.truncate, self.task_names[i])
    return self._variants[key]

  def rates_at(self, step: int, feedback: Sequence[Sequence[Any]]) -> np.ndarray:
    """Fed-back rates win from their step until the schedule's next stage begins."""
    stage_start = self.schedule.stage_start(step)
    with self._lock:
      latest = [w for s, w in feedback if stage_start <= s <= step]
    return np.asarray(latest[-1]) if latest else self.schedule.at(step)

  # -- production ----------------------------------------------------------------------------

  def _plan(self, state: dict[str, Any]) -> tuple[Plan, np.ndarray, dict[str, Any]]:
    """The plan of the batch at state["step"], its rates and the state after it."""
    step = state["step"]
    rates = self.rates_at(step, self.state["feedback"])
    sampler = Sampler(len(self.task_names), state["credits"])
    cursors = [state["cursors"][n] for n in self.task_names]
    texts = self.instructions_at(step)
    sources = [self._source(i, texts.get(n)) for i, n in enumerate(self.task_names)]
    planned = plan([r for _, r in sources], sampler, cursors, rates, self.batch_size, self.seq_len)
    if texts:
      planned.indexes = [index for index, _ in sources]
    too_long = planned.too_long if planned.too_long is not None else np.zeros(len(cursors), int)
    after = {
        "step": step + 1, "credits": sampler.state(),
        "cursors": dict(zip(self.task_names, cursors)),
        "truncated": {n: state["truncated"][n] + int(planned.truncated[i])
                      for i, n in enumerate(self.task_names)},
        "skipped": dict(state["skipped"]),
        "too_long": {n: state["too_long"][n] + int(too_long[i])
                     for i, n in enumerate(self.task_names)},
    }
    return planned, rates, after

  def _submit(self, planned: Plan) -> None:
    """Hands this process's rows of a plan to the workers (they start materializing)."""
    first, stop, _ = self._rows.indices(self.batch_size)
    if self._workers is not None:
      self._workers.submit(stop - first, self.seq_len, select(planned, self._indexes, first, stop))

  def _collect(self, planned: Plan) -> dict[str, np.ndarray]:
    """This process's rows of the oldest submitted plan."""
    if self._workers is not None:
      return self._workers.collect(self.seq_len)
    first, stop, _ = self._rows.indices(self.batch_size)
    return rows_lib.materialize(self._tokenizer, stop - first, self.seq_len,
                                select(planned, self._indexes, first, stop))

  def _produce(self, state: dict[str, Any]) -> HostBatch:
    planned, rates, after = self._plan(state)
    self._submit(planned)
    return HostBatch(self._collect(planned), state["step"], rates, after, planned.efficiency,
                     planned)

  def _worker(self) -> None:
    state = copy.deepcopy(self.state)
    # With worker processes, the next batch is planned while the last one is materialized.
    depth = 2 if self._workers is not None else 1
    inflight: collections.deque = collections.deque()
    try:
      while not self._stop.is_set():
        if len(inflight) < depth and self._planned.acquire(timeout=0 if inflight else 0.1):
          planned, rates, after = self._plan(state)
          self._submit(planned)
          inflight.append((planned, rates, state["step"], after))
          state = after
        elif inflight:
          planned, rates, step, after = inflight.popleft()
          self._queue.put(HostBatch(self._collect(planned), step, rates, after,
                                    planned.efficiency, planned))
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
      self._planned.release()
    with self._lock:  # feedback and mixing are the loader's own (set_rates, set_mixing)
      carried = {k: self.state[k] for k in CARRIED if k in self.state}
      self.state = dict(batch.state_after, **carried)
    return batch

  def close(self) -> None:
    """Stops the producer thread and ends the worker processes."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self._workers is not None:
      self._workers.close()
