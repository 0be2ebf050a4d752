"""The multi-slice mesh is JAX's hybrid mesh: slices from slice_index (their count must equal
mesh.dcn), else processes; inside a slice, mesh_utils' topology-aware layout or a clear error.

Fake devices follow JAX's own mesh_utils tests (MockTpuDevice): id, platform, device_kind,
process_index, coords, core_on_chip and, on TPU, slice_index. The reference for the order is
`mesh_utils.create_hybrid_device_mesh` itself.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from mtjax.config import MeshConfig
from mtjax.errors import BadInputError
from mtjax.parallel.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  id: int
  platform: str
  device_kind: str
  process_index: int
  coords: tuple[int, int, int]
  core_on_chip: int
  slice_index: int


@dataclasses.dataclass(frozen=True)
class FakeDevice:  # CPU (or an older GPU runtime): no slice_index, no topology
  id: int
  platform: str
  device_kind: str
  process_index: int


def tpu_slices(x, y, z, num_slices, kind="TPU v4", cores_per_chip=1):
  """jax.devices() of num_slices TPU slices of x*y*z chips: hosts of 2x2 chips (fewer when the
  slice is smaller), listed slice by slice, host by host, as the runtime numbers them."""
  hx, hy = min(x, 2), min(y, 2)
  devices = []
  for s in range(num_slices):
    for zp in range(z):
      for yp in range(y // hy):
        for xp in range(x // hx):
          process = xp + (x // hx) * (yp + (y // hy) * (zp + z * s))
          for yd in range(hy):
            for xd in range(hx):
              for core in range(cores_per_chip):
                devices.append(FakeTpu(len(devices), "tpu", kind, process,
                                       (xp * hx + xd, yp * hy + yd, zp), core, s))
  return devices


def hybrid(devices, shape, **kwargs):
  dcn, data, fsdp, tensor = shape
  return mesh_utils.create_hybrid_device_mesh((1, data, fsdp, tensor), (dcn, 1, 1, 1), devices,
                                              allow_split_physical_axes=True, **kwargs)


def ids(array):
  return np.vectorize(lambda d: d.id)(array)


@pytest.mark.parametrize("dcn", [1, 4])
def test_slice_count_must_equal_dcn(dcn):
  devices = tpu_slices(2, 2, 1, num_slices=2)  # 2 slices x 4 chips
  with pytest.raises(BadInputError) as err:
    make_mesh(MeshConfig(dcn=dcn, data=1, fsdp=-1, tensor=1), devices)
  assert err.value.field == "mesh.dcn"
  assert "2 slice(s)" in err.value.expected and f"mesh.dcn={dcn}" in err.value.expected
  # JAX refuses the same grouping.
  with pytest.raises(ValueError, match="Number of slices 2"):
    hybrid(devices, (dcn, 1, 8 // dcn, 1))


def test_slice_count_mismatch_exits_2(tmp_path, capsys, monkeypatch):
  from conftest import DEMO
  from mtjax import cli
  monkeypatch.setattr(jax, "devices", lambda *a, **k: tpu_slices(2, 2, 1, num_slices=2))
  assert cli.main(["train", "--check", "--config", f"{DEMO}:tiny", "--config.mesh.dcn=4",
                   "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: mesh.dcn: ") and "2 slice(s)" in err and "mesh.dcn=4" in err


@pytest.mark.parametrize("topology,kind,cores,num_slices,shape", [
    ((2, 2, 1), "TPU v4", 1, 2, (2, 1, 4, 1)),
    ((2, 2, 1), "TPU v4", 1, 2, (2, 2, 2, 1)),
    ((2, 2, 1), "TPU v4", 1, 2, (2, 1, 2, 2)),
    ((2, 2, 2), "TPU v4", 1, 2, (2, 2, 2, 2)),
    ((2, 2, 2), "TPU v4", 1, 4, (4, 1, 8, 1)),
    ((4, 2, 1), "TPU v5 lite", 1, 2, (2, 2, 4, 1)),
    ((2, 2, 1), "TPU v3", 2, 2, (2, 2, 2, 2)),
])
@pytest.mark.parametrize("reverse", [False, True])
def test_order_equals_create_hybrid_device_mesh(topology, kind, cores, num_slices, shape, reverse):
  devices = tpu_slices(*topology, num_slices=num_slices, kind=kind, cores_per_chip=cores)
  if reverse:  # slices are sorted by slice_index, whatever order the devices come in
    devices = devices[::-1]
  dcn, data, fsdp, tensor = shape
  mesh = make_mesh(MeshConfig(dcn=dcn, data=data, fsdp=fsdp, tensor=tensor), devices)
  assert dict(mesh.shape) == dict(zip(("dcn", "data", "fsdp", "tensor"), shape))
  np.testing.assert_array_equal(ids(mesh.devices), ids(hybrid(devices, shape)))
  for k in range(dcn):
    assert {d.slice_index for d in mesh.devices[k].flat} == {k}


def test_layout_follows_the_physical_torus_not_device_ids():
  """Hosts number their 2x2 chips x-fastest, so in id order 4 consecutive devices form a 2x2
  square; the topology-aware layout puts each 4-device tensor group on one ring of the 4x4 torus."""
  devices = tpu_slices(4, 4, 1, num_slices=2)
  mesh = make_mesh(MeshConfig(dcn=2, data=1, fsdp=4, tensor=4), devices)
  by_id = np.array(devices, dtype=object).reshape(2, 1, 4, 4)
  assert not np.array_equal(ids(mesh.devices), ids(by_id))
  for group in mesh.devices.reshape(-1, 4):
    coords = np.array([d.coords for d in group])
    varying = [axis for axis in range(3) if len(set(coords[:, axis])) > 1]
    assert len(varying) == 1 and sorted(coords[:, varying[0]]) == [0, 1, 2, 3]
  for group in by_id.reshape(-1, 4):  # the id order would not: a 2x2 square per host
    assert len({d.coords[0] for d in group}) == len({d.coords[1] for d in group}) == 2


def test_slice_that_cannot_be_laid_out_is_an_error_not_id_order():
  devices = tpu_slices(2, 2, 1, num_slices=2)
  holed = dataclasses.replace(devices[7], coords=(3, 3, 0))  # slice 1 is no longer a cuboid
  devices = devices[:7] + [holed]
  with pytest.raises(BadInputError) as err:
    make_mesh(MeshConfig(dcn=2, data=1, fsdp=4, tensor=1), devices)
  assert err.value.field == "mesh" and "slice 1" in err.value.expected
  assert "TPU v4" in err.value.expected and "\n" not in err.value.expected


def test_unequal_slices_are_an_error():
  devices = tpu_slices(2, 2, 1, num_slices=2)
  devices = devices[:6] + [dataclasses.replace(d, slice_index=0) for d in devices[6:]]
  with pytest.raises(BadInputError, match=r"unequal device counts \[6, 2\]"):
    make_mesh(MeshConfig(dcn=2, data=1, fsdp=-1, tensor=1), devices)


def test_without_slice_index_processes_are_the_slices():
  # 2 processes x 4 GPUs, listed out of id order: process_index groups, ids order each slice.
  devices = [FakeDevice(i, "gpu", "NVIDIA H100", i // 4) for i in (1, 0, 3, 2, 5, 4, 7, 6)]
  mesh = make_mesh(MeshConfig(dcn=2, data=1, fsdp=2, tensor=2), devices)
  np.testing.assert_array_equal(ids(mesh.devices),
                                ids(hybrid(devices, (2, 1, 2, 2), process_is_granule=True)))
  np.testing.assert_array_equal(ids(mesh.devices).ravel(), np.arange(8))
  for dcn, platform in ((4, "gpu"), (4, "cpu")):  # 2 processes but 4 slices asked for
    devices = [FakeDevice(i, platform, platform, i // 4) for i in range(8)]
    with pytest.raises(BadInputError) as err:
      make_mesh(MeshConfig(dcn=dcn, data=1, fsdp=-1, tensor=1), devices)
    assert err.value.field == "mesh.dcn"
    assert "2 processes" in err.value.expected and f"mesh.dcn={dcn}" in err.value.expected


@pytest.mark.multidevice
@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (2, 2, 1, 2), (4, 2, 1, 1), (8, 1, 1, 1)])
def test_one_cpu_process_splits_its_devices_in_order(shape):
  """The testing fallback: 8 fake CPU devices of one process form dcn contiguous 'slices', each
  laid out in device order (what the multi-slice test in test_sharding.py trains on)."""
  devices = jax.devices()
  assert len(devices) == 8 and {d.process_index for d in devices} == {0}
  dcn, data, fsdp, tensor = shape
  mesh = make_mesh(MeshConfig(dcn=dcn, data=data, fsdp=fsdp, tensor=tensor))
  np.testing.assert_array_equal(mesh.devices, np.array(devices, dtype=object).reshape(shape))
  # Without slice_index on CPU, one process and no topology: JAX's own create_device_mesh agrees.
  np.testing.assert_array_equal(mesh.devices, mesh_utils.create_device_mesh(shape, devices))


@pytest.mark.multidevice
def test_single_slice_cpu_path_unchanged():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh.devices.shape == (1, 2, 2, 2)
  subset = make_mesh(MeshConfig(fsdp=-1), jax.devices()[3:7])
  np.testing.assert_array_equal(subset.devices.ravel(), np.array(jax.devices()[3:7], dtype=object))


# ------------------------------------------------------------------ mesh.dcn = -1 (the default)

@dataclasses.dataclass(frozen=True)
class FakeGpu:  # XLA's BuildGlobalTopology: a slice_index per host (per NVLink domain on NVL72)
  id: int
  platform: str
  device_kind: str
  process_index: int
  slice_index: int


def gpu_hosts(hosts, per_host, hosts_per_domain=1):
  """jax.devices() of `hosts` GPU hosts of `per_host` GPUs, host by host; each NVLink domain of
  `hosts_per_domain` hosts is one slice (1: every host its own, as on H100 nodes)."""
  return [FakeGpu(h * per_host + g, "gpu", "NVIDIA H100 80GB HBM3", h, h // hosts_per_domain)
          for h in range(hosts) for g in range(per_host)]


def test_dcn_defaults_to_the_live_slice_count():
  assert MeshConfig().dcn == -1
  # 2 hosts x 8 H100s: 2 slices, data-parallel across hosts, fsdp over each host's 8 GPUs.
  devices = gpu_hosts(2, 8)
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 8, "tensor": 1}
  assert ids(mesh.devices[0]).ravel().tolist() == list(range(8))
  assert ids(mesh.devices[1]).ravel().tolist() == list(range(8, 16))
  # NVL72-like: 2 hosts in one NVLink domain are one slice: no dcn axis, fsdp over all 16.
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), gpu_hosts(2, 8, hosts_per_domain=2))
  assert dict(mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 16, "tensor": 1}
  # TPU: 4 slices of 2x2x2 chips.
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), tpu_slices(2, 2, 2, num_slices=4))
  assert dict(mesh.shape) == {"dcn": 4, "data": 1, "fsdp": 8, "tensor": 1}
  # CPU devices carry no slice_index: one slice.
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices())
  assert mesh.shape["dcn"] == 1


@pytest.mark.parametrize("dcn", [1, 4])
def test_an_explicit_dcn_that_differs_from_the_gpu_hosts_exits_2_naming_both(dcn):
  with pytest.raises(BadInputError) as err:
    make_mesh(MeshConfig(dcn=dcn, data=1, fsdp=-1, tensor=1), gpu_hosts(2, 8))
  assert err.value.field == "mesh.dcn"
  assert "2 slice(s)" in err.value.expected and f"mesh.dcn={dcn}" in err.value.expected


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_a_run_expecting_an_accelerator_on_cpu_devices_exits_2_with_the_cause(platform, capsys):
  from conftest import DEMO
  from mtjax import cli
  assert cli.main(["train", "--check", "--config", f"{DEMO}:tiny",
                   f"--config.train.platform={platform}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: train.platform: expected {platform} devices, but JAX found ")
  assert " cpu device(s)" in err and "JAX_PLATFORMS" in err and len(err.splitlines()) == 1
  # The devices JAX found are what was expected: no error.
  assert cli.main(["train", "--check", "--config", f"{DEMO}:tiny", "--config.train.platform=cpu"]) == 0
  assert cli.main(["train", "--check", "--config", f"{DEMO}:tiny", "--config.train.platform=ipu"]) == 2
  assert "error: train.platform: expected one of auto, cpu, gpu, tpu, got 'ipu'" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class FakeCudaDevice:
  platform: str
  compute_capability: str


def test_auto_dtype_is_float32_where_bfloat16_is_emulated():
  """model.dtype="auto": bfloat16 on TPU and on Ampere and later (8.0 A100, 9.0 H100), float32
  on CPU and on pre-Ampere GPUs (7.5: Colab's T4, 7.0: V100), which emulate bfloat16 slowly."""
  from mtjax.resolve import auto_dtype
  assert auto_dtype(FakeDevice(0, "cpu", "cpu", 0)) == "float32"
  assert auto_dtype(tpu_slices(2, 2, 1, 1)[0]) == "bfloat16"
  expected = {"7.0": "float32", "7.5": "float32", "8.0": "bfloat16", "8.9": "bfloat16",
              "9.0": "bfloat16", "10.0": "bfloat16"}
  assert {cc: auto_dtype(FakeCudaDevice("gpu", cc)) for cc in expected} == expected
