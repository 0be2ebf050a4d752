"""The device mesh with axes (dcn, data, fsdp, tensor), sizes from config (-1: the rest).

`dcn` is the number of slices of a multi-slice TPU pod: the outer data-parallel axis whose
collectives cross the slower data-center network. Inside a slice, (data, fsdp, tensor) are laid
out over the fast interconnect. With mesh.dcn > 1 the mesh is built the way JAX's
`mesh_utils.create_hybrid_device_mesh` builds it (and MaxText with num_slices > 1):

- Devices that carry `slice_index` (TPU; GPU, where XLA numbers the slices) are grouped by it, in
  slice order, and the number of slices must equal mesh.dcn (else exit 2 naming both).
- Devices without it (CPU) are grouped by `process_index` when there are mesh.dcn processes.
  One CPU process is the one exception, for testing only: its devices (e.g. 8 fake ones from
  `--xla_force_host_platform_device_count`) split into mesh.dcn contiguous groups in the order
  given. Any other process count is an error.
- Inside each slice, `mesh_utils.create_device_mesh(..., allow_split_physical_axes=True)` lays
  out the ICI shape (1, data, fsdp, tensor) over the physical topology; if it cannot, that is an
  error, not a silent fall back to device-id order (on CPU, which has no physical topology, the
  given order is the layout).

So the device order equals `create_hybrid_device_mesh((1, data, fsdp, tensor), (dcn, 1, 1, 1),
devices, allow_split_physical_axes=True)` (`process_is_granule=True` for devices without
slice_index). mesh.dcn = -1 (the default) takes the live devices' slice count: the number of
distinct slice_index values (XLA gives every TPU slice, every GPU host, or every NVLink domain of
a GB200/GB300 NVL72 its own), 1 for devices without it. An explicit mesh.dcn that differs from it
is an error naming both, as is mesh.dcn = 1 on devices that span several slices.
"""

from __future__ import annotations

import dataclasses
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


def live_slices(devices: Sequence[Device]) -> int:
  """How many slices the devices span: distinct slice_index values, 1 for devices without it."""
  if devices and hasattr(devices[0], "slice_index"):
    return len({d.slice_index for d in devices})
  return 1


def resolve_dcn(mesh: MeshConfig, devices: Sequence[Device]) -> MeshConfig:
  """The mesh config with dcn = -1 replaced by the devices' slice count."""
  return dataclasses.replace(mesh, dcn=live_slices(devices)) if mesh.dcn == -1 else mesh


def resolve_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
  """(dcn, data, fsdp, tensor); data*fsdp*tensor fill one slice of num_devices / dcn devices
  (mesh.dcn already resolved: resolve_dcn)."""
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


def _group(devices: Sequence[Device], key: str) -> list[list[Device]]:
  """Devices grouped by an attribute, groups sorted by it, the given order kept inside each."""
  groups: dict[int, list[Device]] = {}
  for d in devices:
    groups.setdefault(getattr(d, key), []).append(d)
  return [groups[k] for k in sorted(groups)]


def slices(devices: Sequence[Device], dcn: int) -> list[list[Device]]:
  """The devices of each of the dcn slices, in slice order (JAX's granules; see the module doc)."""
  n, platform = len(devices), devices[0].platform
  if hasattr(devices[0], "slice_index"):
    groups = _group(devices, "slice_index")
    if len(groups) != dcn:
      raise BadInputError("mesh.dcn", f"the {n} {platform} devices form {len(groups)} slice(s) "
                          f"(by slice_index) but mesh.dcn={dcn}: set mesh.dcn={len(groups)}, the "
                          "number of slices, or -1 to take it from the devices")
  elif dcn == 1:
    groups = [list(devices)]
  else:
    groups = _group(devices, "process_index")
    if len(groups) == 1 and platform == "cpu":
      # Testing only: one CPU process stands in for dcn slices of contiguous devices.
      per = n // dcn
      groups = [list(devices[i * per:(i + 1) * per]) for i in range(dcn)]
    elif len(groups) != dcn:
      raise BadInputError("mesh.dcn", f"the {n} {platform} devices carry no slice_index, so each "
                          f"process is a slice: they come from {len(groups)} processes but "
                          f"mesh.dcn={dcn}: set mesh.dcn={len(groups)} or run {dcn} processes")
  sizes = [len(g) for g in groups]
  if len(set(sizes)) > 1:
    raise BadInputError("mesh.dcn", f"the slices have unequal device counts {sizes}; every slice "
                        "must have the same number of devices")
  return groups


def hybrid_devices(shape: Sequence[int], devices: Sequence[Device]) -> np.ndarray:
  """The [dcn, data, fsdp, tensor] device array: each slice laid out over its own topology."""
  dcn, *ici = shape
  blocks = []
  for k, group in enumerate(slices(devices, dcn)):
    try:
      block = mesh_utils.create_device_mesh((1, *ici), group, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
      if group[-1].platform != "cpu":  # CPU has no physical topology: the given order is right
        why = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise BadInputError("mesh", f"cannot lay out data={ici[0]} fsdp={ici[1]} tensor={ici[2]} "
                            f"over the {len(group)} {group[-1].device_kind} devices of slice {k} "
                            f"(mesh_utils.create_device_mesh: {why}); choose axis sizes that fit "
                            "the slice's topology") from None
      block = np.array(group, dtype=object).reshape(1, *ici)
    blocks.append(block)
  return np.concatenate(blocks)


def make_mesh(mesh: MeshConfig, devices: Sequence[Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_shape(resolve_dcn(mesh, devices), len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if shape[0] > 1:  # multi-slice: each slice gets the topology-aware layout of its own devices
    return jax.sharding.Mesh(hybrid_devices(shape, devices), MESH_AXES, axis_types=auto)
  slices(devices, 1)  # devices spanning several slices need mesh.dcn
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  # A subset of devices (tests compare 1 device against 8 in one process): lay them out as given.
  return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)
