"""Chunked head + loss against the dense path: per_token / multitask_objective on hidden @ head."""

import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.train import losses

T = 4


def packed_batch(rng: np.random.Generator, b: int, length: int, v: int) -> dict[str, jax.Array]:
  """Rows packed with several documents of different tasks, then right padding (task -1, mask 0)."""
  task_ids = np.full((b, length), -1, np.int32)
  segment_ids = np.zeros((b, length), np.int32)
  loss_mask = np.zeros((b, length), np.float32)
  for r in range(b):
    pos, seg = 0, 1
    end = length - int(rng.integers(1, length // 4))  # the rest of the row is padding
    while pos < end:
      n = min(int(rng.integers(3, 12)), end - pos)
      task_ids[r, pos:pos + n] = rng.choice([0, 1, 3])  # task 2 absent
      segment_ids[r, pos:pos + n] = seg
      loss_mask[r, pos + 1:pos + n] = 1.0  # prompt token of each document not scored
      pos, seg = pos + n, seg + 1
  batch = {"targets": rng.integers(0, v, size=(b, length)).astype(np.int32),
           "task_ids": task_ids, "segment_ids": segment_ids, "loss_mask": loss_mask}
  return {k: jnp.asarray(x) for k, x in batch.items()}


def make_inputs(seed: int, b: int, length: int, d: int, v: int, tied: bool, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, length, d)), dtype)
  head_shape = (v, d) if tied else (d, v)
  head = jnp.asarray(rng.normal(size=head_shape) * 2 / np.sqrt(d), dtype)
  return hidden, head, packed_batch(rng, b, length, v)


def dense_logits(hidden: jax.Array, head: jax.Array, tied: bool) -> jax.Array:
  """The reference head: full [B, L, V] float32 logits from float32 copies of the inputs."""
  h, w = hidden.astype(jnp.float32), head.astype(jnp.float32)
  spec = "bld,vd->blv" if tied else "bld,dv->blv"
  return jnp.einsum(spec, h, w, precision=jax.lax.Precision.HIGHEST)


def task_args(seed: int):
  rng = np.random.default_rng(100 + seed)
  weights = jnp.asarray(rng.random(T) * 2 + 0.1, jnp.float32)
  coefs = jnp.asarray([0.3, -0.2, 0.1, -0.05], jnp.float32)  # entropy bonus and penalty
  return weights, coefs


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 16, 4096])  # one token per row, ragged, a single chunk
def test_per_token_matches_dense(tied, chunk):
  hidden, head, batch = make_inputs(0, 3, 37, 16, 53, tied)  # 37 is not a multiple of any piece
  got = losses.per_token_chunked(hidden, head, batch["targets"], tied=tied, chunk=chunk)
  ref = losses.per_token(dense_logits(hidden, head, tied), batch["targets"])
  for k in ("ce", "entropy", "correct", "lse"):
    assert got[k].shape == (3, 37) and got[k].dtype == jnp.float32, k
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-5,
                               err_msg=k)


@pytest.mark.parametrize("tied", [False, True])
def test_argmax_ties_pick_the_first_max(tied):
  hidden, head, batch = make_inputs(1, 2, 9, 8, 10, tied)
  # Every logit appears twice (columns j and j + 5 equal): jnp.argmax picks j, never j + 5.
  head = jnp.concatenate([head[:5], head[:5]], 0) if tied else jnp.tile(head[:, :5], (1, 2))
  best = jnp.argmax(dense_logits(hidden, head, tied), -1)
  targets = jnp.where(jnp.arange(9) % 2 == 0, best, best + 5)
  got = losses.per_token_chunked(hidden, head, targets, tied=tied, chunk=4)
  ref = losses.per_token(dense_logits(hidden, head, tied), targets)
  np.testing.assert_array_equal(np.asarray(got["correct"]), np.asarray(ref["correct"]))
  np.testing.assert_array_equal(np.asarray(got["correct"]), np.tile(np.arange(9) % 2 == 0, (2, 1)))


def objectives(tied: bool, chunk: int, normalizer=None, z_loss: float = 1e-2, seed: int = 0):
  """(chunked, dense) objective functions of (hidden, head), both returning (obj, per_task)."""
  weights, coefs = task_args(seed)

  def chunked(hidden, head, batch):
    return losses.multitask_objective_chunked(hidden, head, batch, weights, coefs, tied=tied,
                                              z_loss=z_loss, normalizer=normalizer, chunk=chunk)

  def dense(hidden, head, batch):
    return losses.multitask_objective(dense_logits(hidden, head, tied), batch, weights, coefs,
                                      z_loss=z_loss, normalizer=normalizer)

  return chunked, dense


