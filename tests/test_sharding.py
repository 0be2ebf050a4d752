"""5 steps on 8 devices (data=2, fsdp=2, tensor=2) agree with 1 device; parameters really shard."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mtjax import recipes

pytestmark = pytest.mark.multidevice


def test_sharded_matches_single_device_and_params_are_sharded(tmp_path):
  cfg = tiny_config(**{"train.steps": 5, "model.d_model": 64, "model.mlp_dim": 128})
  sharded_cfg = cfg.replace(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  single_cfg = cfg.replace(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
  assert len(jax.devices()) == 8
  sharded = recipes.run(sharded_cfg, tmp_path / "sharded")
  single = recipes.run(single_cfg, tmp_path / "single", devices=jax.devices()[:1])

  losses_8 = [r["train/loss"] for r in sharded.history]
  losses_1 = [r["train/loss"] for r in single.history]
  assert len(losses_8) == len(losses_1) == 5
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
  assert losses_8[-1] < losses_8[0]

  params = sharded.state.params
  # vocab 384 -> tensor (2), d_model 64 -> fsdp (2)
  embed = params["token_embed"]
  assert embed.shape == (384, 64)
  assert {s.data.shape for s in embed.addressable_shards} == {(192, 32)}
  layers = sharded_cfg.model.num_layers
  q = params["layers"]["attn"]["q"]  # [layers, embed, heads, head_dim] = [L, 64, 4, 16]
  assert {s.data.shape for s in q.addressable_shards} == {(layers, 32, 2, 16)}
  gate = params["layers"]["mlp"]["gate"]  # [layers, embed, mlp] = [L, 64, 128]
  assert {s.data.shape for s in gate.addressable_shards} == {(layers, 32, 64)}
  # Optimizer moments follow their parameters.
  mu = sharded.state.opt_state[1][0].mu["layers"]["mlp"]["gate"]
  assert mu.sharding == gate.sharding
  # Single-device run: everything on one device, full shapes.
  assert {s.data.shape for s in single.state.params["token_embed"].addressable_shards} == {(384, 64)}


def test_multislice_dcn_axis_matches_single_device(tmp_path):
  """Two 'slices' of 4 devices (mesh.dcn=2, fsdp=4 inside each): data-parallel across slices,
  FSDP within; losses equal a 1-device run, parameters are replicated across slices only."""
  from mtjax.parallel.mesh import make_mesh
  cfg = tiny_config(**{"train.steps": 4, "model.d_model": 64, "model.mlp_dim": 128})
  multi_cfg = cfg.replace(**{"mesh.dcn": 2, "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1})
  mesh = make_mesh(multi_cfg.mesh)
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
  first_slice = set(mesh.devices[0].flat)
  assert first_slice == set(jax.devices()[:4])  # one slice = one contiguous group of devices
  multi = recipes.run(multi_cfg, tmp_path / "multi")
  single = recipes.run(cfg.replace(**{"mesh.fsdp": 1}), tmp_path / "single", devices=jax.devices()[:1])
  np.testing.assert_allclose([r["train/loss"] for r in multi.history],
                             [r["train/loss"] for r in single.history], rtol=1e-4)
  gate = multi.state.params["layers"]["mlp"]["gate"]  # [L, 64, 128]: embed over fsdp (4)
  shards = {s.device: s.data for s in gate.addressable_shards}
  assert {x.shape for x in shards.values()} == {(cfg.model.num_layers, 16, 128)}
  # The same shard index on slice 0 and slice 1 holds the same values (replicated over dcn).
  for a, b in zip(mesh.devices[0].flat, mesh.devices[1].flat):
    np.testing.assert_array_equal(shards[a], shards[b])


def test_bad_dcn_exits_2(tmp_path, capsys):
  from conftest import REPO
  from mtjax import cli
  assert cli.main(["train", "--config", f"{REPO}/configs/demo.py:tiny", "--workdir", str(tmp_path / "r"),
                   "--config.mesh.dcn=3"]) == 2
  assert "mesh.dcn" in capsys.readouterr().err
