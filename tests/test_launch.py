"""Launchers: the shell launchers' dry runs (the JobSet renderer: tests/test_jobset.py)."""

import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO


LAUNCH = REPO / "launch"


def _dry_run(script, *args, env=None, check=True):
  """Runs a launcher with DRY_RUN=1; returns (argv of every printed command, the process)."""
  proc = subprocess.run(["bash", str(LAUNCH / script), *args],
                        env=dict(os.environ, DRY_RUN="1", **(env or {})), capture_output=True,
                        text=True, check=check)
  return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")], proc


def _remote(argv):
  """The --command that a gcloud ssh line runs on the workers."""
  return argv[argv.index("--command") + 1]


@pytest.mark.parametrize("script", ["local.sh", "slurm_gpu.sbatch", "tpu_pod.sh"])
def test_launchers_parse(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


@pytest.mark.parametrize("script,env,expect", [
    ("local.sh", {}, "train --config c.py"),
    ("slurm_gpu.sbatch", {}, "srun --kill-on-bad-exit=1"),
    ("tpu_pod.sh", {"TPU_NAME": "mt", "ZONE": "z"}, "gcloud compute tpus tpu-vm"),
])
def test_shell_launchers_dry_run(script, env, expect):
  args = ["run", "--config", "c.py"] if script == "tpu_pod.sh" else ["--config", "c.py"]
  out = subprocess.run(["bash", str(LAUNCH / script), *args],
                       env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True,
                       check=True).stdout
  assert expect in out and "c.py" in out


# --- SLURM ---------------------------------------------------------------------------------------

def _sbatch_directives():
  return [line.split(None, 1)[1] for line in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
          if line.startswith("#SBATCH")]


def test_slurm_one_task_per_gpu_each_seeing_all_gpus():
  directives = _sbatch_directives()
  assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives
  assert not any(d.startswith("--gpus-per-task") for d in directives)  # it pins one GPU per task
  assert "--signal=TERM@120" in directives and "--requeue" in directives
  (cmd,), proc = _dry_run("slurm_gpu.sbatch", "--config", "c.py", "--workdir", "/runs/a b",
                          env={"SLURM_CPUS_PER_TASK": "12", "SLURM_JOB_ID": "77",
                               "JAX_PLATFORMS": ""})
  srun = cmd[cmd.index("srun"):]
  assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=12", "--gpu-bind=none"]
  assert srun[4:] == ["mtjax", "train", "--config", "c.py", "--workdir", "/runs/a b",
                      "--config.train.platform=gpu"]
  assert "JAX_PLATFORMS=cuda" in cmd[:cmd.index("srun")] and "NCCL_DEBUG=WARN" in cmd
  assert "# on exit 3: scontrol requeue 77" in proc.stdout
  assert not any(d.startswith("--cpus-per-task") for d in directives)  # not a fixed 8 x 8 tasks
  # Without --cpus-per-task: the node's CPUs shared by its tasks (96 / 8); a platform given wins.
  (cmd,), _ = _dry_run("slurm_gpu.sbatch", "--config.train.platform=auto",
                       env={"SLURM_CPUS_ON_NODE": "96", "SLURM_NTASKS_PER_NODE": "8"})
  assert "--cpus-per-task=12" in cmd and cmd.count("--config.train.platform=auto") == 1
  assert "--config.train.platform=gpu" not in cmd
  assert not any(a.startswith("--container") for a in cmd)
  # pyxis: the task runs in the image, the shared filesystem mounted.
  (cmd,), _ = _dry_run("slurm_gpu.sbatch", "--config", "c.py",
                       env={"CONTAINER_IMAGE": "nvcr.io#org/mtjax:1", "CONTAINER_MOUNTS": "/shared:/shared"})
  srun = cmd[cmd.index("srun"):]
  assert srun[4:6] == ["--container-image=nvcr.io#org/mtjax:1", "--container-mounts=/shared:/shared"]
  assert srun[6:8] == ["mtjax", "train"]
  # 8 tasks per node but 4 GPUs: refused before anything starts.
  _, proc = _dry_run("slurm_gpu.sbatch", env={"SLURM_NTASKS_PER_NODE": "8",
                                              "SLURM_GPUS_ON_NODE": "4"}, check=False)
  assert proc.returncode == 2 and "--ntasks-per-node=8 must equal" in proc.stderr


def test_slurm_binding_is_what_jax_cluster_detection_expects(monkeypatch):
  """JAX's own SLURM detection, fed the variables srun sets for task i of this binding."""
  from jax._src import clusters
  from jax._src.clusters import cluster
  monkeypatch.setattr(cluster, "running_in_cloud_tpu_vm", False)  # a GPU node, wherever this runs
  for local_id in range(8):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[003-004]")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", str(8 + local_id))
    monkeypatch.setenv("SLURM_LOCALID", str(local_id))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # --gpu-bind=none: all GPUs
    coordinator, n, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, "slurm", None)
    assert (coordinator.split(":")[0], n, pid) == ("gpu003", 16, 8 + local_id)
    # JAX drives CUDA ordinal SLURM_LOCALID: it exists only if the task sees all 8 GPUs.
    assert local_ids == [local_id]
    assert local_id < len(os.environ["CUDA_VISIBLE_DEVICES"].split(","))


