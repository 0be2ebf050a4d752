"""`mtjax bench` and `mtjax train --profile`: the bare arm computes the trainer's objective, the
FLOP count matches the matmuls the traced train step performs, the JSON has every figure, a
profile trace is written."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import REPO, build_step, host_batch, tiny_config
from mtjax import bench, cli
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.train import losses


W = np.array([1.0, 0.5, 2.0], np.float32)  # per-task loss weights and entropy coefficients
C = np.array([0.1, 0.0, 0.3], np.float32)


def _trainers_objective(cfg):
  """(graphdef, state, batch, the trainer's objective on it with W, C and z_loss 1e-3)."""
  from flax import nnx
  _, graphdef, state, _, _ = build_step(cfg, jax.devices()[:1])
  batch = {k: np.asarray(v) for k, v in host_batch(cfg).items()}
  logits = nnx.merge(graphdef, state.params)(batch["inputs"], batch["positions"], batch["segment_ids"])
  expected, _ = losses.multitask_objective(logits, batch, W, C, z_loss=1e-3)
  return graphdef, state, batch, expected


def test_bare_step_objective_equals_the_trainers():
  graphdef, state, batch, expected = _trainers_objective(tiny_config(**{"model.z_loss": 1e-3}))
  w, c = W, C
  import optax
  tx = optax.sgd(0.0)
  step = bench.make_bare_step(graphdef, tx, 3, 1e-3)
  params = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), state.params)
  _, _, got = step(params, tx.init(params), batch, w, c)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def _vocab(cfg):
  return tokenizer_lib.get(cfg.data.tokenizer).vocab_size


def _sub_jaxprs(eqn):
  from jax.extend import core
  for value in eqn.params.values():
    for x in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(x, core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, core.Jaxpr):
        yield x


