"""The benchmark's comparison arm: the mtjax decoder, optimizer and loss terms in PyTorch eager.

Only `mtjax bench` uses it, and only when torch is installed. The weights can be copied from the
JAX parameters, so the objective can be checked against `multitask_objective` (tests/test_bench.py).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
# torch is optional (not a dependency): the type check runs without it.
import torch  # pyright: ignore[reportMissingImports]
import torch.nn.functional as F  # pyright: ignore[reportMissingImports]


def _rms(x, scale, eps):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _rope(x, positions, theta):
  half = x.shape[-1] // 2
  freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
  angle = positions[..., None].float() * freq
  sin, cos = angle.sin()[:, :, None, :], angle.cos()[:, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def params_from_jax(params: Any) -> dict[str, torch.Tensor]:
  """Flattens an nnx.State of the decoder into {'layers.0.attn.q': tensor, ...}."""
  import jax
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    names = [n for n in names if n != "value"]
    array = np.asarray(leaf, np.float32)
    if names[0] == "layers":  # scanned layers: one stacked array -> one tensor per layer
      for i, layer in enumerate(array):
        out[".".join(["layers", str(i), *names[1:]])] = torch.tensor(layer, requires_grad=True)
    else:
      out[".".join(names)] = torch.tensor(array, requires_grad=True)
  return out


def random_params(spec) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(0)
  d, n, k, h, f, V = (spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                      spec.mlp_dim, spec.vocab_size)
  shapes = {"token_embed": (V, d), "final_norm.scale": (d,), "lm_head": (d, V)}
  for i in range(spec.num_layers):
    p = f"layers.{i}."
    shapes.update({p + "attn_norm.scale": (d,), p + "mlp_norm.scale": (d,), p + "attn.q": (d, n, h),
                   p + "attn.k": (d, k, h), p + "attn.v": (d, k, h), p + "attn.o": (n, h, d),
                   p + "mlp.gate": (d, f), p + "mlp.up": (d, f), p + "mlp.down": (f, d)})
  return {name: (torch.ones(s) if name.endswith("scale") else
                 torch.randn(s, generator=g) / np.sqrt(s[0])).requires_grad_(True)
          for name, s in shapes.items()}


def logits(spec, P: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
  tokens, positions, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  L = tokens.shape[1]
  causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
  mask = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  group = spec.num_heads // spec.num_kv_heads
  x = P["token_embed"][tokens]
  for i in range(spec.num_layers):
    p = f"layers.{i}."
    y = _rms(x, P[p + "attn_norm.scale"], spec.norm_eps)
    q = _rope(torch.einsum("bld,dnh->bnlh", y, P[p + "attn.q"]).transpose(1, 2), positions,
              spec.rope_theta).transpose(1, 2)
    k = _rope(torch.einsum("bld,dkh->bklh", y, P[p + "attn.k"]).transpose(1, 2), positions,
              spec.rope_theta).transpose(1, 2)
    v = torch.einsum("bld,dkh->bklh", y, P[p + "attn.v"])
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    att = torch.nan_to_num(att)  # rows with no visible key (padding) give NaN in SDPA
    x = x + torch.einsum("bnlh,nhd->bld", att, P[p + "attn.o"])
    y = _rms(x, P[p + "mlp_norm.scale"], spec.norm_eps)
    x = x + (F.silu(y @ P[p + "mlp.gate"]) * (y @ P[p + "mlp.up"])) @ P[p + "mlp.down"]
  x = _rms(x, P["final_norm.scale"], spec.norm_eps)
  return x @ P["lm_head"]


def objective(spec, P, batch, w, c, num_tasks: int, z_loss: float) -> torch.Tensor:
  out = logits(spec, P, batch)
  logp = torch.log_softmax(out, -1)
  ce = -logp.gather(-1, batch["targets"][..., None])[..., 0]
  entropy = -(logp.exp() * logp).sum(-1)
  mask = batch["loss_mask"]
  onehot = F.one_hot(batch["task_ids"].clamp(min=0), num_tasks).float() * mask[..., None]
  count = onehot.sum((0, 1)).clamp(min=1.0)
  loss_t = torch.einsum("bl,blt->t", ce, onehot) / count
  entropy_t = torch.einsum("bl,blt->t", entropy, onehot) / count
  z = z_loss * (torch.logsumexp(out, -1).pow(2) * mask).sum() / mask.sum().clamp(min=1.0)
  return (w * loss_t).sum() - (c * entropy_t).sum() + z


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  out = {k: v.long() if v.dtype in (torch.int32, torch.int64) else v.float() for k, v in out.items()}
  return out


def step_time(spec, batch: dict[str, np.ndarray], num_tasks: int, steps: int,
              z_loss: float = 0.0) -> float:
  """Median seconds per AdamW step (with global-norm clipping), eager on CPU, float32."""
  P = random_params(spec)
  tb = to_torch(batch)
  w, c = torch.ones(num_tasks), torch.full((num_tasks,), 0.01)
  opt = torch.optim.AdamW(list(P.values()), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  times = []
  for _ in range(steps + 1):  # the first step warms the allocator
    t0 = time.perf_counter()
    opt.zero_grad()
    objective(spec, P, tb, w, c, num_tasks, z_loss).backward()
    torch.nn.utils.clip_grad_norm_(list(P.values()), 1.0)
    opt.step()
    times.append(time.perf_counter() - t0)
  return float(np.median(times[1:]))
