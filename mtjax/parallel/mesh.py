"""The device mesh with axes (data, fsdp, tensor), sizes from config (-1: the rest)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mtjax.config import MeshConfig
from mtjax.errors import BadInputError
from mtjax.parallel.sharding import MESH_AXES


def resolve_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise BadInputError("mesh", f"{num_devices} devices cannot be split with the fixed axes "
                          f"data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise BadInputError("mesh", f"data*fsdp*tensor = {int(np.prod(sizes))} must equal the device "
                        f"count {num_devices} (use -1 for 'the rest')")
  return tuple(sizes)


def make_mesh(mesh: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_shape(mesh, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  # A subset of devices (tests compare 1 device against 8 in one process): lay them out as given.
  return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)
