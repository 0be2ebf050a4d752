"""Adaptive task weighting (train.weighting.method) against numpy transcriptions of the published
rules: on a toy problem of three quadratic tasks with known gradients (the rules alone), and on the
tiny model through the compiled step (per-task gradients from an independent path: one
value_and_grad per task)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

from conftest import host_batch, tiny_config
from mtjax import recipes
from mtjax.config import WeightingConfig
from mtjax.errors import BadInputError
from mtjax.train import setup as setup_lib
from mtjax.train import state as state_lib
from mtjax.train import step as step_lib
from mtjax.train import weighting as wl
from mtjax.train.weighting.dwa import dwa_update
from mtjax.train.weighting.famo import famo_update_logits, famo_weights
from mtjax.train.weighting.mgda import mgda_coefs
from mtjax.train.weighting.pcgrad import pcgrad_coefs, pcgrad_orders
from mtjax.train.weighting.uncertainty import uncertainty_update

METHODS = ("uncertainty", "dwa", "famo", "pcgrad", "mgda", "dbmtl", "imtl_l")


# ------------------------------------------------------------------ numpy references of the rules

class NpAdam:
  """torch.optim.Adam / optax.adam (L2 weight decay added to the gradient, as torch's)."""

  def __init__(self, x, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.x, self.lr, self.wd, self.b1, self.b2, self.eps = np.array(x, np.float64), lr, wd, b1, b2, eps
    self.m, self.v, self.t = np.zeros_like(self.x), np.zeros_like(self.x), 0

  def step(self, grad):
    g = grad + self.wd * self.x
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    mhat, vhat = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
    self.x = self.x - self.lr * mhat / (np.sqrt(vhat) + self.eps)


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


class NpUncertainty:  # Kendall et al. 2018: sum_t (exp(-s_t) L_t + s_t) / 2
  def __init__(self, T, c):
    self.s = NpAdam(np.zeros(T), c.lr)

  def __call__(self, L, G, **_):
    w = np.exp(-self.s.x) / 2
    self.s.step((1 - np.exp(-self.s.x) * L) / 2)
    return w @ G, w


class NpIMTLL:  # Liu et al. 2021 (IMTL-L): sum_t (exp(s_t) L_t - s_t), s by its own Adam
  def __init__(self, T, c):
    self.s = NpAdam(np.zeros(T), c.lr)

  def __call__(self, L, G, **_):
    w = np.exp(self.s.x)
    self.s.step(np.exp(self.s.x) * L - 1)
    return w @ G, w


class NpDWA:  # Liu et al. 2019 over EMA losses
  def __init__(self, T, c):
    self.T, self.c = T, c
    self.ema, self.prev, self.count = np.zeros(T), np.zeros(T), 0

  def __call__(self, L, G, **_):
    r = self.ema / self.prev if self.count >= 2 else np.ones(self.T)
    w = self.T * softmax(r / self.c.temperature)
    new = L if self.count == 0 else self.c.ema * self.ema + (1 - self.c.ema) * L
    self.prev, self.ema, self.count = self.ema, new, self.count + 1
    return w @ G, w


class NpFAMO:  # Liu et al. 2023, with L(next) = the next step's losses
  """Over all T logits; an absent task (present False) has d_t = 0 and no weight."""

  def __init__(self, T, c):
    self.c, self.xi, self.prev = c, NpAdam(np.zeros(T), c.lr, c.weight_decay), None

  def __call__(self, L, G, present=None, **_):
    m = self.c.min_loss
    present = np.ones(len(L), bool) if present is None else present
    logl = np.where(present, np.log(np.where(present, L - m, 1.0)), 0.0)
    if self.prev is not None:
      d = np.where(present, self.prev - logl, 0.0)
      z = softmax(self.xi.x)
      jac = np.diag(z) - np.outer(z, z)  # dz/dxi
      self.xi.step(jac.T @ d)
    z = softmax(self.xi.x)
    ratio = np.where(present, z / np.where(present, L - m, 1.0), 0.0)
    w = ratio / ratio.sum()
    self.prev = logl
    return w @ G, w


class NpPCGrad:  # Yu et al. 2020: project each g_i off every conflicting original g_j
  def __init__(self, T, c):
    pass

  def __call__(self, L, G, orders, **_):
    total = np.zeros(G.shape[1])
    for i in range(len(G)):
      gi = G[i].copy()
      for j in orders[i]:
        if j != i and gi @ G[j] < 0:
          gi = gi - (gi @ G[j]) / (G[j] @ G[j]) * G[j]
      total += gi
    return total, None


class NpMGDA:  # Sener & Koltun 2018: the min-norm point of the convex hull, by SLSQP
  def __init__(self, T, c):
    pass

  def __call__(self, L, G, **_):
    T = len(G)
    gram = G @ G.T
    res = scipy.optimize.minimize(lambda a: a @ gram @ a, np.full(T, 1 / T),
                                  jac=lambda a: 2 * gram @ a, bounds=[(0, 1)] * T,
                                  constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
                                  method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    return res.x @ G, res.x


class NpDBMTL:  # Lin et al. 2023 (LibMTL's DB_MTL): EMA of grad log L, scaled to the largest norm
  def __init__(self, T, c):
    self.c, self.buf, self.k = c, None, 0

  def __call__(self, L, G, **_):
    self.k += 1
    lg = G / L[:, None]
    beta = self.c.ema / self.k ** self.c.beta_sigma
    old = np.zeros_like(lg) if self.buf is None else self.buf
    self.buf = lg + beta * (old - lg)
    n = np.linalg.norm(self.buf, axis=1)
    alpha = n.max() / (n + 1e-8)
    return alpha @ self.buf, alpha


NUMPY = {"uncertainty": NpUncertainty, "dwa": NpDWA, "famo": NpFAMO, "pcgrad": NpPCGrad,
         "mgda": NpMGDA, "dbmtl": NpDBMTL, "imtl_l": NpIMTLL}


# ------------------------------------------------------------- the rules on three quadratic tasks

def _toy(T=3, d=5, seed=0):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(T, d, d)) * np.array([1.0, 0.5, 2.0])[:T, None, None]
  b = rng.normal(size=(T, d))
  b[1] = -b[0] * 2  # two tasks pull against each other: conflicting gradients
  return A, b


def _np_losses_grads(A, b, theta):
  r = np.einsum("tij,j->ti", A, theta) - b
  return 0.5 * (r ** 2).sum(axis=1) + 0.1, np.einsum("tij,ti->tj", A, r)


def _jax_rule(method, c, T):
  """The registered method through its API, composed as the step composes it: (state, L,
  rows{theta: [T, d]}, key) -> (update, state)."""
  m = wl.get(c)
  present = jnp.ones((T,), bool)

  def fn(state, L, rows, key):
    stats = wl.Stats(losses=L, task_weights=jnp.ones_like(L), present=present, rows=rows, key=key)
    decision, state = m.update(state, stats)
    if m.need is wl.Need.GRADIENTS:
      return decision.update, state
    return wl.combine(rows, decision.weights), state  # the weights of this step's one pass
  return jax.jit(fn)


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_rule_matches_numpy_on_quadratic_tasks(method, T):
  jax.config.update("jax_enable_x64", True)
  try:
    A, b = _toy(T)
    c = WeightingConfig(method=method, lr=0.05, solver_iters=2000)
    theta_np = theta_jx = np.zeros(A.shape[2])
    ref = NUMPY[method](T, c)
    state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if x.dtype == jnp.float32 else x,
                         wl.get(c).init(T, {"theta": jnp.zeros(A.shape[2])}))
    rule = _jax_rule(method, c, T)
    for k in range(8):
      orders = np.asarray(pcgrad_orders(jax.random.key(k), T))
      L, G = _np_losses_grads(A, b, theta_np)
      g_np, _ = ref(L, G, orders=orders)
      Lj, Gj = _np_losses_grads(A, b, theta_jx)
      g_jx, state = rule(state, jnp.asarray(Lj), {"theta": jnp.asarray(Gj)}, jax.random.key(k))
      g_jx = np.asarray(g_jx["theta"])
      tol = 1e-3 if method == "mgda" and T > 2 else 1e-5
      np.testing.assert_allclose(g_jx, g_np, rtol=tol, atol=tol * np.abs(g_np).max())
      theta_np = theta_np - 0.05 * g_np
      theta_jx = theta_jx - 0.05 * g_jx
  finally:
    jax.config.update("jax_enable_x64", False)


def test_pcgrad_projects_conflicts_only():
  g = np.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting: dot -1
  gram = jnp.asarray(g @ g.T)
  coefs = pcgrad_coefs(gram, jnp.ones(2, bool), jnp.array([[0, 1], [1, 0]]))
  # by hand: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum (0.5, 1.5)
  np.testing.assert_allclose(np.asarray(coefs) @ g, [0.5, 1.5], atol=1e-6)
  aligned = np.array([[1.0, 0.0], [1.0, 1.0]])
  coefs = pcgrad_coefs(jnp.asarray(aligned @ aligned.T), jnp.ones(2, bool), jnp.array([[0, 1], [1, 0]]))
  np.testing.assert_allclose(np.asarray(coefs), [1.0, 1.0], atol=1e-6)


def test_mgda_two_tasks_closed_form():
  g = np.array([[1.0, 0.0], [0.0, 2.0]])  # min |a g1 + (1-a) g2|: a = 4/5
  alpha = mgda_coefs(jnp.asarray(g @ g.T), jnp.ones(2, bool), 10)
  np.testing.assert_allclose(np.asarray(alpha), [0.8, 0.2], atol=1e-6)


def test_imtl_l_scales_every_weighted_loss_to_one():
  """IMTL-L's fixed point by hand: with constant losses L_t the scale settles where
  exp(s_t) w_t L_t = 1, i.e. exp(s_t) = 1 / (w_t L_t); the applied weights w_t exp(s_t) = 1 / L_t."""
  c = WeightingConfig(method="imtl_l", lr=0.05)
  method = wl.get(c)
  L, w = jnp.array([0.5, 2.0, 8.0]), jnp.array([1.0, 1.0, 2.0])

  @jax.jit
  def update(state, present):
    decision, state = method.update(state, wl.Stats(L, w, present))
    return decision.weights, state

  state = method.init(3)
  for _ in range(1500):
    weights, state = update(state, jnp.ones(3, bool))
  np.testing.assert_allclose(np.exp(np.asarray(state["log_scale"])), [2.0, 0.5, 1 / 16], rtol=1e-2)
  np.testing.assert_allclose(np.asarray(weights), 1 / np.asarray(L), rtol=1e-2)
  _, after = update(state, jnp.array([True, False, True]))
  assert float(after["log_scale"][1]) == float(state["log_scale"][1])  # an absent task keeps it


def test_absent_task_keeps_its_statistics():
  T = 3
  present = jnp.array([True, True, False])
  L = jnp.array([1.0, 2.0, 0.0])
  for method in ("uncertainty", "dwa"):
    c = WeightingConfig(method=method)
    state = wl.get(c).init(T)
    update = uncertainty_update if method == "uncertainty" else dwa_update
    new = update(c, state, L, present)
    changed = False
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
      if a.ndim:
        assert np.asarray(a)[2] == np.asarray(b)[2]
        changed |= bool(np.any(np.asarray(a)[:2] != np.asarray(b)[:2]))
    assert changed, method
  c = WeightingConfig(method="famo")
  state = famo_update_logits(c, wl.get(c).init(T), L, present)
  assert not bool(state["has_prev"][2]) and float(state["prev_log_loss"][2]) == 0.0
  w = famo_weights(c, state, L, present)
  assert float(w[2]) == 0.0 and np.isfinite(np.asarray(w)).all()


# -------------------------------------------------------------- the compiled step on the tiny model

def _tiny(method, **dotted):
  return tiny_config(**{"train.weighting.method": method, "model.dtype": "float32",
                        "optimizer.warmup_steps": 0, **dotted})


@pytest.mark.parametrize("method,weights", [(m, (1.0, 1.0, 1.0)) for m in METHODS]
                         + [("mgda", (1.0, 2.0, 0.0)), ("famo", (1.0, 2.0, 0.0))])
def test_step_matches_numpy_rule_with_independent_gradients(method, weights):
  """Three steps of the compiled step against the numpy rule applied to per-task gradients from
  separate value_and_grad calls. The step's "optimizer" keeps the gradient it is given as its
  state and leaves the parameters as they are: the gradient is compared exactly as computed.
  Static weights scale each task's gradient; a task of weight 0 takes no part."""
  # One device: vmapping the per-task pullback once gave wrong rows there while 8 sharded
  # devices hid it (the step now maps it with lax.map).
  cfg = _tiny(method, **{"data.batch_size": 16})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  T = cfg.num_tasks
  sgd = optax.GradientTransformation(  # state: the last gradient; update: none
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  step = jax.jit(step_lib.make_step_fn(run.graphdef, sgd, run.schedule, num_tasks=T,
                                       loss_chunk=cfg.train.loss_chunk,
                                       weighting=cfg.train.weighting, seed=cfg.seed))
  grad_fn = jax.jit(step_lib.make_grad_fn(run.graphdef, num_tasks=T, loss_chunk=cfg.train.loss_chunk))
  state = state_lib.TrainState(step=run.state.step, params=run.state.params,
                              opt_state=sgd.init(run.state.params), skipped_steps=run.state.skipped_steps,
                              consecutive_skips=run.state.consecutive_skips, extra=run.state.extra)
  weights = np.asarray(weights, np.float32)
  # A task of weight 0 takes no part: the rules run over the others (FAMO keeps every logit).
  kept = np.arange(T) if method == "famo" else np.flatnonzero(weights > 0)
  ref = NUMPY[method](len(kept), cfg.train.weighting)
  coefs = np.full(T, 0.01, np.float32)  # an entropy term: added to every method's update
  zeros = np.zeros(T, np.float32)
  with jax.set_mesh(run.mesh):
    for i in range(3):
      batch = {k: jnp.asarray(v) for k, v in host_batch(cfg, start=i).items()}
      rows, losses = [], None
      for t in range(T):
        _, per_task, g = grad_fn(state.params, batch, jnp.asarray(np.eye(T, dtype=np.float32)[t]),
                                 jnp.asarray(zeros))
        rows.append(np.asarray(ravel_pytree(g)[0], np.float64))
        losses = np.asarray(per_task["loss"], np.float64)
      _, _, reg = grad_fn(state.params, batch, jnp.asarray(zeros), jnp.asarray(coefs))
      assert (np.asarray(per_task["tokens"]) > 0).all()
      orders = np.asarray(pcgrad_orders(jax.random.fold_in(jax.random.key(cfg.seed), i), T))
      rows = [weights[t] * rows[t] for t in range(T)]
      expected, _ = ref(losses[kept] * weights[kept], np.stack(rows)[kept], orders=orders,
                        present=weights[kept] > 0)
      expected = expected + np.asarray(ravel_pytree(reg)[0])
      state, metrics = step(state, batch, jnp.asarray(weights), jnp.asarray(coefs))
      got = np.asarray(ravel_pytree(state.opt_state)[0])
      scale = np.abs(expected).max()
      np.testing.assert_allclose(got, expected, atol=(1e-3 if method == "mgda" else 1e-5) * scale)
      assert metrics["task_weights"].shape == (T,)


@pytest.mark.parametrize("method", METHODS)
def test_one_compile_and_exact_resume(method, tmp_path):
  cfg = _tiny(method, **{"train.steps": 6, "optimizer.decay_steps": 6, "checkpoint.every": 3,
                         "train.log_every": 1})
  straight = recipes.run(cfg, tmp_path / "a")
  assert straight.compiles == 1
  weights = [[r[f"train/{t}/weight"] for t in cfg.data.tasks] for r in straight.history
             if "train/loss" in r]
  if method != "pcgrad":  # PCGrad's coefficients are 1 when no pair of tasks conflicts
    assert any(w != weights[0] for w in weights[1:]), weights  # the weights adapt
    assert "train_weight.png" in {p.name for p in straight.plots}  # and are drawn
  recipes.run(cfg.replace(**{"train.steps": 4}), tmp_path / "b")  # saves at 3 and at its end, 4
  resumed = recipes.run(cfg, tmp_path / "b")
  assert resumed.compiles == 1
  a = [r["train/loss"] for r in straight.history if "train/loss" in r]
  b = [r["train/loss"] for r in resumed.history if "train/loss" in r]
  assert b == a[4:]
  for x, y in zip(jax.tree.leaves((straight.state.params, straight.state.extra)),
                  jax.tree.leaves((resumed.state.params, resumed.state.extra))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_method_cannot_change_on_resume(tmp_path):
  cfg = _tiny("famo", **{"train.steps": 2})
  recipes.run(cfg, tmp_path)
  with pytest.raises(BadInputError, match="train.weighting.method"):
    recipes.run(cfg.replace(**{"train.weighting.method": "dwa", "train.steps": 4}), tmp_path)


def test_bad_weighting_config_names_the_field():
  with pytest.raises(BadInputError, match="train.weighting.method: expected one of"):
    tiny_config(**{"train.weighting.method": "gradnorm"})
  with pytest.raises(BadInputError, match="optimizer.grad_accum=1"):  # the method's own check
    setup_lib.check_methods(tiny_config(**{"train.weighting.method": "pcgrad",
                                           "optimizer.grad_accum": 2}))


@pytest.mark.slow
def test_sigkill_resume_with_method_state_matches_straight_run(tmp_path):
  """DB-MTL's per-task gradient EMAs (TrainState.extra) and ODM's bandit (loader state), killed
  with SIGKILL past a checkpoint and resumed: the same rows and parameters as a straight run."""
  import json

  import orbax.checkpoint as ocp

  from conftest import DEMO, sigkill_resume_runs
  steps = 24
  args = ["--config", f"{DEMO}:tiny", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.checkpoint.every=10", "--config.train.weighting.method=dbmtl",
          "--config.data.mixing.method=odm", "--config.data.mixing.every=3"]
  straight, killed = sigkill_resume_runs(tmp_path, args, steps, checkpoint_step=10)
  rows = lambda workdir: [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  a, b = rows(straight), rows(killed)
  assert [r["step"] for r in b] == list(range(1, steps + 1))
  keys = ["train/loss"] + [k for k in a[-1] if k.endswith("/weight") or k.endswith("/rate")]
  assert [[r.get(k) for k in keys] for r in b] == [[r.get(k) for k in keys] for r in a]
  restore = lambda w: ocp.PyTreeCheckpointer().restore(w / "checkpoints" / str(steps) / "state")
  for x, y in zip(jax.tree.leaves(restore(straight)), jax.tree.leaves(restore(killed))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["famo", "dbmtl"])
def test_lora_with_weighting_trains_adapters_only(method):
  """The vjp path with LoRA: gradients for the adapters only, the frozen base bit-identical."""
  from flax import traverse_util

  from mtjax.model.lora import is_lora_path
  from mtjax.parallel import sharding
  cfg = _tiny(method, **{"model.lora.targets": ("q", "v", "up"), "model.lora.rank": 4,
                         "model.lora.per_task": True, "optimizer.lr": 1e-2})
  run = setup_lib.build(cfg)
  step = run.jit_step()
  flat = lambda p: traverse_util.flatten_dict(jax.device_get(p), sep="/")
  before = flat(run.state.params)
  state, T = run.state, cfg.num_tasks
  with jax.set_mesh(run.mesh):
    for i in range(2):
      batch = {k: jax.device_put(v, sharding.named(run.mesh, sharding.BATCH_AXES))
               for k, v in host_batch(cfg, start=i).items()}
      state, metrics = step(state, batch, np.ones(T, np.float32), np.zeros(T, np.float32))
  assert int(metrics["skipped_steps"]) == 0
  after = flat(state.params)
  for path, value in before.items():
    if is_lora_path(path):
      continue
    np.testing.assert_array_equal(after[path], value)
  assert any(np.any(after[p] != before[p]) for p in before if p.endswith("_lora_b"))