def matmul_flops(jaxpr) -> int:
  """2 * M * N * K (times batch dims) for every dot_general the program runs, through nested
  jits, remat and scans (times their length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
      continue
    inner = sum(matmul_flops(j) for j in _sub_jaxprs(eqn))
    if inner and eqn.primitive.name in ("while", "cond"):
      raise NotImplementedError(f"matmuls inside {eqn.primitive.name}: trip count unknown")
    total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


@pytest.mark.parametrize("overrides", [
    {},
    {"model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 96, "data.seq_len": 48},
    {"model.num_layers": 3, "data.batch_size": 4, "data.seq_len": 128},
    {"model.tie_embeddings": True},
], ids=["tiny", "gqa_head_dim", "deeper_longer", "tied_embeddings"])
def test_model_flops_equal_the_traced_steps_matmuls(overrides):
  # Independent count: the dot_generals in the jaxpr of the real gradient function (forward and
  # backward, attention included), on abstract inputs. The 6N + 12*L*H*hd*seq convention (Kaplan
  # et al. 2020; PaLM, Chowdhery et al. 2022, app. B) also counts the 1-D parameters (norm
  # scales: elementwise, no matmul) at 6 FLOPs per token, so they are added here; model FLOPs
  # exclude rematerialization, so remat is off.
  from flax import nnx
  from mtjax.model import Decoder, ModelSpec
  from mtjax.train import step as step_lib
  cfg = tiny_config(**{"model.remat": "none", **overrides})
  spec = ModelSpec.from_config(cfg.model, _vocab(cfg), "float32")
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  params = nnx.to_pure_dict(abstract)
  B, L, T = cfg.data.batch_size, cfg.data.seq_len, cfg.num_tasks
  batch = {k: jax.ShapeDtypeStruct((B, L), np.float32 if k == "loss_mask" else np.int32)
           for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids")}
  vec = jax.ShapeDtypeStruct((T,), np.float32)
  # Dense loss: the chunked loss recomputes the head's matmul in its backward (like remat).
  grad_fn = step_lib.make_grad_fn(graphdef, num_tasks=T, z_loss=cfg.model.z_loss, loss_chunk=0)
  matmuls = matmul_flops(jax.make_jaxpr(grad_fn)(params, batch, vec, vec).jaxpr)
  # Vectors per layer: norm scales ([d], or [layers, d] when stacked for the scan).
  vectors = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
                if len(x.shape) - (getattr(path[0], "key", None) == "layers") == 1)
  got = bench.model_flops_per_step(spec, params, B, L)
  assert got == matmuls + 6 * vectors * B * L
  # MFU's count (MaxText's): causal attention at half, i.e. 6 (not 12) * layers * heads * hd * L.
  attention = 12 * spec.num_layers * spec.num_heads * spec.head_dim * L * B * L
  assert bench.model_flops_per_step(spec, params, B, L, causal=True) == got - attention / 2
  if not overrides:  # XLA's own count of the compiled step: the matmuls plus elementwise work.
    # XLA counts a loop body once, whatever its trip count: one layer, so the scan runs once.
    spec1 = ModelSpec.from_config(cfg.replace(**{"model.num_layers": 1}).model, _vocab(cfg), "float32")
    graphdef1, abstract1 = nnx.split(nnx.eval_shape(lambda: Decoder(spec1, nnx.Rngs(0))))
    params1 = nnx.to_pure_dict(abstract1)
    grad_fn1 = step_lib.make_grad_fn(graphdef1, num_tasks=T, z_loss=cfg.model.z_loss,
                                     loss_chunk=0)
    matmuls1 = matmul_flops(jax.make_jaxpr(grad_fn1)(params1, batch, vec, vec).jaxpr)
    cost = jax.jit(grad_fn1).lower(params1, batch, vec, vec).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert matmuls1 < cost["flops"] < 1.25 * matmuls1


@pytest.mark.slow
def test_bench_cli_writes_every_figure(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "--config", f"{REPO}/configs/bench.py:tiny", "--out", str(out),
                   "--rounds", "2", "--steps", "3", "--loader_seconds", "0.3"]) == 0
  result = json.loads(out.read_text())
  assert set(result["loader_headroom"]) == {"1", "4", "64"}
  assert all(v > 0 for v in result["loader_headroom"].values())
  ratios = result["step_overhead_spread"]["rounds"]
  assert len(ratios) == 2 and result["step_overhead"] == pytest.approx(np.median(ratios))
  assert ratios[0] == pytest.approx(result["trainer_step_times_s"][0] / result["bare_step_times_s"][0])
  assert result["compile"]["train_step"]["count"] == 1 and result["compile"]["eval_step"]["count"] == 1
  assert 0 < result["mfu_measured_peak"] < 1 and result["mfu"] is None  # no spec peak for a CPU
  assert "torch_eager_cpu" in result and "step_overhead" in capsys.readouterr().out
  from mtjax.config import WEIGHTING_METHODS
  weighting = result["weighting"]
  assert set(weighting) == set(WEIGHTING_METHODS) and weighting["static"]["over_static"] == 1.0
  for figures in weighting.values():
    assert len(figures["over_static_rounds"]) == 2
    assert figures["over_static"] == pytest.approx(np.median(figures["over_static_rounds"]))


def test_train_profile_writes_a_trace(tmp_path):
  work = tmp_path / "run"
  assert cli.main(["train", "--config", f"{REPO}/configs/demo.py:tiny", "--workdir", str(work),
                   "--profile", "2:4", "--config.train.steps=5", "--config.train.progress=false"]) == 0
  traces = list((work / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


def test_bad_profile_range_exits_2(tmp_path, capsys):
  assert cli.main(["train", "--config", f"{REPO}/configs/demo.py:tiny", "--workdir",
                   str(tmp_path / "r"), "--profile", "5:2"]) == 2
  assert "--profile" in capsys.readouterr().err


def test_torch_reference_objective_equals_the_trainers():
  torch = pytest.importorskip("torch")
  from mtjax import torch_reference
  from mtjax.model import ModelSpec
  cfg = tiny_config()
  spec = ModelSpec.from_config(cfg.model, _vocab(cfg), "float32")
  _, state, batch, expected = _trainers_objective(cfg)
  w, c = W, C
  P = torch_reference.params_from_jax(state.params)
  got = torch_reference.objective(spec, P, torch_reference.to_torch(batch), torch.tensor(w),
                                  torch.tensor(c), 3, 1e-3)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-4)
