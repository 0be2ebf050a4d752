"""Renders a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2) that runs `mtjax train` on GKE TPU or
GPU node pools: one pod per host, one indexed Job per TPU slice (`--slices N`: N replicas of the
replicated job `workers`, on the host network for the DCN traffic between slices).

  docker build -f launch/Dockerfile --build-arg ACCELERATOR=tpu -t IMAGE . && docker push IMAGE
  mtjax jobset --name run1 --image IMAGE --accelerator tpu-v5-lite-podslice --topology 4x4 \\
      --hosts 4 --chips_per_host 4 --slices 2 --service_account mtjax-ksa \\
      -- --config configs/demo.py --workdir gs://bucket/runs/run1 > jobset.yaml
  kubectl apply -f jobset.yaml

JobSet does not set JOBSET_NAME (that is XPK's own downward-API variable). It labels and annotates
every pod with jobset.sigs.k8s.io/{jobset-name, replicatedjob-name, job-index, ...}, Kubernetes
annotates it with batch.kubernetes.io/job-completion-index, and with `network.enableDNSHostnames`
pod `<name>-workers-<slice>-<host>` resolves as `<name>-workers-<slice>-<host>.<name>`. So every pod
gets mtjax's distributed variables explicitly: MTJAX_COORDINATOR (the first pod's DNS name),
MTJAX_NUM_PROCESSES (slices x hosts), MTJAX_SLICE_INDEX and MTJAX_HOST_INDEX (from those
annotations, through the downward API) and MTJAX_HOSTS_PER_SLICE; the container's shell computes
MTJAX_PROCESS_ID = slice index x hosts per slice + host index and `exec`s `mtjax train`, so the
trainer is the container's main process and gets the SIGTERM that makes it save before the grace
period ends. On multi-slice TPU, GKE's TPU webhook still sets TPU_WORKER_* and MEGASCALE_* for
libtpu; the slice count reaches the mesh as `--config.mesh.dcn=N`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from mtjax.errors import BadInputError

COORDINATOR_PORT = 1234
REPLICATED_JOB = "workers"
DEFAULT_GRACE_PERIOD = 120  # seconds between SIGTERM and SIGKILL: enough for a checkpoint save
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOPOLOGY = re.compile(r"[1-9][0-9]*(x[1-9][0-9]*){1,2}")
_DCN = "--config.mesh.dcn="
_PLATFORM = "--config.train.platform="
# The pod's index within its Job and its Job's index within the replicated job (= its slice).
_HOST_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_SLICE_INDEX = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
# `sh -c SCRIPT mtjax-train ARGS...`: ARGS reach mtjax as "$@", never re-split or re-quoted; exec
# makes mtjax the container's main process (it gets the SIGTERM).
# An empty index (an annotation missing) stops the pod with a message instead of a clashing id.
_ENTRYPOINT = (': "${MTJAX_SLICE_INDEX:?}" "${MTJAX_HOST_INDEX:?}"; '
               'export MTJAX_PROCESS_ID=$((MTJAX_SLICE_INDEX * MTJAX_HOSTS_PER_SLICE'
               ' + MTJAX_HOST_INDEX)); exec mtjax train "$@"')


def topology_chips(topology: str) -> int:
  """Chips in a TPU topology: 4x4 -> 16, 2x2x4 -> 16."""
  if not _TOPOLOGY.fullmatch(topology):
    raise BadInputError("--topology", f"expected a TPU topology like 4x4 or 2x2x4, got {topology!r}")
  return math.prod(int(d) for d in topology.split("x"))


def parse_env(items: Sequence[str]) -> dict[str, str]:
  """`--env K=V` flags -> {K: V}; names mtjax sets itself and repeated names are bad input."""
  env: dict[str, str] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not _ENV_NAME.fullmatch(key):
      raise BadInputError("--env", f"expected NAME=VALUE with NAME like XLA_FLAGS, got {item!r}")
    if key.startswith("MTJAX_"):
      raise BadInputError("--env", f"{key} is set by mtjax jobset itself (distributed start-up)")
    if key in env:
      raise BadInputError("--env", f"{key} is given twice")
    env[key] = value
  return env


def _check(*, name: str, accelerator: str, hosts: int, chips_per_host: int, topology: str,
           slices: int, grace_period: int, service_account: str) -> None:
  if hosts <= 0 or chips_per_host <= 0:
    raise BadInputError("--hosts", "expected positive --hosts and --chips_per_host")
  if slices <= 0:
    raise BadInputError("--slices", f"expected the number of slices (>= 1), got {slices}")
  if not _DNS_LABEL.fullmatch(name):
    raise BadInputError("--name", f"expected a lowercase DNS label (a-z, 0-9, -), got {name!r}")
  last_pod = f"{name}-{REPLICATED_JOB}-{slices - 1}-{hosts - 1}"
  if len(last_pod) > 63:  # pod hostnames are DNS labels
    raise BadInputError("--name", f"too long: pod hostname {last_pod!r} exceeds 63 characters")
  if grace_period < 0:
    raise BadInputError("--grace_period", f"expected seconds >= 0, got {grace_period}")
  if service_account and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", service_account):
    raise BadInputError("--service_account",
                        f"expected a Kubernetes service account name, got {service_account!r}")
  if not accelerator.startswith("tpu"):
    if topology:
      raise BadInputError("--topology", f"only TPU node pools have a topology, not {accelerator}")
    if slices > 1:
      raise BadInputError("--slices", "multi-slice is for TPU node pools; on GPUs raise --hosts")
    return
  if not topology:
    raise BadInputError("--topology", "TPU node pools need a topology, e.g. 4x4")
  chips = topology_chips(topology)
  if hosts * chips_per_host != chips:
    expected = (f"expected --hosts {chips // chips_per_host}" if chips % chips_per_host == 0
                else f"{chips} is not a multiple of --chips_per_host {chips_per_host}")
    raise BadInputError("--topology", f"{topology} has {chips} chips per slice but --hosts {hosts} "
                        f"x --chips_per_host {chips_per_host} = {hosts * chips_per_host}: {expected}")


def _train_args(train_args: Sequence[str], slices: int, platform: str) -> list[str]:
  """The trainer's arguments, with --config.train.platform=PLATFORM (a pod whose accelerator JAX
  cannot open stops at start with the cause, not trains on CPU) and --config.mesh.dcn=SLICES,
  unless they already say them."""
  args = list(train_args)
  if not any(a.startswith(_PLATFORM) for a in args):
    args.append(f"{_PLATFORM}{platform}")
  if slices == 1:
    return args
  given = [a[len(_DCN):] for a in args if a.startswith(_DCN)]
  if any(value != str(slices) for value in given):
    raise BadInputError("--slices", f"{slices} slices but the train arguments set "
                        f"{_DCN}{given[-1]}; drop it (mtjax jobset sets it)")
  return args if given else [*args, f"{_DCN}{slices}"]


# Failure handling, as JobSet's host-maintenance example does it (needs JobSet >= v0.10.0 for
# onJobFailureMessagePatterns; its Helm chart's CRD has the field from v0.10.1). Each Job's
# podFailurePolicy fails the Job at once on a bad config (exit 2), a saved preemption (exit 3) or
# a disruption (the pod evicted for host maintenance, preempted for capacity): never Ignore,
# since a replacement pod would leave the other JAX processes waiting on a dead peer. All three
# give the Job reason PodFailurePolicy, so the JobSet's rules tell them apart by the Job's failure
# message, which Kubernetes writes as "Container <c> for pod <ns>/<p> failed with exit code <n>
# matching FailJob rule at index <i>" / "Pod <ns>/<p> has condition <type> matching FailJob rule
# at index <i>" (pkg/controller/job/pod_failure_policy.go): exit 2 fails the whole JobSet (a
# restart cannot fix a config); exit 3 and disruptions restart it without using up maxRestarts
# (the run resumes from its checkpoint); any other failure (a crash) restarts it within
# maxRestarts (JobSet's default action, RestartJobSet).
CONTAINER = "mtjax"
EXIT_BAD_INPUT, EXIT_PREEMPTED = 2, 3  # mtjax's exit codes (mtjax.cli)
POD_FAILURE_RULES = [
    {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                          "values": [EXIT_BAD_INPUT]}},
    {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                          "values": [EXIT_PREEMPTED]}},
    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
]
JOBSET_FAILURE_RULES = [
    {"name": "bad-config", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
     "onJobFailureMessagePatterns": [
         f"failed with exit code {EXIT_BAD_INPUT} matching FailJob rule at index 0"]},
    {"name": "saved-or-disrupted", "action": "RestartJobSetAndIgnoreMaxRestarts",
     "onJobFailureReasons": ["PodFailurePolicy"],
     "onJobFailureMessagePatterns": [
         f"failed with exit code {EXIT_PREEMPTED} matching FailJob rule at index 1",
         "has condition DisruptionTarget matching FailJob rule at index 2"]},
]


def render(*, name: str, image: str, accelerator: str, hosts: int, chips_per_host: int,
           train_args: Sequence[str], topology: str = "", slices: int = 1,
           env: dict[str, str] | None = None, grace_period: int = DEFAULT_GRACE_PERIOD,
           service_account: str = "", max_restarts: int = 3, queue: str = "",
           priority_class: str = "", ttl: int = 0) -> dict[str, Any]:
  """queue: a Kueue LocalQueue (the kueue.x-k8s.io/queue-name label); priority_class: the pods'
  priorityClassName; ttl: seconds a finished JobSet is kept (0: until deleted)."""
  _check(name=name, accelerator=accelerator, hosts=hosts, chips_per_host=chips_per_host,
         topology=topology, slices=slices, grace_period=grace_period,
         service_account=service_account)
  for flag, value in (("--queue", queue), ("--priority_class", priority_class)):
    if value and not _DNS_SUBDOMAIN.fullmatch(value):
      raise BadInputError(flag, f"expected a Kubernetes object name, got {value!r}")
  if ttl < 0:
    raise BadInputError("--ttl", f"expected seconds >= 0, got {ttl}")
  if max_restarts < 0:
    raise BadInputError("--max_restarts", f"expected a count >= 0, got {max_restarts}")
  tpu = accelerator.startswith("tpu")
  selector = ({"cloud.google.com/gke-tpu-accelerator": accelerator,
               "cloud.google.com/gke-tpu-topology": topology} if tpu
              else {"cloud.google.com/gke-accelerator": accelerator})
  resource = "google.com/tpu" if tpu else "nvidia.com/gpu"
  field = lambda path: {"fieldRef": {"fieldPath": path}}
  container_env = [
      {"name": "MTJAX_COORDINATOR",  # pod 0 of slice 0, through the JobSet's headless service
       "value": f"{name}-{REPLICATED_JOB}-0-0.{name}:{COORDINATOR_PORT}"},
      {"name": "MTJAX_NUM_PROCESSES", "value": str(slices * hosts)},
      {"name": "MTJAX_HOSTS_PER_SLICE", "value": str(hosts)},
      {"name": "MTJAX_SLICE_INDEX", "valueFrom": field(_SLICE_INDEX)},
      {"name": "MTJAX_HOST_INDEX", "valueFrom": field(_HOST_INDEX)},
      *({"name": k, "value": v} for k, v in (env or {}).items()),
  ]
  if not tpu and "NCCL_DEBUG" not in (env or {}):  # NCCL's warnings in the pod log (--env to change)
    container_env.append({"name": "NCCL_DEBUG", "value": "WARN"})
  container = {
      "name": CONTAINER, "image": image,
      "command": ["/bin/sh", "-c", _ENTRYPOINT, "mtjax-train"],
      "args": _train_args(train_args, slices, "tpu" if tpu else "gpu"),
      "ports": [{"containerPort": COORDINATOR_PORT}],
      "resources": {"limits": {resource: chips_per_host}},
      "env": container_env,
      # Shared memory for the data loader's worker processes (a container's default is 64 MiB).
      "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
  }
  pod: dict[str, Any] = {"nodeSelector": selector, "restartPolicy": "Never",
                         "terminationGracePeriodSeconds": grace_period}
  if priority_class:
    pod["priorityClassName"] = priority_class
  if slices > 1:  # DCN traffic between slices goes over the host network; keep cluster DNS
    pod.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
  if service_account:  # Workload Identity: the KSA bound to a GCP service account reaches gs://
    pod["serviceAccountName"] = service_account
  pod["containers"] = [container]
  pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  metadata: dict[str, Any] = {"name": name}
  if tpu:  # one Job (slice) per TPU node pool; GPU pods may share pools with other JobSets
    metadata["annotations"] = {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  if queue:
    metadata["labels"] = {"kueue.x-k8s.io/queue-name": queue}
  spec: dict[str, Any] = {
      "failurePolicy": {"maxRestarts": max_restarts, "rules": JOBSET_FAILURE_RULES},
      "network": {"enableDNSHostnames": True},
      "replicatedJobs": [{
          "name": REPLICATED_JOB, "replicas": slices,
          "template": {"spec": {
              "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
              "backoffLimit": 0,
              "podFailurePolicy": {"rules": POD_FAILURE_RULES},
              "template": {"spec": pod}}},
      }],
  }
  if ttl:
    spec["ttlSecondsAfterFinished"] = ttl
  return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
          "spec": spec}


def to_yaml(jobset: dict[str, Any]) -> str:
  import yaml
  header = ("# Rendered by `mtjax jobset`; apply with `kubectl apply -f FILE` (needs the JobSet\n"
            "# controller). The image is built from launch/Dockerfile:\n"
            "#   docker build -f launch/Dockerfile --build-arg ACCELERATOR=tpu|cuda -t IMAGE .\n")
  return header + yaml.safe_dump(jobset, sort_keys=False)
