"""The model: packed examples never see each other; GQA attention matches a numpy reference."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtjax.config import ModelConfig
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.model import Decoder, ModelSpec, attention


def _model(**kw):
  cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, **kw)
  vocab = tokenizer_lib.get("byte").vocab_size
  return Decoder(ModelSpec.from_config(cfg, vocab, "float32"), nnx.Rngs(0))


def test_packed_examples_do_not_attend_to_each_other():
  model = _model()
  rng = np.random.default_rng(0)
  a, b = rng.integers(3, 200, size=7), rng.integers(3, 200, size=9)
  L = 20
  alone = np.zeros((1, L), np.int32); alone[0, :9] = b
  seg_alone = np.zeros((1, L), np.int32); seg_alone[0, :9] = 1
  pos_alone = np.zeros((1, L), np.int32); pos_alone[0, :9] = np.arange(9)
  packed = np.zeros((1, L), np.int32); packed[0, :7] = a; packed[0, 7:16] = b
  seg_packed = np.zeros((1, L), np.int32); seg_packed[0, :7] = 1; seg_packed[0, 7:16] = 2
  pos_packed = np.zeros((1, L), np.int32); pos_packed[0, :7] = np.arange(7); pos_packed[0, 7:16] = np.arange(9)
  out_alone = model(jnp.asarray(alone), jnp.asarray(pos_alone), jnp.asarray(seg_alone))
  out_packed = model(jnp.asarray(packed), jnp.asarray(pos_packed), jnp.asarray(seg_packed))
  np.testing.assert_allclose(out_packed[0, 7:16], out_alone[0, :9], rtol=2e-5, atol=2e-5)
  assert np.isfinite(np.asarray(out_packed)).all()  # padding rows stay finite


def test_gqa_attention_matches_numpy():
  rng = np.random.default_rng(1)
  B, L, N, K, H = 2, 6, 4, 2, 8
  q, k, v = (rng.normal(size=(B, L, n, H)).astype(np.float32) for n in (N, K, K))
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
  out = np.asarray(attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg)))
  for bi in range(B):
    for i in range(L):
      if seg[bi, i] == 0:
        continue
      for h in range(N):
        kv = h // (N // K)
        keys = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
        s = np.array([q[bi, i, h] @ k[bi, j, kv] for j in keys]) / np.sqrt(H)
        p = np.exp(s - s.max()); p /= p.sum()
        ref = sum(pj * v[bi, j, kv] for pj, j in zip(p, keys))
        np.testing.assert_allclose(out[bi, i, h], ref, rtol=1e-5, atol=1e-5)


def test_remat_tied_and_bf16_variants_run():
  x = jnp.ones((2, 8), jnp.int32)
  pos = jnp.tile(jnp.arange(8), (2, 1))
  seg = jnp.ones((2, 8), jnp.int32)
  base = _model()(x, pos, seg)
  remat = _model(remat="full")(x, pos, seg)
  np.testing.assert_allclose(remat, base, rtol=1e-6)  # same init, same math
  tied = _model(tie_embeddings=True)
  assert not hasattr(tied, "lm_head")
  bf16 = _model(dtype="bfloat16")(x, pos, seg)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, base, atol=0.1)
