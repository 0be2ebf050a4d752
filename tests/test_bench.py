"""`mtjax bench` and `mtjax train --profile`: the bare arm computes the trainer's objective, the
FLOP count matches a hand count, the JSON has every figure, a profile trace is written."""

import json

import jax
import numpy as np
import pytest

from conftest import REPO, build_step, host_batch, tiny_config
from mtjax import bench, cli
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


def test_model_flops_by_hand():
  from mtjax.model import ModelSpec
  cfg = tiny_config()
  spec = ModelSpec.from_config(cfg.model, 259, "cpu")
  _, _, state, _, _ = build_step(cfg, jax.devices()[:1])
  d, f, L, V, H, hd, kv = 32, 64, 2, spec.vocab_size, 4, 8, 2
  per_layer = d * H * hd + 2 * d * kv * hd + H * hd * d + 3 * d * f + 2 * d  # q, k+v, o, swiglu, norms
  n = L * per_layer + d + d * V  # final norm, output head (the embedding lookup is not counted)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  expected = (6 * n + 12 * L * H * hd * T) * B * T
  assert bench.model_flops_per_step(spec, state.params, B, T) == expected


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
  assert 0 < result["mfu"] < 1
  assert "torch_eager_cpu" in result and "step_overhead" in capsys.readouterr().out


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
  spec = ModelSpec.from_config(cfg.model, 259, "cpu")
  _, state, batch, expected = _trainers_objective(cfg)
  w, c = W, C
  P = torch_reference.params_from_jax(state.params)
  got = torch_reference.objective(spec, P, torch_reference.to_torch(batch), torch.tensor(w),
                                  torch.tensor(c), 3, 1e-3)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-4)
