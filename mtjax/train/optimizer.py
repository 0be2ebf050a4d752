"""AdamW with a warmup schedule, global-norm clipping, a weight-decay mask, parameter groups, EMA.

LR schedules (linear warmup from 0, then): `cosine` decay to lr * min_lr_ratio at decay_steps;
`constant`; `wsd` (warmup-stable-decay: constant, then a linear decay over the last
decay_fraction of decay_steps, as in MiniCPM and DeepSeek). No weight decay on norms (1-D) and
on the token embedding (decaying a lookup table pulls rare tokens to zero); every other matrix,
the output head included, decays.

Parameter groups (`optimizer.param_groups`: regex on the parameter path -> LR multiplier) run
one AdamW per group through optax.multi_transform; a multiplier of 0 freezes the group: its
gradients are zeroed before clipping and no optimizer state is kept for it. `optimizer.ema` keeps
an exponential moving average of the weights inside the optimizer state (`ema_params`).

Fast/slow training (model.soft_prompt with optimizer.slow_lr_ratio, fast_every, slow_every):
two groups, the soft prompts (fast) and everything else (slow), each its own AdamW on its own
steps (`fast_slow_transform`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import optax

from mtjax.config import OptimizerConfig
from mtjax.tree import param_path
from mtjax.model import soft_prompt

FROZEN = "frozen"
FAST, SLOW = "fast", "slow"


def decay_mask(params: Any) -> Any:
  def keep(path, leaf) -> bool:
    name = param_path(path).split("/")
    ndim = leaf.ndim - (name[0] == "layers")  # scanned layers: a leading layer axis
    return (ndim >= 2 and "token_embed" not in name and not name[-1].endswith("_bias")
            and name[-1] != soft_prompt.PARAM)
  return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=end)
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  if cfg.schedule == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  if cfg.schedule == "wsd":
    decay_len = max(1, round(cfg.decay_fraction * decay_steps))
    stable_end = max(cfg.warmup_steps, decay_steps - decay_len)
    return optax.join_schedules(
        [warmup, optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay_steps - stable_end)],
        [cfg.warmup_steps, stable_end])
  raise ValueError(f"unknown optimizer.schedule {cfg.schedule!r}")


def group_labels(params: Any, groups: Mapping[str, float],
                 trained: frozenset[str] | None = None) -> Any:
  """Per parameter: the first matching pattern of `groups` (re.search on its path), FROZEN for
  a multiplier of 0, or "default". trained: on a frozen base, the paths that train (the Trained
  adapter variables, mtjax.model.adapters); every other parameter is FROZEN."""
  def label(path, _):
    name = param_path(path)
    if trained is not None and name not in trained:
      return FROZEN
    for pattern, scale in groups.items():
      if re.search(pattern, name):
        return FROZEN if scale == 0 else pattern
    return "default"
  return jax.tree_util.tree_map_with_path(label, params)


def fast_slow(cfg: OptimizerConfig) -> bool:
  """Whether the run has two parameter groups, fast (soft prompts) and slow (the rest)."""
  return cfg.slow_lr_ratio != 1.0 or cfg.fast_every != 1 or cfg.slow_every != 1


def fast_slow_labels(params: Any, fast: frozenset[str] | None = None) -> Any:
  """FAST for the fast weights (`fast`: the adapter variables that train beside the base, i.e.
  the soft prompts; None: the soft prompt's path), SLOW for the rest."""
  fast = frozenset({soft_prompt.PARAM}) if fast is None else fast
  return jax.tree_util.tree_map_with_path(
      lambda path, _: FAST if param_path(path) in fast else SLOW, params)


def every(k: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on its calls 0, k, 2k, ...; zero updates and unchanged state (moments, schedule
  count) on the others."""
  if k == 1:
    return inner

  def on_step(step: Any, **_: Any) -> Any:
    return jax.numpy.asarray(step) % k == 0

  return optax.transforms.conditionally_mask(inner, on_step)


def fast_slow_transform(cfg: OptimizerConfig, adamw,
                        fast: frozenset[str] | None = None) -> optax.GradientTransformation:
  """One AdamW per group: the fast weights at lr on every fast_every-th step (0: frozen), the
  slow ones at lr * slow_lr_ratio (0: frozen) on every slow_every-th; a frozen group keeps no
  optimizer state. Each group's LR schedule counts its own updates."""
  slow = (optax.set_to_zero() if cfg.slow_lr_ratio == 0
          else every(cfg.slow_every, adamw(cfg.slow_lr_ratio)))
  fast_weights = optax.set_to_zero() if cfg.fast_every == 0 else every(cfg.fast_every, adamw(1.0))
  fast_tx = fast_weights
  return optax.multi_transform({FAST: fast_tx, SLOW: slow},
                               lambda params: fast_slow_labels(params, fast))


class EmaState(NamedTuple):
  ema: Any  # params-shaped


def ema_of_params(decay: float) -> optax.GradientTransformation:
  """Last in the chain: ema <- decay * ema + (1 - decay) * (params + updates); updates unchanged."""

  def init(params):
    return EmaState(ema=jax.tree.map(lambda p: p, params))

  def update(updates, state, params=None):
    assert params is not None, "ema_of_params needs the params"
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
    return updates, EmaState(ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
  """The EMA of the weights kept in `opt_state`, or None when optimizer.ema is 0."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  return found[0].ema if found else None


def make_optimizer(cfg: OptimizerConfig, total_steps: int, *,
                   trained: frozenset[str] | None = None, fast: frozenset[str] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """trained: on a frozen base, the paths that train (the Trained adapter variables); the rest
  keeps no optimizer state. fast: the fast weights of fast/slow training (fast_slow_labels)."""
  schedule = lr_schedule(cfg, total_steps)

  def adamw(scale: float) -> optax.GradientTransformation:
    lr = schedule if scale == 1.0 else (lambda step: scale * schedule(step))
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=decay_mask)

  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  if fast_slow(cfg):
    parts = [clip, fast_slow_transform(cfg, adamw, fast)]
    # A frozen group's gradients are dropped before the clip (they would count in its norm).
    frozen = {SLOW} if cfg.slow_lr_ratio == 0 else {FAST} if cfg.fast_every == 0 else set()
    if frozen:
      mask = lambda params: jax.tree.map(lambda label: label in frozen,
                                         fast_slow_labels(params, fast))
      parts.insert(0, optax.masked(optax.set_to_zero(), mask))
  elif not cfg.param_groups and trained is None:
    parts = [clip, adamw(1.0)]
  else:
    labels = lambda params: group_labels(params, cfg.param_groups, trained)
    frozen = lambda params: jax.tree.map(lambda label: label == FROZEN, labels(params))
    transforms: dict[Any, optax.GradientTransformation] = {p: adamw(s) for p, s in cfg.param_groups.items() if s != 0}
    transforms["default"] = adamw(1.0)
    transforms[FROZEN] = optax.set_to_zero()
    parts = [optax.masked(optax.set_to_zero(), frozen), clip,
             optax.multi_transform(transforms, labels)]
  if cfg.ema:
    parts.append(ema_of_params(cfg.ema))
  return optax.chain(*parts), schedule
