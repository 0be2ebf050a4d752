"""Attention behind one function, chosen by `model.attention`.

"reference": `jax.nn.dot_product_attention` with a boolean mask that is causal AND restricted to
the same packed segment, so packed examples never attend to each other (padding, segment 0,
attends to nothing; its rows stay finite). The fused kernels behind the same switch agree with it
on every real token; what they give padding tokens differs (the loss masks those):

- "splash": TPU Pallas splash attention (SegmentIds; padding is one more segment to it). Any
  dtype, GQA natively, a sliding window (LocalMask); length a multiple of 128.
- "cudnn": cuDNN flash attention with packed segments (q/kv offsets and lengths, at most
  `cudnn_max_segments(L)` segments per row: more, or an id reused by a later run, fall back to the
  reference at run time). bf16/f16, NVIDIA Hopper or newer, head dim a multiple of 8 up to 256,
  GQA and the sliding window natively; padding rows are zeroed.
- "triton": Pallas Triton flash attention (segment ids; kv heads repeated for GQA). bf16/f16 (its
  float32 dots are TF32), no sliding window, length a multiple of 128, head dim >= 16.
- "auto": splash on TPU, cudnn else triton on an NVIDIA GPU, the reference elsewhere.

A kernel that cannot take the shape, dtype, window or platform falls back to the reference with a
one-time warning. Asked for by name on CPU, the Pallas kernels (splash, triton) run in interpret
mode (slow; for tests). Decoding (`attend_cached`) is the reference only.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "cudnn", "splash", "triton")
_LANES = 128  # splash's and triton's sequence tiling
# One cuDNN segment slot per this many tokens: cuDNN sizes its softmax statistics and grid by
# batch * slots, so slots cost memory and launch work even when empty.
CUDNN_TOKENS_PER_SEGMENT = 64
_warned: set[tuple[str, str]] = set()


def segment_causal_mask(segment_ids: jax.Array, window: int = 0) -> jax.Array:
  """[B, L] -> bool [B, 1, L, L]: query i may see key j iff j <= i, same segment, not padding,
  and (with a sliding window W > 0) i - j < W."""
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
  if window:
    causal &= ~jnp.tril(jnp.ones((length, length), jnp.bool_), -window)
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids != 0)[:, :, None]
  return (causal[None] & same & real)[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
           implementation: str = "reference", window: int = 0,
           scale: float | None = None) -> jax.Array:
  """q [B, L, N, H], k/v [B, L, K, H] with N % K == 0 (GQA) -> [B, L, N, H]. The scores are
  scaled by `scale` (default H ** -0.5)."""
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}")
  name, interpret = _choose(implementation, q, window)
  if name == "splash":
    return _splash(q, k, v, segment_ids, window=window, interpret=interpret, scale=scale)
  if name == "triton":
    return _triton(q, k, v, segment_ids, interpret=interpret, scale=scale)
  if name == "cudnn":
    try:
      return _cudnn(q, k, v, segment_ids, window=window, scale=scale)
    except (NotImplementedError, RuntimeError, ValueError) as e:  # cuDNN's own checks, at trace
      _warn_once("cudnn", f"{type(e).__name__}: {e}")
  return _reference(q, k, v, segment_ids, window, scale)


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
               window: int, scale: float | None = None) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(segment_ids, window),
                                      scale=scale)


def available(implementation: str, platform: str, dtype: Any, length: int, window: int = 0,
              head_dim: int = 128) -> bool:
  """Whether `implementation` runs natively (not interpreted, no fallback) for this platform
  ("cpu" | "gpu" | "tpu"), compute dtype, sequence length, sliding window and head dim."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if implementation == "reference":
    return True
  if implementation == "splash":
    return platform == "tpu" and length % _LANES == 0
  if implementation == "triton":
    return (platform == "gpu" and _nvidia() and half and not window and length % _LANES == 0
            and head_dim >= 16)
  if implementation == "cudnn":
    return platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 256 and _cudnn_ok()
  if implementation == "auto":
    return True
  raise ValueError(f"unknown attention implementation {implementation!r}")


def _choose(implementation: str, q: jax.Array, window: int) -> tuple[str, bool]:
  """(kernel to run, interpret?) for a request, warning once when it falls back."""
  platform = _platform()
  fits = lambda name: available(name, platform, q.dtype, q.shape[1], window, q.shape[-1])
  shape = f"{q.dtype} L={q.shape[1]} H={q.shape[-1]} window={window}"
  if implementation == "reference":
    return "reference", False
  if implementation == "auto":
    candidates = {"tpu": ("splash",), "gpu": ("cudnn", "triton")}.get(platform, ())
    for name in candidates:
      if fits(name):
        return name, False
    if candidates:
      _warn_once("auto", f"no kernel for {shape} on {platform}")
    return "reference", False
  if fits(implementation):
    return implementation, False
  # Interpret mode: the Pallas kernels on CPU, within their own shape limits (tests).
  if platform == "cpu" and q.shape[1] % _LANES == 0 and (
      implementation == "splash" or (implementation == "triton" and not window)):
    return implementation, True
  _warn_once(implementation, f"cannot run {shape} on {platform}")
  return "reference", False


def _warn_once(implementation: str, why: str) -> None:
  if (implementation, why) not in _warned:
    _warned.add((implementation, why))
    warnings.warn(f"attention {implementation!r} falls back to the reference: {why}",
                  stacklevel=3)


