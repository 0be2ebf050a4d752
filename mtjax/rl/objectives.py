"""GRPO and DARLING math: group advantages, diversity rewards, the PPO-clip surrogate, k3 KL.

Pure jnp functions on fixed shapes (they run inside the jitted RL update, or eagerly on the
host), plus the host-side pieces that turn sampled texts into DARLING's equivalence classes.

Shapes: rewards and classes are [P, n] (P prompts, n samples each, one group per row); per-token
arrays are [N, L] (N = P * n sequences) with a {0, 1} mask over the completion tokens.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, eq. 21 with outcome supervision):
  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)   (the std division is optional here)
  J(theta) = mean over completion tokens of min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)
             - beta * KL_k3(pi_theta || pi_ref),
  rho_t = pi_theta(y_t | y_<t) / pi_old(y_t | y_<t), pi_old the policy that sampled the batch.

DARLING (Li et al. 2025, "Jointly Reinforcing Diversity and Quality in Language Model
Generations", arXiv 2509.02534): among a prompt's n samples, C(y_i) is y_i's equivalence class
(samples with the same canonical answer), Div(y_i) = (n - |C(y_i)|) / (n - 1) (the fraction of
the other samples that differ from y_i), floored at 0.1 so a reward is never zeroed outright; the
reward is r_i * Div(y_i) and the advantage is r_i' - mean_j r_j' WITHOUT the std division (the
paper drops it: dividing by a group's std would undo the diversity scaling).

k3 (J. Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html):
with x = log pi_ref(y) - log pi_theta(y) for y ~ pi_theta, k3 = exp(x) - x - 1 >= 0 is an
unbiased, low-variance estimator of KL(pi_theta || pi_ref).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

DIVERSITY_FLOOR = 0.1  # DARLING's floor on Div(y_i)
LOG_RATIO_CLAMP = 20.0  # |log rho| is clamped before exp (as Tunix does): no overflow to inf


# --- Rewards and advantages: [P, n] -> [P, n] ---

def group_advantages(rewards: ArrayLike, normalize_std: bool = True,
                     eps: float = 1e-6) -> jax.Array:
  """GRPO's group-relative advantage, per row of rewards [P, n]: A_i = r_i - mean_j r_j, and
  with normalize_std, divided by (std_j r_j + eps), the sample std (ddof=1, as Tunix and TRL).

  A group whose rewards are all equal gets exactly 0 (no NaN, and no rounding residue blown up
  by the division). With n = 1 every advantage is 0."""
  r = jnp.asarray(rewards, jnp.float32)
  n = r.shape[-1]
  centered = r - jnp.mean(r, axis=-1, keepdims=True)
  all_equal = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
  if normalize_std and n > 1:
    std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / (n - 1))
    centered = centered / (std + eps)
  return jnp.where(all_equal, 0.0, centered)


def class_sizes(classes: ArrayLike) -> jax.Array:
  """|C(y_i)|: how many samples of y_i's group share its class id. [P, n] int -> [P, n] int."""
  c = jnp.asarray(classes)
  return jnp.sum(c[..., :, None] == c[..., None, :], axis=-1).astype(jnp.int32)


def darling_diversity(classes: ArrayLike, floor: float = DIVERSITY_FLOOR) -> jax.Array:
  """DARLING's Div(y_i) = max((n - |C(y_i)|) / (n - 1), floor) per sample, from class ids [P, n]
  (equal ids within a row: equivalent answers). All equal: every Div = floor; all distinct: 1.
  With n = 1 (nothing to differ from) Div = 1."""
  c = jnp.asarray(classes)
  n = c.shape[-1]
  if n == 1:
    return jnp.ones(c.shape, jnp.float32)
  div = (n - class_sizes(c)).astype(jnp.float32) / (n - 1)
  return jnp.maximum(div, floor)


