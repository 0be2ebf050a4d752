"""Autoregressive generation with a KV cache, jitted with fixed shapes.

Prompts are left-padded to a bucket length (one compilation per bucket, whatever the prompt
lengths inside it) and batched to a fixed batch size. Greedy and sampling (temperature, top-k,
top-p) share one compiled function: the sampling settings are array arguments, and temperature
0 is greedy. Generation stops at EOS (per row) or after max_new_tokens; the loop ends early when
every row is done. Also returns each token's log-probability under the model (temperature 1),
for sequence-level entropy estimates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtjax.model import ModelSpec, init_cache
from mtjax.parallel import sharding as sharding_lib

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


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


def make_generate_fn(graphdef: Any, spec: ModelSpec, max_new_tokens: int, eos_id: int,
                     stop_ids: Sequence[int] = ()):
  """(params, tokens [B, P], valid [B, P], key, temperature, top_k, top_p)
  -> (new tokens [B, N], their log-probs [B, N], lengths [B]). Left-padded prompts. A row ends at
  eos_id or any of stop_ids (the stop token is kept in the output; the rest is eos_id)."""
  stops = jnp.asarray(sorted({eos_id, *stop_ids}), jnp.int32)

  def generate(params, tokens, valid, key, temperature, top_k, top_p):
    batch, prompt_len = tokens.shape
    segment_ids = valid.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    cache = init_cache(spec, batch, prompt_len + max_new_tokens)
    logits, cache = nnx.merge(graphdef, params)(tokens, positions, segment_ids, cache)
    init = {
        "t": jnp.zeros((), jnp.int32), "cache": cache, "logits": logits[:, -1],
        "pos": positions[:, -1] + 1, "out": jnp.full((batch, max_new_tokens), eos_id, jnp.int32),
        "logp": jnp.zeros((batch, max_new_tokens), jnp.float32),
        "done": jnp.zeros((batch,), jnp.bool_), "length": jnp.zeros((batch,), jnp.int32),
    }

    def cond(s):
      return (s["t"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
      token = sample_token(s["logits"], jax.random.fold_in(key, s["t"]), temperature, top_k, top_p)
      token = jnp.where(s["done"], eos_id, token).astype(jnp.int32)
      logp = jnp.take_along_axis(jax.nn.log_softmax(s["logits"]), token[:, None], axis=-1)[:, 0]
      out = jax.lax.dynamic_update_slice_in_dim(s["out"], token[:, None], s["t"], axis=1)
      logps = jax.lax.dynamic_update_slice_in_dim(
          s["logp"], jnp.where(s["done"], 0.0, logp)[:, None], s["t"], axis=1)
      stop = jnp.isin(token, stops)
      length = s["length"] + (~s["done"] & ~stop)
      done = s["done"] | stop
      logits, cache = nnx.merge(graphdef, params)(
          token[:, None], s["pos"][:, None], jnp.ones((batch, 1), jnp.int32), s["cache"])
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
  """Batched, bucketed generation on a mesh; counts compilations per bucket."""

  def __init__(self, graphdef: Any, spec: ModelSpec, mesh: jax.sharding.Mesh, *,
               max_new_tokens: int, eos_id: int, pad_id: int = 0, batch_size: int = 8,
               buckets: Sequence[int] = DEFAULT_BUCKETS, stop_ids: Sequence[int] = ()):
    self.mesh, self.batch_size, self.buckets = mesh, batch_size, tuple(sorted(buckets))
    self.eos_id, self.pad_id = eos_id, pad_id
    self._fn = make_generate_fn(graphdef, spec, max_new_tokens, eos_id, stop_ids)
    self._row_sharding = sharding_lib.named(mesh, ("batch", "length"))
    self.compiles: dict[int, int] = {}

  def bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest bucket {self.buckets[-1]}")

  def __call__(self, params: Any, prompts: Sequence[np.ndarray], *, num_samples: int = 1,
               seed: int = 0, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0) -> list[list[Sample]]:
    """For each prompt (token ids, BOS included), num_samples Samples."""
    from mtjax.monitoring import CompileCounter
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(num_samples)]
    results: list[list[Sample]] = [[] for _ in prompts]
    by_bucket: dict[int, list] = {}
    for i, p in rows:
      by_bucket.setdefault(self.bucket(len(p)), []).append((i, p))
    key = jax.random.key(seed)
    for bucket, items in sorted(by_bucket.items()):
      for start in range(0, len(items), self.batch_size):
        chunk = items[start : start + self.batch_size]
        tokens = np.full((self.batch_size, bucket), self.pad_id, np.int32)
        valid = np.zeros((self.batch_size, bucket), bool)
        tokens[:, -1] = self.eos_id  # filler rows: a one-token prompt
        valid[:, -1] = True
        for r, (_, p) in enumerate(chunk):
          tokens[r] = self.pad_id
          valid[r] = False
          tokens[r, bucket - len(p):] = p
          valid[r, bucket - len(p):] = True
        args = (jax.device_put(tokens, self._row_sharding), jax.device_put(valid, self._row_sharding),
                jax.random.fold_in(key, bucket * 100_003 + start), jnp.float32(temperature),
                jnp.int32(top_k), jnp.float32(top_p))
        counter = CompileCounter()
        with jax.set_mesh(self.mesh), counter:
          out, logp, length = self._fn(params, *args)
        self.compiles[bucket] = self.compiles.get(bucket, 0) + counter.count
        out, logp, length = jax.device_get((out, logp, length))
        for r, (i, _) in enumerate(chunk):
          n = int(length[r])
          results[i].append(Sample(out[r, :n], float(logp[r, : min(n + 1, out.shape[1])].sum())))
    return results
