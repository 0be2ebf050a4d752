"""Rollouts: n samples per prompt from the current policy, scored, as one fixed-shape rollout.

prompts (token ids with BOS, a task id and the example each) -> the KV-cache sampler draws
`num_samples` completions per prompt (temperature 1, no truncation: the log-probs the sampler
records are those of the policy it sampled from, which the PPO ratio needs) -> each completion
is decoded and judged by its task's verifier (reward 1 or 0) and mapped to its canonical answer
(objectives.canonical_for: DARLING's equivalence classes) -> group advantages (GRPO) or DARLING
rewards and advantages -> the rollout arrays of update.py.

Shapes are fixed so nothing recompiles: the sampler runs `rows` = prompts x num_samples rows per
call (filler rows where a bucket has fewer), one compilation per prompt bucket; every rollout is
left-padded to the largest bucket, so the update sees one shape [rows, max bucket + width] for
the whole run. Sampling keys come from (seed, step): a step's rollout is a function of the
parameters, the prompts and the step, so a resumed run samples the same completions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mtjax.eval import decode
from mtjax.model import ModelSpec
from mtjax.parallel import sharding as sharding_lib
from mtjax.rl import objectives
from mtjax.rl.update import rollout_from_samples


@dataclasses.dataclass
class Prompt:
  tokens: np.ndarray  # [BOS] prompt, as the model reads it
  task_id: int
  example: Any  # the task's Example (the verifier's input)


@dataclasses.dataclass
class Rollout:
  arrays: dict[str, np.ndarray]  # update.py's rollout (host), [rows, max bucket + width]
  rewards: np.ndarray  # [P, n] the verifier's 0/1 per sample
  classes: np.ndarray  # [P, n] equivalence classes of the canonical answers within a prompt
  advantages: np.ndarray  # [P, n] what the update gets
  task_ids: np.ndarray  # [P]
  texts: list[list[str]]  # [P][n] decoded completions


class RolloutSampler:
  """Samples, scores and lays out rollouts of `prompts` x `num_samples` rows (see the module)."""

  def __init__(self, graphdef: Any, spec: ModelSpec, mesh: jax.sharding.Mesh, tokenizer: Any,
               tasks: Sequence[Any], *, prompts: int, num_samples: int, max_new_tokens: int,
               buckets: Sequence[int], diversity: str = "none", normalize_std: bool = True):
    if diversity not in ("none", "darling"):
      raise ValueError(f"diversity: expected none or darling, got {diversity!r}")
    self.mesh, self.tokenizer, self.tasks = mesh, tokenizer, list(tasks)
    self.prompts, self.num_samples, self.width = prompts, num_samples, max_new_tokens
    self.buckets = tuple(sorted(buckets))
    self.diversity, self.normalize_std = diversity, normalize_std
    self.rows = prompts * num_samples
    self._fn = decode.make_generate_fn(graphdef, spec, max_new_tokens, tokenizer.eos_id,
                                       tuple(tokenizer.stop_ids))
    self._row_sharding = sharding_lib.named(mesh, ("batch", "length"))
    self.compiles: dict[int, int] = {}
    self._canonical = [objectives.canonical_for(t) for t in self.tasks]

  def bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"a prompt of {length} tokens is longer than the largest bucket "
                     f"{self.buckets[-1]}")

  def _sample(self, params: Any, rows: list[tuple[int, np.ndarray, int]], bucket: int,
              key: jax.Array) -> tuple[np.ndarray, ...]:
    """One call of the compiled sampler for rows (index, prompt, task id) of one bucket."""
    from mtjax.monitoring import CompileCounter
    tok = self.tokenizer
    tokens = np.full((self.rows, bucket), tok.pad_id, np.int32)
    valid = np.zeros((self.rows, bucket), bool)
    tokens[:, -1], valid[:, -1] = tok.eos_id, True  # filler rows: a one-token prompt, budget 0
    budget = np.zeros((self.rows,), np.int32)
    adapter = np.zeros((self.rows,), np.int32)
    for r, (_, p, task) in enumerate(rows):
      tokens[r], valid[r] = tok.pad_id, False
      tokens[r, bucket - len(p):], valid[r, bucket - len(p):] = p, True
      budget[r], adapter[r] = self.width, task
    args = (jax.device_put(tokens, self._row_sharding), jax.device_put(valid, self._row_sharding),
            budget, key, np.float32(1.0), np.int32(0), np.float32(1.0), adapter)
    counter = CompileCounter()
    with jax.set_mesh(self.mesh), counter:
      out, logp, length = self._fn(params, *args)
    self.compiles[bucket] = self.compiles.get(bucket, 0) + counter.count
    out, logp, length = jax.device_get((out, logp, length))
    return tokens, valid, np.asarray(out), np.asarray(logp), np.asarray(length), budget

  def __call__(self, params: Any, prompts: Sequence[Prompt], *, seed: int, step: int) -> Rollout:
    if len(prompts) != self.prompts:
      raise ValueError(f"{len(prompts)} prompts, expected {self.prompts} (a fixed shape)")
    n, top = self.num_samples, self.buckets[-1]
    key = jax.random.fold_in(jax.random.key(seed), step)
    by_bucket: dict[int, list[tuple[int, np.ndarray, int]]] = {}
    for i, p in enumerate(prompts):
      for s in range(n):
        by_bucket.setdefault(self.bucket(len(p.tokens)), []).append((i * n + s, p.tokens, p.task_id))
    # Every row's arrays, left-padded to the largest bucket.
    tokens = np.full((self.rows, top), self.tokenizer.pad_id, np.int32)
    valid = np.zeros((self.rows, top), bool)
    out = np.full((self.rows, self.width), self.tokenizer.eos_id, np.int32)
    logp = np.zeros((self.rows, self.width), np.float32)
    length = np.zeros((self.rows,), np.int32)
    budget = np.zeros((self.rows,), np.int32)
    for bucket, rows in sorted(by_bucket.items()):
      t, v, o, lp, ln, bg = self._sample(params, rows, bucket, jax.random.fold_in(key, bucket))
      for r, (index, _, _) in enumerate(rows):
        tokens[index, top - bucket:], valid[index, top - bucket:] = t[r], v[r]
        out[index], logp[index], length[index], budget[index] = o[r], lp[r], ln[r], bg[r]
    texts = [[self.tokenizer.decode(out[i * n + s, : length[i * n + s]]) for s in range(n)]
             for i in range(len(prompts))]
    rewards = np.array([[float(bool(self.tasks[p.task_id].is_correct(p.example, text)))
                         for text in group] for p, group in zip(prompts, texts)], np.float32)
    keys = [[self._canonical[p.task_id](p.example, text) for text in group]
            for p, group in zip(prompts, texts)]
    classes = objectives.equivalence_classes(keys)
    if self.diversity == "darling":
      advantages = objectives.darling_advantages(rewards, classes, normalize_std=False)
    else:
      advantages = objectives.group_advantages(rewards, normalize_std=self.normalize_std)
    advantages = np.asarray(advantages, np.float32)
    task_ids = np.array([p.task_id for p in prompts], np.int32)
    arrays = rollout_from_samples(tokens, valid, out, logp, length, budget,
                                  advantages.reshape(-1), np.repeat(task_ids, n))
    return Rollout(arrays, rewards, classes, advantages, task_ids, texts)