def darling_rewards(rewards: ArrayLike, classes: ArrayLike,
                    floor: float = DIVERSITY_FLOOR) -> jax.Array:
  """DARLING's diversity-scaled reward r_i * Div(y_i), [P, n]."""
  return jnp.asarray(rewards, jnp.float32) * darling_diversity(classes, floor)


def darling_advantages(rewards: ArrayLike, classes: ArrayLike, normalize_std: bool = False,
                       eps: float = 1e-6, floor: float = DIVERSITY_FLOOR) -> jax.Array:
  """Group advantages of the DARLING rewards; by default WITHOUT the std division (the paper's
  choice: a group's std would rescale away the diversity bonus)."""
  return group_advantages(darling_rewards(rewards, classes, floor), normalize_std, eps)


# --- Per-token objectives: [N, L] ---

def masked_mean(x: ArrayLike, mask: ArrayLike) -> jax.Array:
  """sum(x * mask) / max(sum(mask), 1): 0 for an empty mask (no NaN)."""
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.asarray(x) * m) / jnp.maximum(jnp.sum(m), 1.0)


def clipped_surrogate(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                      clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """Per token (the PPO-clip surrogate min(rho A, clip(rho, 1 - eps, 1 + eps) A), whether the
  clip binds), [N, L] each. rho = exp(logp - old_logp), the log-ratio clamped to
  +-LOG_RATIO_CLAMP. The clip binds where the clipped term is the smaller one and differs from
  the unclipped: A > 0 and rho > 1 + eps, or A < 0 and rho < 1 - eps; there the token's gradient
  is zero."""
  a = jnp.asarray(advantages, jnp.float32)[:, None]
  log_ratio = jnp.clip(jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32),
                       -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * a
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
  binds = ((a > 0) & (ratio > 1.0 + clip_eps)) | ((a < 0) & (ratio < 1.0 - clip_eps))
  return jnp.minimum(unclipped, clipped), binds


def clipped_objective(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                      mask: ArrayLike, clip_eps: float) -> tuple[jax.Array, jax.Array]:
  """The token-level PPO-clip surrogate to MAXIMIZE and the fraction of clipped tokens.

  logp, old_logp, mask [N, L] (per target token: the current and the sampling policy's
  log-probability, 1 on completion tokens); advantages [N] (one per sequence).

  Normalization: token level (DAPO, Yu et al. 2025, arXiv 2503.14476): the sum over every
  completion token of the batch divided by their number, so each token weighs the same and a
  long completion counts in proportion to its length. GRPO's paper averages per sequence first,
  then over sequences, which gives a long completion's tokens less weight each. The clip
  fraction is over the same tokens (see clipped_surrogate for when the clip binds)."""
  per_token, binds = clipped_surrogate(logp, old_logp, advantages, clip_eps)
  return masked_mean(per_token, mask), masked_mean(binds.astype(jnp.float32), mask)


def kl_k3_per_token(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """Schulman's k3 per token: exp(ref - logp) - (ref - logp) - 1 (>= 0), [N, L]. The log-ratio
  is clamped to +-LOG_RATIO_CLAMP (exp must not overflow)."""
  x = jnp.clip(jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32),
               -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  return jnp.exp(x) - x - 1.0


def kl_k3(logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike) -> jax.Array:
  """The k3 estimate of KL(pi_theta || pi_ref): its per-token value, masked mean over the
  completion tokens (token level, like clipped_objective)."""
  return masked_mean(kl_k3_per_token(logp, ref_logp), mask)


# --- Host side: canonical answers and equivalence classes ---

def equivalence_classes(keys: Sequence[Sequence[Hashable]]) -> np.ndarray:
  """Per group (one prompt's n samples), the class id of each sample's canonical key: samples
  with equal keys share an id, ids numbered 0, 1, ... in order of first appearance. [P][n] keys
  -> [P, n] int32. Every group must have the same n."""
  sizes = {len(group) for group in keys}
  if len(sizes) > 1:
    raise ValueError(f"every group needs the same number of samples, got sizes {sorted(sizes)}")
  n = sizes.pop() if sizes else 0
  out = np.zeros((len(keys), n), np.int32)
  for p, group in enumerate(keys):
    seen: dict[Hashable, int] = {}
    for i, key in enumerate(group):
      out[p, i] = seen.setdefault(key, len(seen))
  return out


Canonical = Callable[[Any, str], Hashable]  # (example, output) -> the answer's canonical form


def default_canonical(example: Any, output: str) -> Hashable:
  """The output stripped, runs of whitespace as one space (the example is not needed)."""
  del example
  return " ".join(output.split())


def _strip_fence(output: str) -> str:
  from mtjax.tasks.scoring import strip_fence
  return strip_fence(output)


def _normal_json(value: Any) -> Any:
  """JSON values compared as the json scorers do: integral floats as ints, dict keys sorted."""
  if isinstance(value, float) and math.isfinite(value) and value.is_integer():
    return int(value)
  if isinstance(value, dict):
    return {k: _normal_json(v) for k, v in sorted(value.items())}
  if isinstance(value, list):
    return [_normal_json(v) for v in value]
  return value


def json_canonical(example: Any, output: str) -> Hashable:
  """A JSON output (a code fence allowed) as compact, key-sorted JSON; else default_canonical."""
  try:
    return "json:" + json.dumps(_normal_json(json.loads(_strip_fence(output))), sort_keys=True,
                                separators=(",", ":"))
  except (ValueError, TypeError, RecursionError):
    return default_canonical(example, output)


def calls_canonical(example: Any, output: str) -> Hashable:
  """Function calls in any order, keyed by the function_call verifier's own order-insensitive
  form (lists compare as multisets, integral floats as ints); else default_canonical."""
  from mtjax.tasks.suites.function_calling import _canonical
  try:
    return ("calls", _canonical(json.loads(_strip_fence(output))))
  except (ValueError, TypeError, RecursionError):
    return default_canonical(example, output)


def ordered_calls_canonical(example: Any, output: str) -> Hashable:
  """Function calls in order (function_call_ordered: chains): each call's verifier form, in
  sequence; else default_canonical."""
  from mtjax.tasks.suites.function_calling import _canonical
  try:
    value = json.loads(_strip_fence(output))
    calls = value if isinstance(value, list) else [value]
    return ("chain",) + tuple(_canonical(c) for c in calls)
  except (ValueError, TypeError, RecursionError):
    return default_canonical(example, output)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def numeric_canonical(example: Any, output: str) -> Hashable:
  """The first number of the output (the numeric scorer reads it), as a float; else
  default_canonical."""
  found = _NUMBER.search(output.replace(",", ""))
  if found is None:
    return default_canonical(example, output)
  return ("number", float(found.group()))


# By scorer name (Task.scorer): the canonical form that scorer's notion of equality implies.
CANONICAL: dict[str, Canonical] = {
    "exact_match": default_canonical,
    "json_equal": json_canonical,
    "function_call": calls_canonical,
    "function_call_ordered": ordered_calls_canonical,
    "numeric": numeric_canonical,
}


def register_canonical(scorer: str, fn: Canonical, *, replace: bool = False) -> Canonical:
  """The pluggable hook: answers of tasks scored by `scorer` are grouped by fn(example, output)."""
  if scorer in CANONICAL and not replace and CANONICAL[scorer] is not fn:
    raise ValueError(f"a canonical form for scorer {scorer!r} is already registered")
  CANONICAL[scorer] = fn
  return fn


def canonical_for(task: Any) -> Canonical:
  """The canonical-answer function of a task: its own `canonical` attribute if it has one, else
  the one registered for its scorer, else default_canonical."""
  own = getattr(task, "canonical", None)
  if callable(own):
    return own
  return CANONICAL.get(getattr(task, "scorer", ""), default_canonical)
