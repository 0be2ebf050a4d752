"""Multi-process (multi-host) start-up through JAX's own runtime.

`mtjax train` calls `initialize()` before touching devices. It starts `jax.distributed` when this
process is one of several: from flags (--coordinator/--num_processes/--process_id), from
MTJAX_COORDINATOR / MTJAX_NUM_PROCESSES / MTJAX_PROCESS_ID, or from what SLURM, TPU VMs and
Kubernetes set (JAX's own cluster detection). On CPU it selects the gloo collectives, so a
multi-process run on one machine works for tests (launch/multiprocess_cpu.sh).
"""

from __future__ import annotations

import os

import jax


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")) or "JOBSET_NAME" in os.environ


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed if this run has several processes; returns whether it did."""
  coordinator = coordinator or os.environ.get("MTJAX_COORDINATOR")
  if num_processes is None and os.environ.get("MTJAX_NUM_PROCESSES"):
    num_processes = int(os.environ["MTJAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("MTJAX_PROCESS_ID"):
    process_id = int(os.environ["MTJAX_PROCESS_ID"])
  explicit = num_processes is not None and num_processes > 1
  if not explicit and not _cluster_detected():
    return False
  if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") or "cpu" in os.environ.get("JAX_PLATFORMS", ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()  # SLURM / TPU / Kubernetes: JAX reads the cluster itself
  return True
