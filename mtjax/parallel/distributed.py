"""Multi-process (multi-host) start-up through JAX's own runtime.

`mtjax train` calls `initialize()` before touching devices. It starts `jax.distributed` when this
process is one of several: from flags (--coordinator/--num_processes/--process_id), from
MTJAX_COORDINATOR / MTJAX_NUM_PROCESSES / MTJAX_PROCESS_ID, or from what SLURM, TPU VMs and
Kubernetes set (JAX's own cluster detection). On a Cloud TPU VM it always calls
`jax.distributed.initialize()` with no arguments, as MaxText does: JAX then reads the slice from
the VM's metadata server (a pod slice started with `gcloud ... --worker=all` sets none of the
variables GKE sets); a TPU VM that is no cluster (e.g. a Colab runtime) runs as one process. On
CPU it selects the gloo collectives, so a multi-process run on one machine works for tests
(launch/multiprocess_cpu.sh).
"""

from __future__ import annotations

import os

import jax


_TPU_VARIABLES = ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                  "TPU_ACCELERATOR_TYPE")


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  # Kubernetes runs rendered by `mtjax jobset` set MTJAX_COORDINATOR / MTJAX_NUM_PROCESSES /
  # MTJAX_PROCESS_ID explicitly (JobSet itself sets no JOBSET_NAME variable).
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def on_tpu_vm() -> bool:
  """Whether this is a Cloud TPU VM that will run on its TPUs, from what is local (no network).

  The TPU variables that TPU VM images and GKE set, else TPU chips on the PCI bus (JAX's own
  check, jax._src.hardware_utils); never when JAX_PLATFORMS names platforms without `tpu`.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  if any(os.environ.get(name) for name in _TPU_VARIABLES):
    return True
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # noqa: BLE001  (a private module: another jax version may lack it)
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed if this run has several processes; returns whether it did."""
  coordinator = coordinator or os.environ.get("MTJAX_COORDINATOR")
  if num_processes is None and os.environ.get("MTJAX_NUM_PROCESSES"):
    num_processes = int(os.environ["MTJAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("MTJAX_PROCESS_ID"):
    process_id = int(os.environ["MTJAX_PROCESS_ID"])
  explicit = num_processes is not None and num_processes > 1
  tpu_vm = not explicit and on_tpu_vm()
  if not explicit and not tpu_vm and not _cluster_detected():
    return False
  if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") or "cpu" in os.environ.get("JAX_PLATFORMS", ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif tpu_vm and not _cluster_detected():
    try:
      jax.distributed.initialize()  # JAX finds the slice's workers (metadata server, or GKE's)
    except ValueError:  # JAX found no cluster (nothing set yet): a lone TPU VM, one process
      return False
  else:
    jax.distributed.initialize()  # SLURM / TPU / Kubernetes: JAX reads the cluster itself
  return True
