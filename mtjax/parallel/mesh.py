"""The device mesh with axes (dcn, data, fsdp, tensor), sizes from config (-1: the rest).

`dcn` is the number of slices of a multi-slice TPU pod (or of granules, e.g. hosts, elsewhere):
the outer data-parallel axis whose collectives cross the slower data-center network. Inside a
slice, (data, fsdp, tensor) are laid out over the fast interconnect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import jax
import numpy as np
from jax.experimental import mesh_utils

from mtjax.config import MeshConfig
from mtjax.errors import BadInputError
from mtjax.parallel.sharding import MESH_AXES

if TYPE_CHECKING:
  # jax.Device is assigned from jaxlib's compiled module, which ships no type stub, so a type
  # checker cannot use it in annotations. Annotate devices with this alias instead.
  Device: TypeAlias = Any
else:
  Device = jax.Device


def resolve_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
  """(dcn, data, fsdp, tensor); data*fsdp*tensor fill one slice of num_devices / dcn devices."""
  if num_devices % mesh.dcn:
    raise BadInputError("mesh.dcn", f"{num_devices} devices cannot form {mesh.dcn} equal slices")
  per_slice = num_devices // mesh.dcn
  sizes: list[int] = [mesh.data, mesh.fsdp, mesh.tensor]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if per_slice % known:
      raise BadInputError("mesh", f"{per_slice} devices per slice cannot be split with the fixed "
                          f"axes data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor}")
    sizes[sizes.index(-1)] = per_slice // known
  if int(np.prod(sizes)) != per_slice:
    raise BadInputError("mesh", f"data*fsdp*tensor = {int(np.prod(sizes))} must equal the devices "
                        f"per slice {per_slice} ({num_devices} devices / dcn {mesh.dcn}; use -1 "
                        "for 'the rest')")
  data, fsdp, tensor = sizes
  return mesh.dcn, data, fsdp, tensor


def _slices(devices: Sequence[Device], dcn: int) -> list[list[Device]]:
  """Devices grouped by slice (TPU slice_index), else by process, else in order."""
  for key in ("slice_index", "process_index"):
    groups: dict[int, list[Device]] = {}
    for d in devices:
      groups.setdefault(getattr(d, key, 0), []).append(d)
    if len(groups) == dcn:
      return [groups[k] for k in sorted(groups)]
  per = len(devices) // dcn
  return [list(devices[i * per:(i + 1) * per]) for i in range(dcn)]


def make_mesh(mesh: MeshConfig, devices: Sequence[Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_shape(mesh, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  everything = len(devices) == len(jax.devices())
  if shape[0] == 1 and everything:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  if shape[0] == 1:
    # A subset of devices (tests compare 1 device against 8 in one process): lay them out as given.
    return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)
  # Multi-slice: each slice gets the topology-aware layout of its own devices.
  slices = []
  for group in _slices(devices, shape[0]):
    try:
      slices.append(mesh_utils.create_device_mesh(shape[1:], devices=group))
    except (ValueError, NotImplementedError, AssertionError):
      slices.append(np.array(group).reshape(shape[1:]))
  return jax.sharding.Mesh(np.stack(slices), MESH_AXES, axis_types=auto)
