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
])
def test_bad_jobset_input_exits_2(capsys, flags, field):
  name = [] if "--name" in flags else ["--name", "ok"]
  argv = ["jobset", *name, "--image", "i", "--hosts", "2", "--chips_per_host", "4", *flags]
  assert cli.main(argv) == 2
  assert _error_line(capsys).startswith(f"error: {field}")


def _obj(required=(), **props):
  """A JSON schema object that, like the JobSet CRD's structural schema, knows only its fields."""
  return {"type": "object", "required": list(required), "properties": props,
          "additionalProperties": False}


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The fields mtjax renders, with names and types from the jobset.x-k8s.io_jobsets CRD (v1alpha2)
# and the core/v1 PodSpec and batch/v1 JobSpec it embeds.
_ENV = _obj(["name"], name=_STR, value=_STR, valueFrom=_obj(
    fieldRef=_obj(["fieldPath"], fieldPath=_STR)))
_CONTAINER = _obj(["name"], name=_STR, image=_STR,
                  command={"type": "array", "items": _STR}, args={"type": "array", "items": _STR},
                  ports={"type": "array", "items": _obj(["containerPort"], containerPort=_INT)},
                  resources=_obj(limits={"type": "object", "additionalProperties": {
                      "anyOf": [_INT, _STR]}}),
                  env={"type": "array", "items": _ENV})
_POD = _obj(["containers"], nodeSelector=_MAP, restartPolicy={"enum": ["Never", "OnFailure"]},
            terminationGracePeriodSeconds={"type": "integer", "minimum": 0}, hostNetwork=_BOOL,
            dnsPolicy={"enum": ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"]},
            serviceAccountName=_STR, containers={"type": "array", "items": _CONTAINER,
                                                 "minItems": 1})
_JOB = _obj(["template"], parallelism=_INT, completions=_INT, backoffLimit=_INT,
            completionMode={"enum": ["Indexed", "NonIndexed"]},
            template=_obj(["spec"], metadata=_obj(labels=_MAP, annotations=_MAP), spec=_POD))
JOBSET_SCHEMA = _obj(
    ["apiVersion", "kind", "metadata", "spec"], apiVersion={"const": "jobset.x-k8s.io/v1alpha2"},
    kind={"const": "JobSet"}, metadata=_obj(["name"], name=_STR, labels=_MAP, annotations=_MAP),
    spec=_obj(["replicatedJobs"], failurePolicy=_obj(maxRestarts=_INT),
              network=_obj(enableDNSHostnames=_BOOL, subdomain=_STR,
                           publishNotReadyAddresses=_BOOL),
              replicatedJobs={"type": "array", "minItems": 1, "items": _obj(
                  ["name", "template"], name=_STR, replicas={"type": "integer", "minimum": 1},
                  template=_obj(["spec"], spec=_JOB))}))


def test_rendered_yaml_validates_against_the_jobset_schema(capsys):
  jsonschema = pytest.importorskip("jsonschema")
  docs = [_render(capsys, *TPU, "--slices", "2", "--env", "A=1", "--service_account", "sa",
                  *TRAIN)[1],
          _render(capsys, "--accelerator", "nvidia-h100-80gb", "--hosts", "2",
                  "--chips_per_host", "8", *TRAIN)[1]]
  for doc in docs:
    jsonschema.validate(doc, JOBSET_SCHEMA)
  _pod(docs[0])["hostnetwork"] = True  # a misspelt field, which the API server would drop
  with pytest.raises(jsonschema.ValidationError, match="hostnetwork"):
    jsonschema.validate(docs[0], JOBSET_SCHEMA)


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
