"""`mtjax data preview`: what the loader will feed, without training.

Per range of steps: each task's share of packed examples and of loss tokens, the sampling rates
in effect, packing efficiency, truncations and examples skipped as too long; then, per task, the
prompt and target token lengths of a sample of its train split and what each data.truncate
policy would lose at this seq_len; then three decoded examples per task (a prompt whose start
was cut shows as …'kept part', a target cut off at seq_len as 'kept part'…); then a warning line
per user task whose validation prompts also occur in its train split. Pure function of the
config (and seed): two runs print the same text.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from mtjax.config import TRUNCATE, Config
from mtjax.data import contamination, pipeline
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.data.loader import MixtureLoader, Plan
from mtjax.data.tokenizer import Tokenizer

SAMPLE = 256  # train examples per task whose lengths the preview counts


def preview(config: Config, steps: int, ranges: int = 4, examples_per_task: int = 3,
            sample: int = SAMPLE) -> str:
  from mtjax.data.resolve import resolve_data
  config = resolve_data(config)
  tok = tokenizer_lib.for_config(config)
  loader = MixtureLoader.from_config(config, prefetch=0)
  names = config.data.tasks
  out = io.StringIO()
  bounds = np.linspace(0, steps, min(ranges, steps) + 1).astype(int)
  samples: dict[int, list[str]] = {i: [] for i in range(len(names))}
  width = max(len(n) for n in names)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    n_examples = np.zeros(len(names))
    n_tokens = np.zeros(len(names))
    rates, efficiency = [], []
    truncated_before = dict(loader.state["truncated"])
    too_long_before = dict(loader.state["too_long"])
    for _ in range(lo, hi):
      batch = next(loader)
      a = batch.arrays
      starts = (a["segment_ids"] > 0) & (a["positions"] == 0)
      n_examples += np.bincount(a["task_ids"][starts], minlength=len(names))
      real = a["task_ids"] >= 0
      n_tokens += np.bincount(a["task_ids"][real], weights=a["loss_mask"][real], minlength=len(names))
      rates.append(batch.rates)
      efficiency.append(batch.packing_efficiency)
      _collect(a, tok, samples, examples_per_task, batch.plan)
    truncated = {n: loader.state["truncated"][n] - truncated_before[n] for n in names}
    too_long = {n: loader.state["too_long"][n] - too_long_before[n] for n in names}
    out.write(f"steps {lo}-{hi - 1}: packing efficiency {np.mean(efficiency):.3f}\n")
    out.write(f"  {'task':<{width}}  {'rate':>6}  {'examples':>8}  {'share':>6}  "
              f"{'tokens':>7}  {'share':>6}  {'truncated':>9}  {'too_long':>8}\n")
    mean_rates = np.mean(rates, axis=0)
    for i, name in enumerate(names):
      out.write(f"  {name:<{width}}  {mean_rates[i]:6.3f}  {int(n_examples[i]):8d}  "
                f"{n_examples[i] / max(n_examples.sum(), 1):6.3f}  {int(n_tokens[i]):7d}  "
                f"{n_tokens[i] / max(n_tokens.sum(), 1):6.3f}  {truncated[name]:9d}  "
                f"{too_long[name]:8d}\n")
  loader.close()
  out.write(lengths_table(config, sample))
  out.write("examples (prompt -> target):\n")
  for i, name in enumerate(names):
    for text in samples[i] or ["(none sampled)"]:
      out.write(f"  [{name}] {text}\n")
  for warning in contamination.lines(names, config.seed):
    out.write(warning + "\n")
  return out.getvalue()


def _spread(values: Sequence[int]) -> str:
  """min/median/max (a median between two counts ends in .5)."""
  median = statistics.median(values)
  return f"{min(values)}/{int(median) if median == int(median) else median}/{max(values)}"


def token_samples(config: Config, sample: int = SAMPLE) -> list[pipeline.TokenSample]:
  """The first `sample` train examples of each task of a resolved config, counted as the loader
  tokenizes them (preprocess and data.instructions applied), at data.seq_len under data.truncate."""
  from mtjax import tasks as task_registry
  d = config.data
  tok = tokenizer_lib.for_config(config)
  return [pipeline.token_sample(
      name, tok, config.seed, d.seq_len, sample, on_bad_record=d.on_bad_record,
      rewrite=task_registry.instruction_rewrite(name, d.instructions.get(name, "keep"), d.tasks,
                                                config.seed), truncate=d.truncate)
          for name in d.tasks]


def lengths_table(config: Config, sample: int = SAMPLE) -> str:
  """Per task: prompt and target token lengths (min/median/max) of its first `sample` train
  examples, and what each data.truncate policy does to them at data.seq_len (the run's marked *):
  examples truncated (cut and kept), too_long (skipped) and loss tokens (target + EOS) lost."""
  d = config.data
  samples = token_samples(config, sample)
  width = max(4, *(len(n) for n in d.tasks))
  lens = [(_spread(s.prompt), _spread(s.target)) if s.prompt else ("-", "-") for s in samples]
  pw = max(6, *(len(p) for p, _ in lens))
  tw = max(6, *(len(t) for _, t in lens))
  out = io.StringIO()
  out.write(f"token lengths (first {sample} train examples of each task; min/median/max) and "
            f"data.truncate at seq_len {d.seq_len} (* = this run's):\n")
  out.write(f"  {'task':<{width}}  {'sample':>6}  {'prompt':>{pw}}  {'target':>{tw}}  "
            f"{'policy':<12}  {'truncated':>9}  {'too_long':>8}  {'loss tokens lost':>22}\n")
  for s, (p, t) in zip(samples, lens):
    for k, policy in enumerate(TRUNCATE):
      e = s.effect(policy)
      mark = "*" if policy == d.truncate else ""
      lost = f"{e.loss_lost}/{e.loss_tokens} ({e.loss_lost / max(e.loss_tokens, 1):.1%})"
      first = (f"{s.task:<{width}}  {len(s.prompt):6d}  {p:>{pw}}  {t:>{tw}}" if k == 0 else
               f"{'':<{width}}  {'':6}  {'':>{pw}}  {'':>{tw}}")
      out.write(f"  {first}  {policy + mark:<12}  {e.truncated:9d}  {e.too_long:8d}  "
                f"{lost:>22}\n")
  return out.getvalue()


def _cuts(plan: Plan | None) -> Mapping[tuple[int, int], int]:
  """(row, segment) -> prompt tokens cut, for the examples of a planned global batch."""
  if plan is None or plan.cut is None:
    return {}
  return {(r, s): c for r, s, c in zip(plan.row.tolist(), plan.segment.tolist(),
                                       plan.cut.tolist()) if c}


def _stops(tok: Tokenizer) -> set[int]:
  """EOS and, under a chat template, the end-of-turn ids."""
  return set(getattr(tok, "stop_ids", ())) | {tok.eos_id}


def _render(tok: Tokenizer, ids: np.ndarray) -> str:
  """The text of `ids` in full: decode() stops at the first stop token (generation's rule), so a
  chat-format prompt would show only its system turn; here each stop token becomes " | " and the
  text goes on (the target's final end-of-turn / EOS is dropped, as decode drops it)."""
  stops = _stops(tok)
  pieces, current = [], []
  for i in (int(x) for x in ids):
    if i in stops:
      pieces.append(current)
      current = []
    else:
      current.append(i)
  pieces.append(current)
  while len(pieces) > 1 and not pieces[-1]:
    pieces.pop()
  return " | ".join(tok.decode(piece) for piece in pieces)


def _collect(arrays: dict[str, np.ndarray], tok: Tokenizer, samples: dict[int, list[str]],
             limit: int, plan: Plan | None = None) -> None:
  cuts = _cuts(plan)  # the preview's loader is the only process: its rows are the global rows
  for row in range(arrays["inputs"].shape[0]):
    for seg in np.unique(arrays["segment_ids"][row]):
      if seg == 0:
        continue
      idx = np.flatnonzero(arrays["segment_ids"][row] == seg)
      task = int(arrays["task_ids"][row, idx[0]])
      if len(samples[task]) >= limit:
        continue
      mask = arrays["loss_mask"][row, idx] > 0
      if not mask.any():  # nothing trained (never planned so): nothing to show
        continue
      first = int(np.argmax(mask))  # input `first` is the (kept) prompt's last token
      prompt = _render(tok, arrays["inputs"][row, idx][1 : first + 1])
      target = _render(tok, arrays["targets"][row, idx][mask])
      cut_start = "…" if cuts.get((row, int(seg))) else ""
      ended = bool(np.isin(arrays["targets"][row, idx][mask], list(_stops(tok))).any())
      cut_end = "" if ended else "…"  # no EOS / end-of-turn among the target: cut off
      samples[task].append(f"{cut_start}{prompt!r} -> {target!r}{cut_end}")
