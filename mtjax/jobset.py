"""Renders a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2) that runs `mtjax train` on GKE TPU or
GPU node pools: one pod per host, indexed completions, JAX's cluster detection (TPU) or the
MTJAX_* variables (GPU) start jax.distributed.

  mtjax jobset --name run1 --image IMAGE --accelerator tpu-v5-lite-podslice --topology 4x4 \\
      --hosts 4 --chips_per_host 4 -- --config configs/demo.py --workdir gs://bucket/runs/run1 \\
      > jobset.yaml && kubectl apply -f jobset.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtjax.errors import BadInputError

COORDINATOR_PORT = 1234


def render(*, name: str, image: str, accelerator: str, hosts: int, chips_per_host: int,
           train_args: Sequence[str], topology: str = "", max_restarts: int = 3) -> dict[str, Any]:
  if hosts <= 0 or chips_per_host <= 0:
    raise BadInputError("--hosts", "expected positive --hosts and --chips_per_host")
  if not name or not name.replace("-", "").isalnum() or name != name.lower():
    raise BadInputError("--name", f"expected a lowercase DNS label, got {name!r}")
  tpu = accelerator.startswith("tpu")
  if tpu and not topology:
    raise BadInputError("--topology", "TPU node pools need a topology, e.g. 4x4")
  selector = ({"cloud.google.com/gke-tpu-accelerator": accelerator,
               "cloud.google.com/gke-tpu-topology": topology} if tpu
              else {"cloud.google.com/gke-accelerator": accelerator})
  resource = "google.com/tpu" if tpu else "nvidia.com/gpu"
  env = [] if tpu else [
      {"name": "MTJAX_COORDINATOR",
       "value": f"{name}-workers-0-0.{name}:{COORDINATOR_PORT}"},
      {"name": "MTJAX_NUM_PROCESSES", "value": str(hosts)},
      {"name": "MTJAX_PROCESS_ID", "valueFrom": {"fieldRef": {
          "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
  ]
  container = {
      "name": "mtjax", "image": image,
      "command": ["mtjax", "train", *train_args],
      "ports": [{"containerPort": COORDINATOR_PORT}],
      "resources": {"limits": {resource: chips_per_host}},
      "env": env,
  }
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": name, "annotations": {
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": max_restarts},
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{
              "name": "workers", "replicas": 1,
              "template": {"spec": {
                  "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
                  "backoffLimit": 0,
                  "template": {"spec": {"nodeSelector": selector, "restartPolicy": "Never",
                                        "containers": [container]}}}},
          }],
      },
  }


def to_yaml(jobset: dict[str, Any]) -> str:
  import yaml
  return yaml.safe_dump(jobset, sort_keys=False)