def test_slurm_xla_flag_preset_overridable_and_known_to_xla():
  (cmd,), _ = _dry_run("slurm_gpu.sbatch", env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"})
  assert cmd[0] == "env" and cmd[1].startswith("XLA_FLAGS=")
  flags = cmd[1].removeprefix("XLA_FLAGS=").split()
  for flag in ["--xla_gpu_enable_latency_hiding_scheduler=true",
               "--xla_gpu_enable_pipelined_all_gather=true",
               "--xla_gpu_enable_pipelined_reduce_scatter=true",
               "--xla_gpu_enable_while_loop_double_buffering=true",
               "--xla_gpu_enable_triton_gemm=false"]:
    assert flag in flags
  assert flags[-1] == "--xla_dump_to=/tmp/d"  # the user's XLA_FLAGS come last and win
  (cmd,), _ = _dry_run("slurm_gpu.sbatch", env={"GPU_XLA_FLAGS": "--xla_gpu_autotune_level=0",
                                                "XLA_FLAGS": ""})
  assert cmd[1] == "XLA_FLAGS=--xla_gpu_autotune_level=0"
  # XLA aborts on an unknown flag in XLA_FLAGS (every rank would die at start): the pinned
  # jaxlib parses all of its flags, GPU ones included, even on CPU.
  (cmd,), _ = _dry_run("slurm_gpu.sbatch", env={"XLA_FLAGS": ""})
  proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                        text=True, env=dict(os.environ, XLA_FLAGS=cmd[1].removeprefix("XLA_FLAGS="),
                                            JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]


# --- TPU VMs -------------------------------------------------------------------------------------

TPU = {"TPU_NAME": "mt", "ZONE": "us-z1"}


@pytest.mark.parametrize("accelerator,image", [
    ("v2-8", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"),
    ("v4-16", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_tpu_runtime_image_follows_the_accelerator(accelerator, image):
  (cmd,), _ = _dry_run("tpu_pod.sh", "create", env=dict(TPU, ACCELERATOR=accelerator))
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mt"]
  assert cmd[cmd.index("--accelerator-type") + 1] == accelerator
  assert cmd[cmd.index("--version") + 1] == image


@pytest.mark.parametrize("accelerator", ["v9x-8", "v5e-8", "v4", "v4-0", "v5litepod-8x"])
def test_tpu_accelerator_names_are_checked_before_gcloud(accelerator):
  """Cloud TPU's accelerator types: v2-N, v3-N, v4-N, v5litepod-N, v5p-N, v6e-N ("v5e-N" is
  not one). A bad name exits 2 before any gcloud command, whatever the action or VERSION."""
  for action in ("create", "install", "run"):
    _, proc = _dry_run("tpu_pod.sh", action, "--config", "c.py",
                       env=dict(TPU, ACCELERATOR=accelerator, VERSION="img"), check=False)
    assert proc.returncode == 2 and f"error: ACCELERATOR={accelerator}" in proc.stderr
    assert not proc.stdout
  if accelerator == "v5e-8":
    assert "v5litepod-8" in proc.stderr


def test_tpu_version_override():
  (cmd,), _ = _dry_run("tpu_pod.sh", "create", env=dict(TPU, ACCELERATOR="v4-8", VERSION="img"))
  assert cmd[cmd.index("--version") + 1] == "img"


@pytest.mark.parametrize("queued", ["0", "1"])
def test_tpu_create_wait_polls_until_active(queued):
  _, proc = _dry_run("tpu_pod.sh", "create", "--wait", env=dict(TPU, QUEUED=queued))
  lines = proc.stdout.splitlines()
  assert "create" in lines[0] and lines[1].startswith("# every 30s until ACTIVE or READY: ")
  describe = shlex.split(lines[1].split(": ", 1)[1])
  kind = "queued-resources" if queued == "1" else "tpu-vm"
  assert describe[:6] == ["gcloud", "compute", "tpus", kind, "describe", "mt"]
  assert describe[-1] == ("--format=value(state.state)" if queued == "1" else "--format=value(state)")
  _, proc = _dry_run("tpu_pod.sh", "wait", env=dict(TPU, QUEUED=queued))
  assert proc.stdout.startswith("# every 30s")


def test_tpu_wait_stops_on_failed_and_returns_on_active(tmp_path):
  """`wait` against a stand-in gcloud whose describe walks through the states."""
  states = tmp_path / "states"
  gcloud = tmp_path / "gcloud"
  gcloud.write_text("#!/usr/bin/env bash\nhead -n1 \"$STATES\"; sed -i 1d \"$STATES\"\n")
  gcloud.chmod(0o755)
  env = dict(os.environ, **TPU, QUEUED="1", WAIT_POLL="0", STATES=str(states),
             PATH=f"{tmp_path}:{os.environ['PATH']}")
  for sequence, rc in ((["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0),
                       (["WAITING_FOR_RESOURCES", "FAILED"], 1)):
    states.write_text("\n".join(sequence) + "\n")
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "wait"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    assert (f"mt: {sequence[-1]}" in proc.stdout) if rc == 0 else (f"error: mt: {sequence[-1]}" in proc.stderr)


@pytest.mark.parametrize("queued,slices", [("0", "1"), ("1", "2")])
def test_tpu_install_ships_the_working_tree_and_installs_tpu_and_gcs(queued, slices, tmp_path):
  """v5litepod-16 and a 2-slice v5p: the tree goes by scp (no git clone, no repository URL), is
  unpacked on a stand-in worker, and `.[tpu,gcs]` installs in a Python 3.11 venv made by uv."""
  env = dict(TPU, ACCELERATOR="v5litepod-16" if slices == "1" else "v5p-32", QUEUED=queued,
             SLICES=slices, IAP="1")
  (scp, ssh), _ = _dry_run("tpu_pod.sh", "install", env=env)
  kind = "queued-resources" if queued == "1" else "tpu-vm"
  assert scp[:5] == ["gcloud", "compute", "tpus", kind, "scp"] and scp[6] == "mt:"
  assert ssh[:5] == ["gcloud", "compute", "tpus", kind, "ssh"]
  for argv in (scp, ssh):
    assert "--worker=all" in argv and "--tunnel-through-iap" in argv
    assert ("--node=all" in argv) == (queued == "1")
  tarball = pathlib.Path(scp[5])
  try:
    remote = _remote(ssh)
    assert "git clone" not in remote and "git pull" not in remote
    assert "uv venv --python 3.11 .venv" in remote and "https://astral.sh/uv/install.sh" in remote
    assert "uv pip install --python .venv/bin/python -e '.[tpu,gcs]'" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)
    # The tarball holds the working tree as it is (tracked and untracked-not-ignored files).
    import tarfile
    with tarfile.open(tarball) as tar:
      names = set(tar.getnames())
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    assert {n for n in tracked if (REPO / n).exists()} <= names
    assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)
    # On a stand-in worker (uv and the install replaced by echo): unpacked into ~/mtjax, an old
    # file gone, the venv kept.
    home = tmp_path / "home"
    (home / "mtjax" / ".venv").mkdir(parents=True)
    (home / "mtjax" / "stale.py").write_text("")
    (home / "mtjax" / ".venv" / "kept").write_text("")
    shutil.copy(tarball, home / "mtjax-src.tar.gz")
    stub = remote.split("; mkdir -p mtjax;", 1)[1].split("; cd mtjax;", 1)[0]
    subprocess.run(["bash", "-c", "set -e; mkdir -p mtjax;" + stub], cwd=home, check=True)
    assert (home / "mtjax" / "pyproject.toml").exists() and not (home / "mtjax" / "stale.py").exists()
    assert (home / "mtjax" / ".venv" / "kept").exists() and not (home / "mtjax-src.tar.gz").exists()
  finally:
    shutil.rmtree(tarball.parent, ignore_errors=True)


def test_tpu_internal_ip_and_iap_are_exclusive():
  (cmd,), _ = _dry_run("tpu_pod.sh", "logs", env=dict(TPU, INTERNAL_IP="1"))
  assert "--internal-ip" in cmd
  _, proc = _dry_run("tpu_pod.sh", "logs", env=dict(TPU, INTERNAL_IP="1", IAP="1"), check=False)
  assert proc.returncode == 2 and not proc.stdout


def test_tpu_run_logs_stop_commands():
  (run,), _ = _dry_run("tpu_pod.sh", "run", "--config", "c.py", "--workdir", "gs://b/r", env=TPU)
  remote = _remote(run)
  assert "pkill -TERM -f 'mtjax/[.]venv/bin/mtjax train'" in remote  # a previous run, stopped
  assert "rm -f /tmp/libtpu_lockfile" in remote                     # and its stale lock removed
  assert ("trainer=$HOME/mtjax/.venv/bin/mtjax; "
          "setsid nohup $trainer train --config c.py --workdir gs://b/r "
          "--config.train.platform=tpu > ~/mtjax-logs/train-$(hostname).log 2>&1 < /dev/null &") in remote
  (logs,), _ = _dry_run("tpu_pod.sh", "logs", env=dict(TPU, LINES="7"))
  assert "tail -n 7 ~/mtjax-logs/train-$(hostname).log" in _remote(logs)
  (stop,), _ = _dry_run("tpu_pod.sh", "stop", env=TPU)
  assert "pkill -TERM -f" in _remote(stop) and "libtpu_lockfile" in _remote(stop)
  for argv in (run, logs, stop):
    assert "--worker=all" in argv
    subprocess.run(["bash", "-n", "-c", _remote(argv)], check=True)
  _, proc = _dry_run("tpu_pod.sh", "bogus", env=TPU, check=False)
  assert proc.returncode == 2 and "logs|stop" in proc.stderr


def test_tpu_multislice_uses_queued_resources():
  env = dict(TPU, SLICES="2", ACCELERATOR="v5p-16", PROJECT="proj")
  (create,), _ = _dry_run("tpu_pod.sh", "create", env=env)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "mt"]
  assert create[create.index("--node-count") + 1] == "2"
  assert create[create.index("--node-prefix") + 1] == "mt"
  assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
  assert create[create.index("--project") + 1] == "proj"
  (run,), _ = _dry_run("tpu_pod.sh", "run", "--config", "c.py", env=env)
  assert run[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
  assert "--node=all" in run and "--worker=all" in run
  assert "train --config c.py --config.mesh.dcn=2 --config.train.platform=tpu >" in _remote(run)
  (run,), _ = _dry_run("tpu_pod.sh", "run", "--config.mesh.dcn=2", env=env)
  assert _remote(run).count("--config.mesh.dcn") == 1
  (delete,), _ = _dry_run("tpu_pod.sh", "delete", env=env)
  assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  assert "--force" in delete
  (single,), _ = _dry_run("tpu_pod.sh", "create", env=dict(TPU, QUEUED="1"))
  assert "queued-resources" in single and single[single.index("--node-id") + 1] == "mt"
  _, proc = _dry_run("tpu_pod.sh", "create", env=dict(env, QUEUED="0"), check=False)
  assert proc.returncode == 2 and "queued resource" in proc.stderr


def test_tpu_remote_commands_on_a_fake_worker(tmp_path):
  """run / logs / stop executed by a local shell, as a worker's would, with a stand-in trainer."""
  home = tmp_path / "home"
  remote_dir = f"mtjax-launch-test-{uuid.uuid4().hex[:8]}"  # pkill matches only these processes
  fake = home / remote_dir / ".venv" / "bin" / "mtjax"
  fake.parent.mkdir(parents=True)
  fake.write_text("#!/usr/bin/env bash\necho \"$$\" >> \"$HOME/pids\"; echo \"args: $*\"\n"
                  "trap 'echo \"SIGTERM: saved\"; exit 3' TERM\n"
                  "while true; do sleep 0.1; done\n")
  fake.chmod(0o755)
  lock = tmp_path / "libtpu_lockfile"
  env = dict(TPU, REMOTE_DIR=remote_dir, LIBTPU_LOCKFILE=str(lock), STOP_TIMEOUT="20")
  worker_env = dict(os.environ, HOME=str(home))
  log = home / "mtjax-logs" / f"train-{socket.gethostname()}.log"

  def on_worker(action, *args):
    (argv,), _ = _dry_run("tpu_pod.sh", action, *args, env=env)
    return subprocess.run(["bash", "-c", _remote(argv)], cwd=home, env=worker_env,
                          capture_output=True, text=True, timeout=60, check=True).stdout

  def alive(pid):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

  def wait_for(predicate):
    deadline = time.monotonic() + 20
    while not predicate():
      assert time.monotonic() < deadline
      time.sleep(0.05)

  pids = lambda: [int(p) for p in (home / "pids").read_text().split()] if (home / "pids").exists() else []  # noqa: E731
  try:
    lock.write_text("")
    assert "mtjax started" in on_worker("run", "--config", "c.py", "--workdir", "/r/a b")
    wait_for(lambda: len(pids()) == 1 and "args:" in log.read_text())
    assert not lock.exists()                      # the stale lock went before the start
    assert "args: train --config c.py --workdir /r/a b" in log.read_text()
    assert alive(pids()[0])                       # it outlives the ssh shell
    assert "args:" in on_worker("logs")
    lock.write_text("")
    on_worker("run", "--config", "c.py")           # a second run replaces the first
    wait_for(lambda: len(pids()) == 2)
    first, second = pids()
    assert not alive(first) and alive(second) and not lock.exists()
    assert "stopped" in on_worker("stop")
    wait_for(lambda: not alive(second))
    assert "SIGTERM: saved" in log.read_text()    # stopped with SIGTERM: mtjax saves, exits 3
  finally:
    for pid in pids():
      if alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("accelerator, slices", [("v5litepod-16", "1"), ("v5p-32", "2")])
def test_tpu_pod_lifecycle_dry_run(accelerator, slices):
  """create --wait, install, run, stop on one v5e slice and on 2 v5p slices: the right gcloud
  family, the tree shipped by scp (never a git clone), .[tpu,gcs], the platform and slice count
  passed to the trainer, the TPU freed on stop."""
  env = dict(TPU, ACCELERATOR=accelerator, SLICES=slices)
  kind = "queued-resources" if slices != "1" else "tpu-vm"
  _, proc = _dry_run("tpu_pod.sh", "create", "--wait", env=env)
  create = shlex.split(proc.stdout.splitlines()[0])
  assert create[:5] == ["gcloud", "compute", "tpus", kind, "create"]
  assert create[create.index("--accelerator-type") + 1] == accelerator
  assert "describe" in proc.stdout.splitlines()[1]
  (scp, ssh), proc = _dry_run("tpu_pod.sh", "install", env=env)
  try:
    assert scp[4] == "scp" and "git clone" not in proc.stdout and ".[tpu,gcs]" in _remote(ssh)
  finally:
    shutil.rmtree(pathlib.Path(scp[5]).parent, ignore_errors=True)
  (run,), _ = _dry_run("tpu_pod.sh", "run", "--config", "c.py", "--workdir", "gs://b/r", env=env)
  remote = _remote(run)
  assert "--config.train.platform=tpu" in remote
  assert ("--config.mesh.dcn=2" in remote) == (slices == "2")
  (stop,), _ = _dry_run("tpu_pod.sh", "stop", env=env)
  assert "/dev/vfio/[0-9]*" in _remote(stop) and "/dev/accel*" in _remote(stop)
  for argv in (scp, ssh, run, stop):
    assert argv[3] == kind and "--worker=all" in argv
