"""`mtjax jobset`: the rendered JobSet's structure and values, multi-slice, topology checks, the
distributed variables every pod ends up with, and a schema check of the fields it uses."""

import os
import re
import subprocess

import pytest
import yaml

from conftest import REPO
from mtjax import cli
from mtjax import jobset

TPU = ["--accelerator", "tpu-v5-lite-podslice", "--topology", "4x4", "--hosts", "4",
       "--chips_per_host", "4"]
TRAIN = ["--", "--config", "configs/demo.py", "--workdir", "gs://b/r", "--config.seed=3"]


def _render(capsys, *flags):
  assert cli.main(["jobset", "--name", "run1", "--image", "gcr.io/p/mtjax:1", *flags]) == 0
  out = capsys.readouterr().out
  return out, yaml.safe_load(out)


def _pod(doc):
  return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def _error_line(capsys):
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


def test_tpu_multislice_jobset_structure_and_values(capsys):
  out, doc = _render(capsys, *TPU, "--slices", "2", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/x",
                     "--env", "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=1", "--grace_period",
                     "600", "--service_account", "mtjax-ksa", *TRAIN)
  assert "launch/Dockerfile" in out and (REPO / "launch" / "Dockerfile").is_file()
  assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
  assert doc["metadata"]["name"] == "run1"
  assert doc["spec"]["network"] == {"enableDNSHostnames": True}
  (rjob,) = doc["spec"]["replicatedJobs"]
  assert rjob["name"] == "workers" and rjob["replicas"] == 2  # one Job per slice
  job = rjob["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
  pod = _pod(doc)
  assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
  assert pod["terminationGracePeriodSeconds"] == 600
  assert pod["serviceAccountName"] == "mtjax-ksa"
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
  (container,) = pod["containers"]
  assert container["image"] == "gcr.io/p/mtjax:1"
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  # The platform and the slice count reach the trainer; the user's overrides pass unchanged.
  assert container["args"] == ["--config", "configs/demo.py", "--workdir", "gs://b/r",
                               "--config.seed=3", "--config.train.platform=tpu",
                               "--config.mesh.dcn=2"]
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
  assert env["LIBTPU_INIT_ARGS"] == "--xla_tpu_a=true --xla_tpu_b=1"
  assert env["MTJAX_NUM_PROCESSES"] == "8" and env["MTJAX_HOSTS_PER_SLICE"] == "4"


def test_single_slice_defaults(capsys):
  _, doc = _render(capsys, *TPU, *TRAIN)
  assert doc["spec"]["replicatedJobs"][0]["replicas"] == 1
  pod = _pod(doc)
  assert "hostNetwork" not in pod and "dnsPolicy" not in pod and "serviceAccountName" not in pod
  assert pod["terminationGracePeriodSeconds"] == jobset.DEFAULT_GRACE_PERIOD
  # No mesh.dcn added for one slice; the platform is.
  assert pod["containers"][0]["args"] == [*TRAIN[1:], "--config.train.platform=tpu"]
  # A dcn override that agrees with --slices is kept once, not duplicated.
  _, doc = _render(capsys, *TPU, "--slices", "3", *TRAIN, "--config.mesh.dcn=3")
  assert _pod(doc)["containers"][0]["args"].count("--config.mesh.dcn=3") == 1


def test_gpu_jobset_values():
  doc = jobset.render(name="g1", image="img", accelerator="nvidia-h100-80gb", hosts=2,
                      chips_per_host=8, train_args=["--config", "c.py"])
  pod = _pod(doc)
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
  assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
  env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
  assert env["MTJAX_COORDINATOR"] == "g1-workers-0-0.g1:1234" and env["MTJAX_NUM_PROCESSES"] == "2"
  assert env["NCCL_DEBUG"] == "WARN"
  doc = jobset.render(name="g1", image="img", accelerator="nvidia-h100-80gb", hosts=2,
                      chips_per_host=8, train_args=[], env={"NCCL_DEBUG": "INFO"})
  names = [e["name"] for e in _pod(doc)["containers"][0]["env"]]
  assert names.count("NCCL_DEBUG") == 1 and {"name": "NCCL_DEBUG", "value": "INFO"} in _pod(doc)["containers"][0]["env"]
  # 2 hosts: no mesh.dcn (the trainer counts the hosts' slice_index, mesh.dcn=-1); GPUs expected.
  assert pod["containers"][0]["args"] == ["--config", "c.py", "--config.train.platform=gpu"]


def _downward(env_entry, annotations):
  """What the kubelet gives an env entry: its value, or the pod annotation its fieldRef names."""
  if "value" in env_entry:
    return env_entry["value"]
  path = env_entry["valueFrom"]["fieldRef"]["fieldPath"]
  key = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
  assert key, f"unexpected fieldPath {path}"
  return annotations[key.group(1)]


def test_every_pod_gets_its_distributed_variables(tmp_path):
  """Runs the container's command as each pod of 2 slices x 3 hosts would (the annotations JobSet
  and the Job controller put on pod <name>-workers-<slice>-<host>), with a stand-in `mtjax`."""
  slices, hosts = 2, 3
  doc = jobset.render(name="ms", image="img", accelerator="tpu-v4-podslice", topology="2x2x3",
                      hosts=hosts, chips_per_host=4, slices=slices,
                      train_args=["--workdir", "gs://b/it's a dir", "--config.seed=1"])
  (container,) = _pod(doc)["containers"]
  fake = tmp_path / "mtjax"
  fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$$" "$MTJAX_COORDINATOR" "$MTJAX_NUM_PROCESSES" '
                  '"$MTJAX_PROCESS_ID" "$@"\n')
  fake.chmod(0o755)
  seen = {}
  for s in range(slices):
    for h in range(hosts):
      annotations = {"jobset.sigs.k8s.io/job-index": str(s),  # JobSet: the Job's (slice's) index
                     "batch.kubernetes.io/job-completion-index": str(h)}  # Job: the pod's index
      env = {e["name"]: _downward(e, annotations) for e in container["env"]}
      proc = subprocess.Popen([*container["command"], *container["args"]], text=True,
                              stdout=subprocess.PIPE,
                              env={"PATH": f"{tmp_path}:{os.environ['PATH']}", **env})
      pid, coordinator, count, process_id, *args = proc.communicate()[0].splitlines()
      assert proc.returncode == 0
      assert int(pid) == proc.pid  # exec: mtjax is the container's main process, gets SIGTERM
      assert coordinator == "ms-workers-0-0.ms:1234" and count == str(slices * hosts)
      assert args == ["train", "--workdir", "gs://b/it's a dir", "--config.seed=1",
                      "--config.train.platform=tpu", "--config.mesh.dcn=2"]
      seen[f"ms-workers-{s}-{h}"] = int(process_id)
  # Slice-major numbering (as JAX numbers multi-slice TPU processes), every id once, and the
  # coordinator's pod is process 0.
  assert seen == {f"ms-workers-{s}-{h}": s * hosts + h for s in range(slices) for h in range(hosts)}
  assert seen["ms-workers-0-0"] == 0
  # Without the slice annotation the pod stops with a message naming it, before mtjax starts.
  env["MTJAX_SLICE_INDEX"] = ""
  proc = subprocess.run([*container["command"], *container["args"]], capture_output=True,
                        text=True, env={"PATH": f"{tmp_path}:{os.environ['PATH']}", **env})
  assert proc.returncode != 0 and "MTJAX_SLICE_INDEX" in proc.stderr and not proc.stdout


