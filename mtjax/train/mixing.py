"""Online data mixing (data.mixing.method=odm): sampling rates from an EXP3 bandit over tasks.

The rule is ODM's (Albalak et al. 2023, "Efficient Online Data Mixing For Language Model
Pre-Training", arXiv 2312.02406, Algorithm 1). Over K arms, at decision t = 1, 2, ...:

  eps_t = min(1/K, sqrt(ln K / (K t)))                                   (eps_0 = 1/K)
  pi_i  = (1 - K eps_t) exp(eps_{t-1} R_i) / sum_j exp(eps_{t-1} R_j) + eps_t
  and once the loss L_i under pi is observed:  R_i <- alpha R_i + (1 - alpha) L_i / pi_i

(`odm_rates`, `odm_update`): the reward is the importance-weighted training loss, smoothed with
alpha = data.mixing.smoothing, so a task whose loss stays high is sampled more.

How it is adapted to mtjax, whose batches are packed mixtures of tasks rather than one domain
per batch (ODM samples a domain per batch and observes that batch's loss):

- The arms are the tasks with a nonzero rate somewhere in the configured schedule
  (data.mixture, data.rates, data.stages); a task configured at rate 0 stays at 0.
- A decision every data.mixing.every steps (after step s with s % every == 0; the first after
  step `every`, until then the configured rates hold). Its rates are fed back to the loader
  (`set_rates`), so they apply from step s + data.feedback_lag and show in data/<task>/rate.
- L_i is task i's token-weighted mean training loss over the steps since the previous decision
  (the window): sum_s loss_i,s * tokens_i,s / sum_s tokens_i,s from each step's per-task metrics
  (a step whose loss for the task is not finite adds nothing). pi_i is the rate task i was
  actually sampled at, averaged over the window's steps (the rates of the previous decision
  reach the batches data.feedback_lag steps after it). A task without loss tokens in the window
  keeps its R.
- t counts the decisions; the first ones are uniform over the arms while eps_t = 1/K (t <= K ln K),
  as in ODM.

The bandit's state (R, t and the window's sums so far) is JSON kept in the loader state under
"mixing" (`MixtureLoader.set_mixing`), so it is checkpointed and restored with the loader. The
per-step metrics are kept by reference on the device and fetched at a decision or a flush (the
loop flushes before every save), where they are added to float64 host sums in step order: a run
killed and resumed at any step decides the same rates as one that was not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mtjax.train.hooks import Hook, Loop, StepOutput


def exploration(t: int, k: int) -> float:
  """ODM's eps_t = min(1/K, sqrt(ln K / (K t))), with eps_0 = 1/K."""
  if t <= 0:
    return 1.0 / k
  return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def odm_rates(rewards: Sequence[float] | np.ndarray, t: int) -> np.ndarray:
  """The rates pi of decision t >= 1 over K arms with rewards R (Algorithm 1 of ODM):
  (1 - K eps_t) softmax(eps_{t-1} R) + eps_t. They sum to 1."""
  r = np.asarray(rewards, np.float64)
  k = len(r)
  if k == 0:
    raise ValueError("odm_rates needs at least one arm")
  eps, eps_prev = exploration(t, k), exploration(t - 1, k)
  z = eps_prev * r
  w = np.exp(z - z.max())
  return (1.0 - k * eps) * (w / w.sum()) + eps


def odm_update(rewards: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray,
               rates: Sequence[float] | np.ndarray, observed: Sequence[bool] | np.ndarray,
               smoothing: float) -> np.ndarray:
  """R_i <- alpha R_i + (1 - alpha) L_i / pi_i for the observed arms; the others keep R_i."""
  r = np.asarray(rewards, np.float64)
  losses, rates = np.asarray(losses, np.float64), np.asarray(rates, np.float64)
  seen = np.asarray(observed, bool) & (rates > 0)
  weighted = np.divide(losses, rates, out=np.zeros_like(r), where=seen)
  return np.where(seen, smoothing * r + (1.0 - smoothing) * weighted, r)


STATE_ITEM = "checkpoint item 'loader'"


def _empty_window(arms: Sequence[str]) -> dict[str, Any]:
  return {"steps": 0, "loss": {n: 0.0 for n in arms}, "tokens": {n: 0.0 for n in arms},
          "rate": {n: 0.0 for n in arms}}


def fresh_state(arms: Sequence[str], step: int) -> dict[str, Any]:
  """The bandit before its first decision: R = 0, t = 0, an empty window that ends at `step`."""
  return {"method": "odm", "step": step, "t": 0, "rewards": {n: 0.0 for n in arms},
          "window": _empty_window(arms)}


