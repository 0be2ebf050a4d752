"""Launchers: the JobSet renderer's structure and values; shell launchers' dry runs."""

import os
import subprocess

import pytest
import yaml

from conftest import REPO
from mtjax import cli
from mtjax import jobset


def test_tpu_jobset_structure_and_values(capsys):
  assert cli.main(["jobset", "--name", "run1", "--image", "gcr.io/p/mtjax:1", "--accelerator",
                   "tpu-v5-lite-podslice", "--topology", "4x4", "--hosts", "4", "--chips_per_host",
                   "4", "--", "--config", "configs/demo.py", "--workdir", "gs://b/r",
                   "--config.seed=3"]) == 0
  doc = yaml.safe_load(capsys.readouterr().out)
  assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
  assert doc["metadata"]["name"] == "run1"
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
  (container,) = pod["containers"]
  assert container["image"] == "gcr.io/p/mtjax:1"
  assert container["command"] == ["mtjax", "train", "--config", "configs/demo.py", "--workdir",
                                  "gs://b/r", "--config.seed=3"]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["env"] == []  # TPU VMs: JAX finds the cluster itself


def test_gpu_jobset_sets_the_distributed_variables():
  doc = jobset.render(name="g1", image="img", accelerator="nvidia-h100-80gb", hosts=2,
                      chips_per_host=8, train_args=["--config", "c.py", "--workdir", "gs://b"])
  container = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
  env = {e["name"]: e for e in container["env"]}
  assert env["MTJAX_COORDINATOR"]["value"] == "g1-workers-0-0.g1:1234"
  assert env["MTJAX_NUM_PROCESSES"]["value"] == "2"
  assert "job-completion-index" in env["MTJAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}


def test_bad_jobset_input_exits_2(capsys):
  assert cli.main(["jobset", "--name", "Bad_Name", "--image", "i", "--accelerator", "tpu-v4-podslice",
                   "--topology", "2x2x2", "--hosts", "2", "--chips_per_host", "4"]) == 2
  assert "error: --name" in capsys.readouterr().err
  assert cli.main(["jobset", "--name", "ok", "--image", "i", "--accelerator", "tpu-v4-podslice",
                   "--hosts", "2", "--chips_per_host", "4"]) == 2
  assert "error: --topology" in capsys.readouterr().err


@pytest.mark.parametrize("script,env,expect", [
    ("local.sh", {}, "train --config c.py"),
    ("slurm_gpu.sbatch", {}, "srun --kill-on-bad-exit=1"),
    ("tpu_pod.sh", {"TPU_NAME": "mt", "ZONE": "z"}, "gcloud compute tpus tpu-vm"),
])
def test_shell_launchers_dry_run(script, env, expect):
  args = ["run", "--config", "c.py"] if script == "tpu_pod.sh" else ["--config", "c.py"]
  out = subprocess.run(["bash", str(REPO / "launch" / script), *args],
                       env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True,
                       check=True).stdout
  assert expect in out and "c.py" in out