def _platform() -> str:
  """The platform this trace runs on: the set mesh's devices (a CPU run next to a default GPU
  backend), else the default backend."""
  from jax._src import mesh as mesh_lib  # the concrete mesh is readable inside jit only here
  mesh = mesh_lib.get_concrete_mesh()
  if mesh is not None and not mesh.empty:
    return mesh.devices.flat[0].platform
  return jax.default_backend()


def _nvidia() -> bool:
  try:  # CUDA devices report a compute capability; ROCm ones do not
    return getattr(jax.devices("gpu")[0], "compute_capability", None) is not None
  except RuntimeError:
    return False


@functools.cache
def _cudnn_ok() -> bool:
  """cuDNN present and a Hopper or newer GPU (its packed-segment layout needs one)."""
  if not _nvidia():
    return False
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    fa.check_cudnn_version()
    capability = str(getattr(jax.devices("gpu")[0], "compute_capability", "0.0"))
    return tuple(int(x) for x in capability.split(".")) >= (9, 0)
  except (ImportError, RuntimeError, ValueError):
    return False


# ----------------------------------------------------------------------------- splash (TPU)

@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, length: int, window: int, interpret: bool) -> Any:
  """A splash kernel for one row: q [N, L, H], k/v [K, L, H] (GQA natively)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = next(b for b in (512, 256, _LANES) if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  shape = (length, length)
  # LocalMask (left, right): kv in [q - left, q + right]; a window W keeps i - j < W.
  head = (splash.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window
          else splash.CausalMask(shape))
  # Concrete mask arrays even when first built inside a jit: the kernel is cached across traces.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask([head] * num_heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, window: int,
            interpret: bool, scale: float) -> jax.Array:
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  kernel = _splash_kernel(q.shape[2], q.shape[1], window, interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, N, H] -> [B, N, L, H]
  q = q * jnp.asarray(scale, q.dtype)  # splash does not scale
  seg = segment_ids.astype(jnp.int32)
  one_row = lambda q1, k1, v1, s: kernel(q1, k1, v1, splash.SegmentIds(q=s, kv=s))
  out = jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v), seg)
  return heads_first(out)


# ----------------------------------------------------------------------------- triton (GPU)

def _triton(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
            interpret: bool, scale: float) -> jax.Array:
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # it wants N kv heads
  return gpu_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale,
                           causal=True, interpret=interpret)


# ----------------------------------------------------------------------------- cuDNN (GPU)

def cudnn_max_segments(length: int) -> int:
  """Segment slots per row given to cuDNN (at least 2: one slot is its unpacked layout)."""
  return max(2, length // CUDNN_TOKENS_PER_SEGMENT)


def packed_segments(segment_ids: jax.Array,
                    max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """segment_ids [B, L] -> (lengths [B, M], offsets [B, M + 1], fits []) in cuDNN's packed form:
  each row's runs of one non-zero id, in order, -1 past the last; `fits` is False when a row has
  more than M runs or an id comes back in a later run (one segment to the reference)."""
  b, m = segment_ids.shape[0], max_segments
  real = segment_ids != 0
  before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
  start = real & (segment_ids != before)
  run = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1  # the run each real token belongs to
  count = start.sum(axis=1, dtype=jnp.int32)
  rows = jnp.arange(b)[:, None]
  lengths = jnp.zeros((b, m), jnp.int32).at[rows, jnp.where(real, run, m)].add(1, mode="drop")
  lengths = jnp.where(jnp.arange(m) < count[:, None], lengths, -1)
  at = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
  offsets = jnp.full((b, m + 1), -1, jnp.int32).at[rows, jnp.where(start & (run < m), run, m + 1)
                                                   ].set(at, mode="drop")
  seen = jax.lax.cummax(jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0))), axis=1)
  fits = (count <= m).all() & (~start | (segment_ids > seen)).all()
  return lengths, offsets, fits


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
           window: int, scale: float) -> jax.Array:
  from jax._src.cudnn import fused_attention_stablehlo as fa
  lengths, offsets, fits = packed_segments(segment_ids, cudnn_max_segments(q.shape[1]))

  def fused(q, k, v, segment_ids):
    out: Any = fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths,
                                   q_offsets=offsets, kv_offsets=offsets,
                                   scale=scale, mask_type=fa.MaskType.PADDING_CAUSAL,
                                   sliding_window_length=window or None)
    # Tokens outside every segment are never written: zero them, no stale memory downstream.
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)

  # Rematerialized, so the untaken fallback keeps no [B, N, L, L] residuals under grad.
  fallback = jax.checkpoint(functools.partial(_reference, window=window, scale=scale))
  return jax.lax.cond(fits, fused, fallback, q, k, v, segment_ids)


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                  cache: dict[str, jax.Array], *, window: int = 0,
                  scale: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Attention for decoding: writes this call's T keys/values at cache["index"], then attends
  over every cached slot that holds a real token and is not in the future.

  q [B, T, N, H]; k, v [B, T, K, H]; segment_ids [B, T] (0 = left padding, never attended to).
  """
  index = cache["index"]
  ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
  cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
  valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], segment_ids != 0, index, axis=1)
  t, s = q.shape[1], ck.shape[1]
  query_at = index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= query_at[:, None]  # [T, S]
  if window:  # slots are consecutive positions (left padding is never valid)
    causal &= jnp.arange(s)[None, :] > query_at[:, None] - window
  mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, S]
  y = jax.nn.dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask=mask,
                                   scale=scale)
  return y, {"k": ck, "v": cv, "valid": valid, "index": index + t}
