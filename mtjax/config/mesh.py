"""The mesh's config group (mesh.*): dcn x data x fsdp x tensor devices; its checks (whether
the devices fit is mtjax.parallel.mesh's, at setup)."""

from __future__ import annotations

import dataclasses

from mtjax.errors import BadInputError

@dataclasses.dataclass(frozen=True)
class MeshConfig:
  # Slices: the outer data-parallel axis over the data-center network. -1: as many as the live
  # devices span (distinct slice_index: TPU slices; on GPU one per host, or per NVLink domain on
  # NVL72; 1 for CPU devices, which carry none), as MaxText's num_slices=-1.
  dcn: int = -1
  data: int = 1
  fsdp: int = -1  # -1: the rest of the devices
  tensor: int = 1


def check(mesh: MeshConfig) -> None:
  if mesh.dcn < 1 and mesh.dcn != -1:
    raise BadInputError("mesh.dcn", f"expected the number of slices (>= 1) or -1 (the live "
                        f"devices' slice count), got {mesh.dcn}")
  for name in ("data", "fsdp", "tensor"):
    size = getattr(mesh, name)
    if size == 0 or size < -1:
      raise BadInputError(f"mesh.{name}", f"expected a positive size or -1, got {size}")
  if [mesh.data, mesh.fsdp, mesh.tensor].count(-1) > 1:
    raise BadInputError("mesh", "at most one axis may be -1 (the rest of the devices)")
