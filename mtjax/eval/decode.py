"""Autoregressive generation with a KV cache, jitted with fixed shapes.

Prompts are left-padded to a bucket length (one compilation per bucket, whatever the prompt
lengths inside it) and batched to a fixed batch size. Greedy and sampling (temperature, top-k,
top-p) share one compiled function: the sampling settings are array arguments, and temperature
0 is greedy. So is each row's token budget: a row stops at EOS or after its own budget (one
compilation serves every task's budget), and the loop ends early when every row is done. Also
returns each token's log-probability under the model (temperature 1), for sequence-level entropy
estimates.

With a model length (`max_len`, the length the model was trained on), prompt + new tokens never
exceed it: a row's budget is capped by max_len - prompt length, and each bucket's KV cache holds
the bucket plus the most new tokens any prompt of that bucket can get (see `Generator.width`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtjax.model import ModelSpec, init_cache
from mtjax.parallel import sharding as sharding_lib

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


def buckets_for(max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
  """Prompt buckets up to a model length: the buckets below it, then the length itself."""
  return tuple(sorted(b for b in set(buckets) if b < max_len)) + (max_len,)


def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                 top_p: jax.Array) -> jax.Array:
  """logits [B, V] -> tokens [B]. temperature 0: argmax; top_k 0: off; top_p 1: off."""
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  desc = jnp.sort(scaled, axis=-1)[:, ::-1]
  vocab = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
  # top-p: keep the smallest set of most likely tokens whose probability reaches top_p.
  cum = jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1)
  cut = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # index of the last token kept
  pth = jnp.take_along_axis(desc, jnp.minimum(cut, vocab - 1), axis=-1)
  masked = jnp.where((scaled < kth) | (scaled < pth), -jnp.inf, scaled)
  sampled = jax.random.categorical(key, masked, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy)


def make_generate_fn(graphdef: Any, spec: ModelSpec, max_new_tokens: int | Callable[[int], int],
                     eos_id: int, stop_ids: Sequence[int] = ()):
  """(params, tokens [B, P], valid [B, P], budget [B], key, temperature, top_k, top_p, adapter [B])
  -> (new tokens [B, N], their log-probs [B, N], lengths [B]). adapter: each row's LoRA adapter
  (its task id; used with per-task adapters only). Left-padded prompts. A row ends at
  eos_id or any of stop_ids (the stop token is kept in the output; the rest is eos_id) or after
  `budget` tokens. N (the most new tokens, a static shape; the KV cache holds P + N) is
  max_new_tokens, or max_new_tokens(P) when it is a function of the prompt width; budgets above
  N act as N."""
  stops = jnp.asarray(sorted({eos_id, *stop_ids}), jnp.int32)
  width_of = max_new_tokens if callable(max_new_tokens) else lambda _: max_new_tokens

  def generate(params, tokens, valid, budget, key, temperature, top_k, top_p, adapter):
    batch, prompt_len = tokens.shape
    width = width_of(prompt_len)
    segment_ids = valid.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    cache = init_cache(spec, batch, prompt_len + width)
    logits, cache = nnx.merge(graphdef, params)(
        tokens, positions, segment_ids, cache,
        adapter_ids=jnp.broadcast_to(adapter[:, None], tokens.shape))
    budget = jnp.minimum(budget.astype(jnp.int32), width)
    init = {
        "t": jnp.zeros((), jnp.int32), "cache": cache, "logits": logits[:, -1],
        "pos": positions[:, -1] + 1, "out": jnp.full((batch, width), eos_id, jnp.int32),
        "logp": jnp.zeros((batch, width), jnp.float32),
        "done": budget <= 0, "length": jnp.zeros((batch,), jnp.int32),
    }

    def cond(s):
      return (s["t"] < width) & ~jnp.all(s["done"])

    def body(s):
      token = sample_token(s["logits"], jax.random.fold_in(key, s["t"]), temperature, top_k, top_p)
      token = jnp.where(s["done"], eos_id, token).astype(jnp.int32)
      logp = jnp.take_along_axis(jax.nn.log_softmax(s["logits"]), token[:, None], axis=-1)[:, 0]
      out = jax.lax.dynamic_update_slice_in_dim(s["out"], token[:, None], s["t"], axis=1)
      logps = jax.lax.dynamic_update_slice_in_dim(
          s["logp"], jnp.where(s["done"], 0.0, logp)[:, None], s["t"], axis=1)
      stop = jnp.isin(token, stops)
      length = s["length"] + (~s["done"] & ~stop)
      done = s["done"] | stop | (s["t"] + 1 >= budget)  # the row's budget is spent
      logits, cache = nnx.merge(graphdef, params)(
          token[:, None], s["pos"][:, None], jnp.ones((batch, 1), jnp.int32), s["cache"],
          adapter_ids=adapter[:, None])
      return {"t": s["t"] + 1, "cache": cache, "logits": logits[:, 0], "pos": s["pos"] + 1,
              "out": out, "logp": logps, "done": done, "length": length}

    final = jax.lax.while_loop(cond, body, init)
    return final["out"], final["logp"], final["length"]

  return jax.jit(generate)


@dataclasses.dataclass
class Sample:
  tokens: np.ndarray  # generated tokens before EOS
  logprob: float  # sum of log-probabilities of the generated tokens (and EOS), temperature 1


class Generator:
  """Batched, bucketed generation on a mesh; counts compilations per bucket.

  max_new_tokens: the largest budget a call may ask for, and the default. max_len: the model's
  length (None: no limit): a prompt of p tokens gets at most max_len - p new tokens, and a prompt
  that leaves no room (p >= max_len) or is longer than the largest bucket cannot be generated for
  (`room` is 0; the call raises ValueError: callers skip such prompts first).
  """

  def __init__(self, graphdef: Any, spec: ModelSpec, mesh: jax.sharding.Mesh, *,
               max_new_tokens: int, eos_id: int, pad_id: int = 0, batch_size: int = 8,
               buckets: Sequence[int] = DEFAULT_BUCKETS, stop_ids: Sequence[int] = (),
               max_len: int | None = None):
    self.mesh, self.batch_size, self.buckets = mesh, batch_size, tuple(sorted(buckets))
    self.eos_id, self.pad_id = eos_id, pad_id
    self.stop_ids = tuple(dict.fromkeys([eos_id, *stop_ids]))  # generation ends at any of these
    self.max_new_tokens, self.max_len = max_new_tokens, max_len
    self._fn = make_generate_fn(graphdef, spec, self.width, eos_id, stop_ids)
    self._row_sharding = sharding_lib.named(mesh, ("batch", "length"))
    self.compiles: dict[int, int] = {}

  def width(self, bucket: int) -> int:
    """The most new tokens a prompt of this bucket can get: max_new_tokens, and with max_len the
    room its shortest prompt (one more than the bucket below) leaves. The bucket's KV cache holds
    bucket + width slots (left padding included; positions never pass max_len)."""
    if self.max_len is None:
      return self.max_new_tokens
    below = max((b for b in self.buckets if b < bucket), default=0)
    return max(1, min(self.max_new_tokens, self.max_len - below - 1))

  def bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest bucket {self.buckets[-1]}")

  def room(self, length: int) -> int:
    """The most new tokens a prompt of `length` tokens can get (0: it cannot be generated for)."""
    if length > self.buckets[-1]:
      return 0
    room = self.max_new_tokens if self.max_len is None else min(self.max_new_tokens,
                                                                  self.max_len - length)
    return max(room, 0)

  def __call__(self, params: Any, prompts: Sequence[np.ndarray], *, num_samples: int = 1,
               seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               max_new_tokens: int | Sequence[int] | None = None,
               adapter: int = 0) -> list[list[Sample]]:
    """For each prompt (token ids, BOS included), num_samples Samples. max_new_tokens: a budget
    for every prompt or one per prompt (default: the generator's), capped by `room`. adapter:
    the LoRA adapter (task id) of every prompt, with per-task adapters."""
    from mtjax.monitoring import CompileCounter
    if max_new_tokens is None:
      max_new_tokens = self.max_new_tokens
    budgets = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
               else list(max_new_tokens))
    if len(budgets) != len(prompts):
      raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(num_samples)]
    results: list[list[Sample]] = [[] for _ in prompts]
    by_bucket: dict[int, list] = {}
    for i, p in rows:
      bucket = self.bucket(len(p))
      if self.room(len(p)) < 1:
        raise ValueError(f"prompt of {len(p)} tokens leaves no room for a new token under the "
                         f"model length {self.max_len}")
      by_bucket.setdefault(bucket, []).append((i, p))
    key = jax.random.key(seed)
    for bucket, items in sorted(by_bucket.items()):
      for start in range(0, len(items), self.batch_size):
        chunk = items[start : start + self.batch_size]
        tokens = np.full((self.batch_size, bucket), self.pad_id, np.int32)
        valid = np.zeros((self.batch_size, bucket), bool)
        budget = np.zeros((self.batch_size,), np.int32)  # filler rows: done at once
        tokens[:, -1] = self.eos_id  # filler rows: a one-token prompt
        valid[:, -1] = True
        for r, (i, p) in enumerate(chunk):
          tokens[r] = self.pad_id
          valid[r] = False
          tokens[r, bucket - len(p):] = p
          valid[r, bucket - len(p):] = True
          budget[r] = min(budgets[i], self.room(len(p)))
        args = (jax.device_put(tokens, self._row_sharding), jax.device_put(valid, self._row_sharding),
                budget, jax.random.fold_in(key, bucket * 100_003 + start), jnp.float32(temperature),
                jnp.int32(top_k), jnp.float32(top_p),
                np.full((self.batch_size,), adapter, np.int32))
        counter = CompileCounter()
        with jax.set_mesh(self.mesh), counter:
          out, logp, length = self._fn(params, *args)
        self.compiles[bucket] = self.compiles.get(bucket, 0) + counter.count
        out, logp, length = jax.device_get((out, logp, length))
        for r, (i, _) in enumerate(chunk):
          n = int(length[r])
          results[i].append(Sample(out[r, :n], float(logp[r, : min(n + 1, out.shape[1])].sum())))
    return results
