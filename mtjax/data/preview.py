"""`mtjax data preview`: what the loader will feed, without training.

Per range of steps: each task's share of packed examples and of loss tokens, the sampling rates
in effect, packing efficiency and truncations; then three decoded examples per task. Pure
function of the config (and seed): two runs print the same text.
"""

from __future__ import annotations

import io

import numpy as np

from mtjax.config import Config
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.data.loader import MixtureLoader
from mtjax.data.tokenizer import Tokenizer


def preview(config: Config, steps: int, ranges: int = 4, examples_per_task: int = 3) -> str:
  from mtjax.resolve import resolve
  config = resolve(config)
  tok = tokenizer_lib.get(config.data.tokenizer)
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
    for _ in range(lo, hi):
      batch = next(loader)
      a = batch.arrays
      starts = (a["segment_ids"] > 0) & (a["positions"] == 0)
      n_examples += np.bincount(a["task_ids"][starts], minlength=len(names))
      real = a["task_ids"] >= 0
      n_tokens += np.bincount(a["task_ids"][real], weights=a["loss_mask"][real], minlength=len(names))
      rates.append(batch.rates)
      efficiency.append(batch.packing_efficiency)
      _collect(a, tok, samples, examples_per_task)
    truncated = {n: loader.state["truncated"][n] - truncated_before[n] for n in names}
    out.write(f"steps {lo}-{hi - 1}: packing efficiency {np.mean(efficiency):.3f}\n")
    out.write(f"  {'task':<{width}}  {'rate':>6}  {'examples':>8}  {'share':>6}  "
              f"{'tokens':>7}  {'share':>6}  {'truncated':>9}\n")
    mean_rates = np.mean(rates, axis=0)
    for i, name in enumerate(names):
      out.write(f"  {name:<{width}}  {mean_rates[i]:6.3f}  {int(n_examples[i]):8d}  "
                f"{n_examples[i] / max(n_examples.sum(), 1):6.3f}  {int(n_tokens[i]):7d}  "
                f"{n_tokens[i] / max(n_tokens.sum(), 1):6.3f}  {truncated[name]:9d}\n")
  out.write("examples (prompt -> target):\n")
  for i, name in enumerate(names):
    for text in samples[i] or ["(none sampled)"]:
      out.write(f"  [{name}] {text}\n")
  return out.getvalue()


def _collect(arrays: dict[str, np.ndarray], tok: Tokenizer, samples: dict[int, list[str]],
             limit: int) -> None:
  for row in range(arrays["inputs"].shape[0]):
    for seg in np.unique(arrays["segment_ids"][row]):
      if seg == 0:
        continue
      idx = np.flatnonzero(arrays["segment_ids"][row] == seg)
      task = int(arrays["task_ids"][row, idx[0]])
      if len(samples[task]) >= limit:
        continue
      mask = arrays["loss_mask"][row, idx] > 0
      first = int(np.argmax(mask))  # input `first` is the prompt's last token
      prompt = tok.decode(arrays["inputs"][row, idx][1 : first + 1])
      target = tok.decode(arrays["targets"][row, idx][mask])
      samples[task].append(f"{prompt!r} -> {target!r}")
