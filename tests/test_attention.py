"""The attention kernels against the reference on packed batches, forward and gradients.

On CPU the Pallas kernels (splash, triton) run in interpret mode; cuDNN and the compiled Triton
kernel need a GPU (bench/gpu_check.sh runs the `gpu` tests)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.model import attention
from conftest import requires_gpu

B, L, N, K, H = 2, 256, 4, 2, 16
# Row 0: two examples then padding; row 1: three examples then padding (segment 0).
SEGMENTS = ((100, 90), (50, 70, 110))




def _batch(dtype, length=L, heads=N, kv_heads=K, head_dim=H, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, length), np.int32)
  for row, sizes in enumerate(SEGMENTS):
    start = 0
    for i, n in enumerate(sizes):
      seg[row, start:start + n] = i + 1; start += n
  q = rng.normal(size=(B, length, heads, head_dim))
  k = rng.normal(size=(B, length, kv_heads, head_dim))
  v = rng.normal(size=(B, length, kv_heads, head_dim))
  # The loss masks padding: the cotangent is zero there, as is the comparison.
  cot = rng.normal(size=(B, length, heads, head_dim)) * (seg != 0)[..., None, None]
  return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(seg), jnp.asarray(cot, dtype))


def _forward_and_grads(implementation, q, k, v, seg, cot, window=0):
  def loss(q, k, v):
    out = attention.attend(q, k, v, seg, implementation=implementation, window=window)
    return (out.astype(jnp.float32) * cot.astype(jnp.float32)).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _compare(implementation, dtype, window=0, **shape):
  q, k, v, seg, cot = _batch(dtype, **shape)
  real = np.asarray(seg) != 0
  attention._warned.clear()
  with warnings.catch_warnings():
    warnings.filterwarnings("error", "attention .* falls back")  # a fallback would hide the kernel
    out, grads = _forward_and_grads(implementation, q, k, v, seg, cot, window)
  # The reference in float32 on the same (rounded) inputs.
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want, want_grads = _forward_and_grads("reference", up(q), up(k), up(v), seg, up(cot), window)
  pairs = [(np.asarray(out, np.float32)[real], np.asarray(want)[real])]
  pairs += [(np.asarray(g, np.float32), np.asarray(w)) for g, w in zip(grads, want_grads)]
  for i, (got, ref) in enumerate(pairs):
    name = ("out", "dq", "dk", "dv")[i]
    assert np.isfinite(got).all(), name
    if dtype == jnp.float32:
      np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=name)
    else:  # bf16: relative to the reference's norm
      error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
      assert error < 2e-2, (name, error)


@pytest.mark.parametrize("window", [0, 48])
def test_splash_matches_reference_float32(window):
  _compare("splash", jnp.float32, window)


def test_splash_matches_reference_bf16():
  _compare("splash", jnp.bfloat16, window=48)


def test_triton_interpreted_matches_reference_float32():
  _compare("triton", jnp.float32)


def test_auto_on_cpu_is_the_reference():
  q, k, v, seg, _ = _batch(jnp.float32)
  for window in (0, 48):
    got = attention.attend(q, k, v, seg, implementation="auto", window=window)
    want = attention.attend(q, k, v, seg, implementation="reference", window=window)
    np.testing.assert_array_equal(got, want)
  assert not attention.available("splash", "cpu", jnp.float32, L)
  assert attention.available("splash", "tpu", jnp.float32, L)
  assert not attention.available("splash", "tpu", jnp.float32, L + 8)
  assert not attention.available("triton", "gpu", jnp.bfloat16, L, window=48)


def test_unknown_implementation_raises():
  q, k, v, seg, _ = _batch(jnp.float32)
  with pytest.raises(ValueError, match="unknown attention implementation"):
    attention.attend(q, k, v, seg, implementation="flash")


def test_unfit_kernels_fall_back_to_the_reference_with_one_warning():
  q, k, v, seg, _ = _batch(jnp.float32)
  want = attention.attend(q, k, v, seg, implementation="reference")
  attention._warned.clear()
  with pytest.warns(UserWarning, match="'cudnn' falls back"):
    got = attention.attend(q, k, v, seg, implementation="cudnn")  # no GPU, and float32
  np.testing.assert_array_equal(got, want)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the second time is quiet
    attention.attend(q, k, v, seg, implementation="cudnn")
  with pytest.warns(UserWarning, match="'triton' falls back"):
    attention.attend(q, k, v, seg, implementation="triton", window=48)  # no window in triton
  short = [x[:, :200] for x in (q, k, v, seg)]
  with pytest.warns(UserWarning, match="'splash' falls back"):  # not a multiple of 128
    got = attention.attend(*short, implementation="splash")
  np.testing.assert_array_equal(got, attention.attend(*short, implementation="reference"))


def test_packed_segments_describe_the_reference_mask():
  seg = np.zeros((3, 64), np.int32)
  seg[0, :10], seg[0, 10:30] = 1, 2  # trailing padding
  seg[1, 5:20], seg[1, 20:64] = 1, 2  # left padding, full to the end
  seg[2, 3:9] = 4  # one segment, ids need not start at 1
  lengths, offsets, fits = attention.packed_segments(jnp.asarray(seg), 3)
  assert bool(fits)
  np.testing.assert_array_equal(lengths, [[10, 20, -1], [15, 44, -1], [6, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 10, -1, -1], [5, 20, -1, -1], [3, -1, -1, -1]])
  # Rebuilt from (offsets, lengths), the causal packed mask is the reference's.
  rebuilt = np.zeros((3, 64, 64), bool)
  for r in range(3):
    for start, n in zip(np.asarray(offsets)[r], np.asarray(lengths)[r]):
      if n > 0:
        rebuilt[r, start:start + n, start:start + n] = np.tril(np.ones((n, n), bool))
  np.testing.assert_array_equal(rebuilt, attention.segment_causal_mask(jnp.asarray(seg))[:, 0])
  # More runs than slots, or an id reused by a later run: not expressible, so not `fits`.
  assert not bool(attention.packed_segments(jnp.asarray(seg), 1)[2])
  reused = seg.copy(); reused[0, 30:40] = 1
  assert not bool(attention.packed_segments(jnp.asarray(reused), 3)[2])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("implementation", ["cudnn", "triton"])
def test_gpu_kernels_match_reference_bf16(implementation):
  # GPU-sized heads (cuDNN: head dim a multiple of 8; Triton: >= 16).
  _compare(implementation, jnp.bfloat16, length=512, heads=8, kv_heads=2, head_dim=64)


@pytest.mark.gpu
@requires_gpu
def test_cudnn_sliding_window_matches_reference_bf16():
  _compare("cudnn", jnp.bfloat16, window=48, length=512, heads=8, kv_heads=2, head_dim=64)


@pytest.mark.gpu
@requires_gpu
def test_auto_on_gpu_picks_a_kernel():
  assert attention._choose("auto", jnp.zeros((1, 512, 8, 64), jnp.bfloat16), 0)[0] in (
      "cudnn", "triton")