def test_topology_mismatch_exits_2_naming_the_host_count(capsys):
  base = ["jobset", "--name", "ok", "--image", "i", "--accelerator", "tpu-v5-lite-podslice"]
  assert cli.main([*base, "--topology", "4x4", "--hosts", "2", "--chips_per_host", "4"]) == 2
  err = _error_line(capsys)
  assert "--topology" in err and "16 chips" in err and "expected --hosts 4" in err
  assert cli.main([*base, "--topology", "2x4", "--hosts", "1", "--chips_per_host", "3"]) == 2
  assert "not a multiple of --chips_per_host 3" in _error_line(capsys)
  assert cli.main([*base, "--topology", "4by4", "--hosts", "4", "--chips_per_host", "4"]) == 2
  assert "error: --topology" in _error_line(capsys)
  assert jobset.topology_chips("2x2x4") == 16 and jobset.topology_chips("8x16") == 128


@pytest.mark.parametrize("flags,field", [
    (["--name", "Bad_Name", "--accelerator", "tpu-v4-podslice", "--topology", "2x2x2"], "--name"),
    (["--name", "x" * 60, "--accelerator", "tpu-v4-podslice", "--topology", "2x2x2"], "--name"),
    (["--accelerator", "tpu-v4-podslice"], "--topology"),
    (["--accelerator", "nvidia-l4", "--topology", "2x2x2"], "--topology"),
    (["--accelerator", "nvidia-l4", "--slices", "2"], "--slices"),
    (["--accelerator", "tpu-v4-podslice", "--topology", "2x2x2", "--slices", "0"], "--slices"),
    (["--accelerator", "tpu-v4-podslice", "--topology", "2x2x2", "--slices", "2", "--",
      "--config.mesh.dcn=4"], "--slices"),
    (["--accelerator", "nvidia-l4", "--env", "XLA_FLAGS"], "--env"),
    (["--accelerator", "nvidia-l4", "--env", "MTJAX_PROCESS_ID=3"], "--env"),
    (["--accelerator", "nvidia-l4", "--env", "A=1", "--env", "A=2"], "--env"),
    (["--accelerator", "nvidia-l4", "--grace_period", "-1"], "--grace_period"),
    (["--accelerator", "nvidia-l4", "--service_account", "Bad SA"], "--service_account"),
    (["--accelerator", "nvidia-l4", "--queue", "Bad Queue"], "--queue"),
    (["--accelerator", "nvidia-l4", "--priority_class", "x_y"], "--priority_class"),
    (["--accelerator", "nvidia-l4", "--ttl", "-5"], "--ttl"),
    (["--accelerator", "nvidia-l4", "--max_restarts", "-1"], "--max_restarts"),
])
def test_bad_jobset_input_exits_2(capsys, flags, field):
  name = [] if "--name" in flags else ["--name", "ok"]
  argv = ["jobset", *name, "--image", "i", "--hosts", "2", "--chips_per_host", "4", *flags]
  assert cli.main(argv) == 2
  assert _error_line(capsys).startswith(f"error: {field}")