def restored_state(state: Any, arms: Sequence[str], step: int) -> dict[str, Any]:
  """A checked copy of a restored "mixing" state at loader step `step`. Arms that were not arms
  when it was saved (data.mixture changed on resume) start at R = 0; dropped ones are dropped."""
  from mtjax.errors import BadInputError

  def bad(what: str) -> BadInputError:
    return BadInputError(STATE_ITEM, f"'mixing' {what} (expected {{'method': 'odm', 'step', "
                         "'t', 'rewards', 'window'}} as this mtjax writes it)")

  def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  def numbers(v: Any) -> bool:
    return isinstance(v, Mapping) and all(isinstance(k, str) and number(x) for k, x in v.items())

  if not isinstance(state, Mapping) or state.get("method") != "odm":
    raise bad("is not an ODM bandit state")
  for key in ("step", "t"):
    v = state.get(key)
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
      raise bad(f"has {key!r} {v!r}, not a count")
  if state["step"] != step:
    raise bad(f"covers steps up to {state['step']}, but the loader state is at step {step}")
  window = state.get("window")
  if not numbers(state.get("rewards")) or not isinstance(window, Mapping) or not all(
      numbers(window.get(k)) for k in ("loss", "tokens", "rate")) or not (
      isinstance(window.get("steps"), int) and window["steps"] >= 0):
    raise bad("has no rewards or window of numbers per task")
  out = fresh_state(arms, step)
  out["t"] = state["t"]
  out["window"]["steps"] = window["steps"]
  for n in arms:
    out["rewards"][n] = float(state["rewards"].get(n, 0.0))
    for k in ("loss", "tokens", "rate"):
      out["window"][k][n] = float(window[k].get(n, 0.0))
  return out


class MixingHook(Hook):
  """ODM (see the module docstring): every `every` steps, new sampling rates from the tasks'
  training losses, fed back to the loader. Writes no rows (data/<task>/rate shows the rates
  used). Needs the mixture loader's batch source (its state holds the bandit's)."""

  def __init__(self, every: int, smoothing: float):
    if every <= 0:
      raise ValueError(f"every must be positive, got {every}")
    self.every, self.smoothing = every, smoothing
    self._state: dict[str, Any] | None = None
    self._arms: list[str] = []
    # (step done, its per-task metrics on the device, the rates it was sampled at)
    self._pending: list[tuple[int, Any, list[float]]] = []
    self._loader: Any = None

  def _ensure(self, loop: Loop) -> dict[str, Any]:
    if self._state is not None:
      return self._state
    loader: Any = getattr(loop.source, "loader", loop.source)
    if not hasattr(loader, "set_mixing") or not hasattr(loader, "schedule"):
      raise TypeError("data.mixing.method=odm needs the mixture loader's batch source "
                      f"(mtjax.train.batches.LoaderSource), not {type(loop.source).__name__}")
    self._loader = loader
    names = list(loop.task_names)
    configured = np.max([np.asarray(w, np.float64) for _, w in loader.schedule.points], axis=0)
    self._arms = [n for n, w in zip(names, configured) if w > 0]
    step = loop.start  # the restored checkpoint's step: the loader state's too
    saved = loop.source.state.get("mixing")
    self._state = (fresh_state(self._arms, step) if saved is None
                   else restored_state(saved, self._arms, step))
    self._publish()
    return self._state

  def _publish(self) -> None:
    self._loader.set_mixing(self._state)

  def before_step(self, loop: Loop, step: int) -> None:
    self._ensure(loop)

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    self._ensure(loop)
    per_task = out.metrics["per_task"]
    rates = [float(out.batch.info[f"data/{n}/rate"]) for n in loop.task_names]
    # References only: nothing is read from the device until a decision or a flush.
    self._pending.append((out.done, {"loss": per_task["loss"], "tokens": per_task["tokens"]},
                          rates))
    if out.done % self.every == 0:
      self._fold(loop)
      self._decide(loop)
      self._publish()

  def flush(self, loop: Loop) -> None:
    """Adds the steps held on the device to the host sums of the state the loader keeps, so a
    save now restores to the same decisions."""
    self._ensure(loop)
    if self._pending:
      self._fold(loop)
      self._publish()

  def _fold(self, loop: Loop) -> None:
    """Adds the pending steps to the window's float64 sums, in step order."""
    state = self._state
    assert state is not None
    pending, self._pending = self._pending, []
    fetched = jax.device_get([p for _, p, _ in pending])
    index = {n: i for i, n in enumerate(loop.task_names)}
    window = state["window"]
    for host, (done, _, rates) in zip(fetched, pending):
      loss = np.asarray(host["loss"], np.float64)
      tokens = np.asarray(host["tokens"], np.float64)
      for n in self._arms:
        i = index[n]
        if tokens[i] > 0 and np.isfinite(loss[i]):
          window["loss"][n] = float(window["loss"][n] + loss[i] * tokens[i])
          window["tokens"][n] = float(window["tokens"][n] + tokens[i])
        window["rate"][n] = float(window["rate"][n] + rates[i])
      window["steps"] += 1
      state["step"] = done

  def _decide(self, loop: Loop) -> None:
    state = self._state
    assert state is not None
    if not self._arms:
      return
    window = state["window"]
    steps = max(window["steps"], 1)
    tokens = np.array([window["tokens"][n] for n in self._arms])
    loss = np.array([window["loss"][n] for n in self._arms])
    rates = np.array([window["rate"][n] for n in self._arms]) / steps
    observed = tokens > 0
    losses = np.divide(loss, tokens, out=np.zeros_like(loss), where=observed)
    rewards = odm_update([state["rewards"][n] for n in self._arms], losses, rates, observed,
                         self.smoothing)
    state["t"] += 1
    pi = odm_rates(rewards, state["t"])
    state["rewards"] = {n: float(r) for n, r in zip(self._arms, rewards)}
    state["window"] = _empty_window(self._arms)
    loop.source.set_rates({n: float(p) for n, p in zip(self._arms, pi)})