@pytest.mark.parametrize("tied,normalize", [(False, True), (True, False)])
def test_objective_gradients_and_metrics_float32(tied, normalize):
  hidden, head, batch = make_inputs(2, 3, 41, 16, 67, tied)
  normalizer = jnp.asarray([30.0, 0.0, 7.0, 12.0]) if normalize else None
  chunked, dense = objectives(tied, chunk=20, normalizer=normalizer)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (obj, per_task), (g_h, g_w) = grad(chunked)(hidden, head, batch)
  (ref_obj, ref_task), (r_h, r_w) = grad(dense)(hidden, head, batch)
  np.testing.assert_allclose(float(obj), float(ref_obj), rtol=1e-5, atol=1e-5)
  for k in ("loss", "entropy", "accuracy", "tokens"):
    np.testing.assert_allclose(np.asarray(per_task[k]), np.asarray(ref_task[k]), rtol=1e-5,
                               atol=1e-5, err_msg=k)
  assert float(per_task["tokens"][2]) == 0.0 and float(per_task["loss"][2]) == 0.0
  for g, r in ((g_h, r_h), (g_w, r_w)):
    assert g.dtype == jnp.float32 and g.shape == r.shape
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5 * scale)
  # Padding and unscored tokens get exactly zero gradient.
  dead = np.asarray(batch["loss_mask"]) == 0
  assert np.all(np.asarray(g_h)[dead] == 0)


@pytest.mark.parametrize("tied", [False, True])
def test_objective_gradients_bfloat16(tied):
  hidden, head, batch = make_inputs(3, 2, 64, 32, 96, tied, jnp.bfloat16)
  chunked, dense = objectives(tied, chunk=32)
  (obj, per_task), (g_h, g_w) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1),
                                                           has_aux=True))(hidden, head, batch)
  assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
  # Reference: float32 everywhere, at the same (bf16-representable) inputs.
  up = lambda x: x.astype(jnp.float32)
  ref_fn = jax.jit(jax.value_and_grad(dense, argnums=(0, 1), has_aux=True))
  (ref_obj, ref_task), (r_h, r_w) = ref_fn(up(hidden), up(head), batch)
  # The forward accumulates in float32 and never rounds logits, so it is float32-exact.
  np.testing.assert_allclose(float(obj), float(ref_obj), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(per_task["loss"]), np.asarray(ref_task["loss"]), rtol=1e-5)
  for g, r in ((g_h, r_h), (g_w, r_w)):
    g, r = np.asarray(up(g)), np.asarray(r)
    assert np.linalg.norm(g - r) <= 2e-2 * np.linalg.norm(r)
    np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2 * np.abs(r).max())


def _f32_buffer_sizes(hlo: str) -> list[int]:
  """Element counts of every float32 array shape mentioned in an HLO module's text."""
  sizes = []
  for dims in re.findall(r"f32\[([0-9,]*)\]", hlo):
    sizes.append(int(np.prod([int(x) for x in dims.split(",") if x])))
  return sizes


@pytest.mark.parametrize("tied", [False, True])
def test_no_full_logits_buffer(tied):
  b, length, d, v, chunk = 8, 128, 32, 8192, 64  # chunks of [8, 8, V]: 1/16 of the logits
  hidden, head, batch = make_inputs(4, b, length, d, v, tied)
  chunked, dense = objectives(tied, chunk=chunk)
  compile_ = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)).lower(
      hidden, head, batch).compile()
  got, ref = compile_(chunked), compile_(dense)
  full = b * length * v
  # The detector works: the dense step holds [B, L, V] float32 logits.
  assert max(_f32_buffer_sizes(ref.as_text())) >= full
  # The chunked step never names an f32 array bigger than two chunks of logits.
  assert max(_f32_buffer_sizes(got.as_text())) <= 2 * chunk * v < full
  got_mem, ref_mem = got.memory_analysis(), ref.memory_analysis()
  if got_mem is not None and ref_mem is not None:  # the backend reports buffer sizes
    assert got_mem.temp_size_in_bytes < full * 4 // 2
    assert got_mem.temp_size_in_bytes < ref_mem.temp_size_in_bytes // 4


SHARDED = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mtjax.train import losses
  auto = (jax.sharding.AxisType.Auto,) * 2  # as mtjax.parallel.mesh: GSPMD propagation
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=auto)
  rng = np.random.default_rng(0)
  b, length, d, v = 4, 24, 8, 64
  hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, size=(b, length)), jnp.int32)
  for tied in (False, True):
    head = jnp.asarray(rng.normal(size=(v, d) if tied else (d, v)), jnp.float32)
    f = lambda h, w: losses.per_token_chunked(h, w, targets, tied=tied, chunk=16)
    loss = lambda h, w: sum(jnp.sum(x * c) for x, c in zip(f(h, w).values(), (1.0, -0.3, 0.0, 0.1)))
    want = (f(hidden, head), jax.grad(loss, argnums=(0, 1))(hidden, head))
    hs = jax.device_put(hidden, NamedSharding(mesh, P("data", None, None)))
    ws = jax.device_put(head, NamedSharding(mesh, P("tensor", None) if tied else P(None, "tensor")))
    got = jax.jit(lambda h, w: (f(h, w), jax.grad(loss, argnums=(0, 1))(h, w)))(hs, ws)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
  print("sharded ok")
""")


@pytest.mark.multidevice
def test_sharded_batch_and_vocab_match_unsharded():
  # Own process: the 4 host devices must be requested before jax initializes.
  out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sharded ok" in out.stdout