def test_the_image_finds_the_driver_gke_mounts_on_gpu_nodes():
  """GKE's device plugin mounts the NVIDIA driver at /usr/local/nvidia; python:3.11-slim does not
  look there, so the Dockerfile must put it on LD_LIBRARY_PATH (else JAX falls back to CPU)."""
  text = (REPO / "launch" / "Dockerfile").read_text().replace("\\\n", " ")
  env = {}
  for line in text.splitlines():
    if line.startswith("ENV "):
      env.update(item.split("=", 1) for item in line[4:].split())
  assert env["LD_LIBRARY_PATH"].split(":")[0] == "/usr/local/nvidia/lib64"
  assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]


# ------------------------------------------------------------------ JobSet v0.10.0 and xpk

def _crd_schema():
  import gzip
  import yaml
  crd = yaml.safe_load(gzip.decompress((REPO / "tests" / "data" / "jobset_v0.10.0_crd.yaml.gz").read_bytes()))
  (version,) = crd["spec"]["versions"]
  assert version["name"] == "v1alpha2"
  return version["schema"]["openAPIV3Schema"]


def _manifests():
  tpu = jobset.render(name="t2", image="img", accelerator="tpu-v5p-slice", topology="2x2x2",
                      hosts=2, chips_per_host=4, slices=2, train_args=["--config", "c.py"],
                      queue="lq", priority_class="high", ttl=3600, service_account="ksa")
  gpu = jobset.render(name="g2", image="img", accelerator="nvidia-h100-80gb", hosts=2,
                      chips_per_host=8, train_args=["--config", "c.py"])
  return {"tpu_2_slices": tpu, "gpu_2_hosts": gpu}


def _strict(schema):
  """The CRD's schema with unknown fields refused: the API server prunes them silently (a
  misspelt field would just vanish), so the test refuses them instead."""
  if isinstance(schema, dict):
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
      out.setdefault("additionalProperties", False)
    return out
  return [_strict(v) for v in schema] if isinstance(schema, list) else schema


