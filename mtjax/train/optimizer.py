"""AdamW with linear warmup + cosine decay, global-norm clipping, and a weight-decay mask.

No weight decay on norms (1-D) and on the token embedding (decaying a lookup table pulls rare
tokens to zero); every other matrix, the output head included, decays.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from mtjax.config import OptimizerConfig


def decay_mask(params: Any) -> Any:
  def keep(path, leaf) -> bool:
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    return leaf.ndim >= 2 and "token_embed" not in names
  return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = lr_schedule(cfg, total_steps)
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  tx = optax.chain(clip, optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, mask=decay_mask))
  return tx, schedule
