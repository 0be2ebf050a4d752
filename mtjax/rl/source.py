"""The on-policy batch source of RL runs: prompts from the mixture, rollouts from the current state.

Prompts (not packed) are drawn from data.tasks at the schedule's rates by the mixture's smooth
weighted round-robin (mtjax.data.mixture: the same rates, stages and fed-back rates as a
supervised run), each task reading its train split in its own shuffled order, repeated; a prompt
longer than the largest prompt bucket is skipped and counted. `next(state)` samples rl.samples
completions per prompt from state.params (mtjax.rl.rollout) and returns the rollout, sharded over
the batch axes, with per-task reward, pass@n and distinct-answer metrics (rl/<task>/...).

The source state is small JSON (step, sampler credits, a cursor per task, fed-back rates,
skipped counts), saved with every checkpoint as the loader state is; sampling keys come from
(seed, step). A run killed and resumed therefore draws the same prompts and samples the same
completions from the same parameters: the same run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mtjax.config import Config
from mtjax.data import mixture
from mtjax.data.rows import encode_example
from mtjax.errors import BadInputError
from mtjax.eval import decode
from mtjax.rl import rollout as rollout_lib
from mtjax.rl.update import ROLLOUT_KEYS, rollout_shardings


def generation_budget(config: Config, tokenizer: Any, examples: list[list[Any]]) -> int:
  """rl.max_new_tokens: a number, or "auto": the longest training target + EOS over the tasks,
  capped so a prompt of the smallest bucket still fits data.seq_len."""
  r = config.rl
  if isinstance(r.max_new_tokens, int):
    return r.max_new_tokens
  # Every training target (read by index: a task's examples may be read lazily).
  longest = max(len(encode_example(tokenizer, task[i].prompt, task[i].target)[1])
                for task in examples for i in range(len(task)))
  return max(1, min(longest, config.data.seq_len - min(r.buckets)))


class RLSource:
  """`next(state) -> Batch`: the step's rollout (see the module docstring)."""

  def __init__(self, setup: Any, state: Mapping[str, Any] | None = None):
    from mtjax import tasks as task_registry
    if jax.process_count() > 1:
      raise BadInputError("rl.algorithm", "RL runs are single-process for now (the sampler "
                          "builds the whole rollout on the host)")
    config = self.config = setup.config
    d, r = config.data, config.rl
    self.task_names = list(d.tasks)
    self.tasks = [task_registry.get(n) for n in d.tasks]
    self.tokenizer = setup.tokenizer
    self.examples = []
    for task in self.tasks:
      examples = task.source.load("train", config.seed, d.on_bad_record).examples
      if task.preprocess is not None:
        examples = [task.preprocess(e) for e in examples]
      self.examples.append(examples)
    self.width = generation_budget(config, self.tokenizer, self.examples)
    self.buckets = decode.buckets_for(max(d.seq_len - self.width, 1), r.buckets)
    self.schedule = mixture.schedule_from_config(config)
    zeros = {n: 0 for n in self.task_names}
    self.state: dict[str, Any] = copy.deepcopy(dict(state)) if state else {
        "step": 0, "credits": [0.0] * len(self.task_names), "cursors": dict(zeros),
        "feedback": [], "too_long": dict(zeros)}
    self.lag = d.feedback_lag
    self.sampler = rollout_lib.RolloutSampler(
        setup.graphdef, setup.spec, setup.mesh, self.tokenizer, self.tasks, prompts=r.prompts,
        num_samples=r.samples, max_new_tokens=self.width, buckets=self.buckets,
        diversity=r.diversity, normalize_std=r.normalize_std)
    self.shardings = rollout_shardings(setup.mesh)

  # ---------------------------------------------------------------- prompts

  def _example(self, task: int, cursor: int) -> Any:
    """The task's example at this cursor: its train split in a shuffled order per pass."""
    n = len(self.examples[task])
    epoch, k = divmod(cursor, n)
    order = np.random.default_rng([self.config.seed, task, epoch]).permutation(n)
    return self.examples[task][order[k]]

  def rates_at(self, step: int) -> np.ndarray:
    latest = [w for s, w in self.state["feedback"]
              if self.schedule.stage_start(step) <= s <= step]
    return mixture.normalized(latest[-1]) if latest else self.schedule.at(step)

  def draw_prompts(self, step: int) -> list[rollout_lib.Prompt]:
    rates = self.rates_at(step)
    sampler = mixture.Sampler(len(self.task_names), self.state["credits"])
    prompts = []
    top = self.buckets[-1]
    while len(prompts) < self.config.rl.prompts:
      task = sampler.draw(rates)
      name = self.task_names[task]
      for _ in range(len(self.examples[task]) + 1):
        cursor = self.state["cursors"][name]
        self.state["cursors"][name] = cursor + 1
        example = self._example(task, cursor)
        tokens, _ = encode_example(self.tokenizer, example.prompt, example.target)
        if len(tokens) <= top:
          prompts.append(rollout_lib.Prompt(np.asarray(tokens, np.int32), task, example))
          break
        self.state["too_long"][name] += 1
      else:
        raise BadInputError(f"task {name!r}", f"no prompt of its train split fits the largest "
                            f"prompt bucket ({top} tokens; data.seq_len {self.config.data.seq_len} "
                            f"minus {self.width} new tokens): raise data.seq_len")
    self.state["credits"] = sampler.state()
    return prompts

  # ---------------------------------------------------------------- BatchSource

  def next(self, state: Any) -> Any:
    from mtjax.train.batches import Batch
    step = self.state["step"]
    rates = self.rates_at(step)
    prompts = self.draw_prompts(step)
    r = self.sampler(state.params, prompts, seed=self.config.seed, step=step)
    n = self.config.rl.samples
    arrays = {k: jax.device_put(r.arrays[k], self.shardings[k]) for k in ROLLOUT_KEYS}
    arrays["rewards"] = jax.device_put(r.rewards.reshape(-1).astype(np.float32),
                                       self.shardings["advantages"])
    info: dict[str, Any] = {}
    for i, name in enumerate(self.task_names):
      info[f"data/{name}/rate"] = float(rates[i])
      info[f"data/{name}/too_long"] = self.state["too_long"][name]
      groups = r.task_ids == i
      if groups.any():
        info[f"rl/{name}/reward"] = float(r.rewards[groups].mean())
        info[f"rl/{name}/pass@{n}"] = float((r.rewards[groups].max(axis=1) > 0).mean())
        distinct = [len(set(c.tolist())) / n for c in r.classes[groups]]
        info[f"rl/{name}/distinct@{n}"] = float(np.mean(distinct))
    info["perf/sampler_compiles"] = sum(self.sampler.compiles.values())
    self.state["step"] = step + 1
    tokens = int(r.arrays["completion_mask"].sum())
    return Batch(arrays, tokens, info)

  def set_rates(self, rates: Mapping[str, float]) -> int:
    unknown = set(rates) - set(self.task_names)
    if unknown:
      raise KeyError(f"not tasks of this run: {sorted(unknown)}")
    current = self.rates_at(self.state["step"] + self.lag)
    vector = [float(rates.get(n, current[i])) for i, n in enumerate(self.task_names)]
    effective = self.state["step"] + self.lag
    self.state["feedback"].append([effective, vector])
    return effective

  def close(self) -> None:
    pass