@pytest.mark.parametrize("kind", ["tpu_2_slices", "gpu_2_hosts"])
def test_manifests_validate_against_jobset_v0_10_crd(kind):
  import jsonschema
  validator = jsonschema.Draft7Validator(_strict(_crd_schema()))
  doc = _manifests()[kind]
  validator.validate(doc)
  # Not vacuous: a misspelt field, a rule without its required name, or an action JobSet v0.10
  # does not know (v0.12.0's RestartJob) fail.
  for path, change, message in [
      ("spec.replicatedJobs.0.template.spec.template.spec", ("hostnetwork", True), "hostnetwork"),
      ("spec.failurePolicy.rules.0", ("name", None), "'name' is a required property"),
      ("spec.failurePolicy.rules.0", ("action", "RestartJob"), "RestartJob"),
  ]:
    bad = yaml.safe_load(yaml.safe_dump(doc))
    node = _at(bad, path)
    key, value = change
    if value is None:
      del node[key]
    else:
      node[key] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
      validator.validate(bad)


# Kubernetes' Job failure messages for a FailJob rule (pkg/controller/job/pod_failure_policy.go),
# and JobSet's rule matching (pkg/controllers/failure_policy.go: the first rule whose reasons and
# message patterns, Go regexp MatchString, both match; none: RestartJobSet).
EXIT_MESSAGE = "Container {c} for pod default/{p} failed with exit code {code} matching FailJob rule at index {i}"
CONDITION_MESSAGE = "Pod default/{p} has condition {t} matching FailJob rule at index {i}"


def _pod_failure(doc, *, exit_code=None, condition=None):
  """The Job's (reason, message) when one pod fails with exit_code or gets condition, or None
  when no podFailurePolicy rule matches (the Job then fails by backoffLimit 0: reason
  BackoffLimitExceeded)."""
  rules = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
  for i, rule in enumerate(rules):
    if exit_code is not None and "onExitCodes" in rule:
      r = rule["onExitCodes"]
      hit = (exit_code in r["values"]) == (r["operator"] == "In")
      if hit and exit_code != 0:
        return "PodFailurePolicy", EXIT_MESSAGE.format(c=r["containerName"], p="p-0", code=exit_code,
                                                       i=i)
    if condition is not None and any(c["type"] == condition for c in rule.get("onPodConditions", [])):
      return "PodFailurePolicy", CONDITION_MESSAGE.format(p="p-0", t=condition, i=i)
  return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


def _jobset_action(doc, reason, message):
  for rule in doc["spec"]["failurePolicy"]["rules"]:
    reasons = rule.get("onJobFailureReasons") or [reason]
    patterns = rule.get("onJobFailureMessagePatterns") or [""]
    if reason in reasons and any(re.search(p, message) for p in patterns):
      return rule["action"]
  return "RestartJobSet"


@pytest.mark.parametrize("kind", ["tpu_2_slices", "gpu_2_hosts"])
@pytest.mark.parametrize("failure, action", [
    ({"exit_code": 2}, "FailJobSet"),                           # bad config: no restart fixes it
    ({"exit_code": 3}, "RestartJobSetAndIgnoreMaxRestarts"),    # saved on SIGTERM: resume, free
    ({"condition": "DisruptionTarget"}, "RestartJobSetAndIgnoreMaxRestarts"),  # maintenance
    ({"exit_code": 1}, "RestartJobSet"),                        # a crash: within maxRestarts
    ({"exit_code": 137}, "RestartJobSet"),                      # OOM-killed: within maxRestarts
    ({"exit_code": 23}, "RestartJobSet"),                       # "exit code 2" must not match 23
])
def test_failure_policy_tells_exit_2_3_and_disruption_apart(kind, failure, action):
  doc = _manifests()[kind]
  pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
  assert _jobset_action(doc, *_pod_failure(doc, **failure)) == action
  assert (jobset.EXIT_BAD_INPUT, jobset.EXIT_PREEMPTED) == (cli.EXIT_BAD_INPUT, cli.EXIT_PREEMPTED)


# xpk's JobSet (AI-Hypercomputer/xpk src/xpk/commands/workload.py, commit 367c838, = v1.13.1:
# WORKLOAD_CREATE_YAML for TPU, GPU_WORKLOAD_CREATE_YAML for GPU; docker_resources.get_volumes),
# field by field: (path, xpk's value, ours, why they differ). None: absent.
XPK_TABLE = {
    "tpu_2_slices": [
        ("metadata.annotations.alpha.jobset.sigs.k8s.io/exclusive-topology",
         "cloud.google.com/gke-nodepool", "cloud.google.com/gke-nodepool", "same: one slice per node pool"),
        ("metadata.labels.kueue.x-k8s.io/queue-name", "lq", "lq", "same (xpk always sets one; ours with --queue)"),
        ("spec.ttlSecondsAfterFinished", 3600, 3600, "same (xpk's default 43200; ours 0 = keep)"),
        ("spec.failurePolicy.maxRestarts", 3, 3, "xpk's default 0: one crash ends the run; ours 3"),
        ("spec.failurePolicy.rules.0.action", "FailJobSet", "FailJobSet",
         "same action; ours only for exit 2 (xpk: every exit but 42 and 127-255)"),
        ("spec.replicatedJobs.0.replicas", 2, 2, "same: one Job per slice"),
        ("spec.replicatedJobs.0.template.spec.backoffLimit", 0, 0, "same: any pod failure fails the Job"),
        ("spec.replicatedJobs.0.template.spec.template.spec.restartPolicy", "Never", "Never", "same"),
        ("spec.replicatedJobs.0.template.spec.template.spec.hostNetwork", True, True,
         "same for multi-slice (DCN); ours only with --slices > 1"),
        ("spec.replicatedJobs.0.template.spec.template.spec.dnsPolicy", "ClusterFirstWithHostNet",
         "ClusterFirstWithHostNet", "same"),
        ("spec.replicatedJobs.0.template.spec.template.spec.priorityClassName", "high", "high",
         "same (xpk's default 'medium'; ours only with --priority_class)"),
        ("spec.replicatedJobs.0.template.spec.template.spec.serviceAccountName", "ksa", "ksa", "same"),
        ("spec.replicatedJobs.0.template.spec.template.spec.volumes.0.emptyDir.medium", "Memory",
         "Memory", "same: /dev/shm in memory"),
        ("spec.replicatedJobs.0.template.spec.template.spec.terminationGracePeriodSeconds", 30, 120,
         "xpk's default 30 s; ours 120 s: time to save a checkpoint after SIGTERM"),
        ("spec.replicatedJobs.0.template.spec.completionMode", None, "Indexed",
         "xpk relies on JobSet defaulting to Indexed; ours explicit"),
        ("spec.network.enableDNSHostnames", None, True,
         "xpk relies on JobSet's default (true); ours explicit: the coordinator's DNS name"),
    ],
    "gpu_2_hosts": [
        ("metadata.annotations", None, None,
         "same: no exclusive-topology for GPUs (it would force one node pool per Job)"),
        ("spec.replicatedJobs.0.replicas", 1, 1, "same: one Job of --hosts pods"),
        ("spec.replicatedJobs.0.template.spec.parallelism", 2, 2, "same: the host count"),
        ("spec.replicatedJobs.0.template.spec.backoffLimit", 0, 0, "same"),
        ("spec.replicatedJobs.0.template.spec.template.spec.restartPolicy", "Never", "Never", "same"),
        ("spec.replicatedJobs.0.template.spec.template.spec.hostNetwork", True, None,
         "xpk: host network for GPUDirect NICs; ours pod network (no TCPX/TCPXO setup here)"),
        ("spec.replicatedJobs.0.template.spec.template.spec.volumes.0.emptyDir.medium", "Memory",
         "Memory", "same: /dev/shm in memory"),
        ("spec.failurePolicy.rules.0.action", "FailJobSet", "FailJobSet", "same action, exit 2 only"),
    ],
}


def _at(doc, path):
  node = doc
  parts = path.split(".")
  i = 0
  while i < len(parts):
    if node is None:
      return None
    if isinstance(node, list):
      node = node[int(parts[i])] if int(parts[i]) < len(node) else None
      i += 1
      continue
    # Keys may hold dots (annotation and label names): take the longest key that matches.
    for j in range(len(parts), i, -1):
      key = ".".join(parts[i:j])
      if key in node:
        node, i = node[key], j
        break
    else:
      return None
  return node


@pytest.mark.parametrize("kind", ["tpu_2_slices", "gpu_2_hosts"])
def test_manifests_against_xpks_field_by_field(kind):
  doc = _manifests()[kind]
  for path, _xpk, ours, why in XPK_TABLE[kind]:
    assert _at(doc, path) == ours, (path, why)
  container = _at(doc, "spec.replicatedJobs.0.template.spec.template.spec.containers.0")
  assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
