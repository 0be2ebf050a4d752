"""A gs:// workdir end to end on a local GCS emulator: train, resume, eval, as a user runs them.

The emulator (PyPI `gcp-storage-emulator`, in the dev extra; tests/gcs_emulator.py adds the
generation headers tensorstore needs) serves the GCS JSON and XML APIs on loopback; gcsfs (etils.epath), tensorstore (Orbax) and google-cloud-storage (tensorboardX) reach it
through environment variables that must be set before they initialize, so every mtjax command runs
in a subprocess. This test reads the bucket over plain HTTP, independently of mtjax.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import DEMO, REPO
from mtjax.train import metrics

BUCKET = "mtjax-test"
TASKS = ("reverse", "addition", "grammar")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(endpoint, env for mtjax subprocesses) of an in-memory emulator with one bucket."""
  port = _free_port()
  endpoint = f"http://127.0.0.1:{port}"
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"  # a file: a full pipe would stall it
  with log.open("w") as out:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port),
                             BUCKET], stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        _HTTP.open(f"{endpoint}/storage/v1/b/{BUCKET}", timeout=2).read()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          proc.kill()
          pytest.fail(f"the GCS emulator did not start (exit {proc.poll()}): "
                      f"{log.read_text()[-2000:]}")
        time.sleep(0.2)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=endpoint, TENSORSTORE_GCS_HTTP_URL=endpoint,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               GOOGLE_CLOUD_PROJECT="test", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    yield endpoint, env
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _objects(endpoint: str, prefix: str) -> list[str]:
  names, token = [], ""
  while True:
    query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
    page = json.loads(_HTTP.open(f"{endpoint}/storage/v1/b/{BUCKET}/o?{query}").read())
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken", "")
    if not token:
      return sorted(names)


def _get(endpoint: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe="")
  return _HTTP.open(f"{endpoint}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media").read()


def _put(endpoint: str, name: str, data: bytes) -> None:
  query = urllib.parse.urlencode({"uploadType": "media", "name": name})
  request = urllib.request.Request(f"{endpoint}/upload/storage/v1/b/{BUCKET}/o?{query}", data=data,
                                   headers={"Content-Type": "application/octet-stream"})
  _HTTP.open(request).read()


def _mtjax(env, *args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "mtjax", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"mtjax {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
  assert "Append mode" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc


def _steps(data: bytes) -> list[int]:
  return [json.loads(l)["step"] for l in data.decode().splitlines()]


@pytest.mark.slow
def test_train_resume_eval_on_gcs(gcs, tmp_path):
  endpoint, env = gcs
  run, prefix = f"gs://{BUCKET}/run", "run/"
  train = ["train", "--config", f"{DEMO}:tiny", "--workdir", run, "--config.checkpoint.every=2",
           "--config.train.progress=false", "--config.optimizer.decay_steps=6",
           "--config.eval.num_examples=8", "--config.eval.num_generate=2",
           "--config.eval.sample_prompts=1", "--config.eval.num_samples=2",
           "--config.eval.max_new_tokens=8"]
  _mtjax(env, *train, "--config.train.steps=4")
  names = _objects(endpoint, prefix)
  assert "run/metrics.jsonl" not in names  # an object store cannot append: shards instead
  assert [n for n in names if n.startswith("run/metrics/")] == ["run/metrics/000000.jsonl"]
  assert _steps(_get(endpoint, "run/metrics/000000.jsonl")) == [1, 2, 3, 4]
  for step in (2, 4):
    assert f"run/checkpoints/{step}/commit_success.txt" in names  # Orbax's commit on GCS

  # What a run that crashed after step 4's checkpoint leaves: a later row and a torn last line.
  torn = b'{"step": 6, "train/lo'
  _put(endpoint, "run/metrics/000001.jsonl", b'{"step": 5, "train/loss": 9.0}\n' + torn)
  resumed = _mtjax(env, *train, "--config.train.steps=6")
  assert "resumed from step 4 in gs://" in resumed.stderr
  assert f"warning: {run}/metrics/000001.jsonl:2: the last line was cut off" in resumed.stderr
  names = _objects(endpoint, prefix)
  (torn_file,) = [n for n in names if n.startswith("run/metrics.torn.")]
  assert _get(endpoint, torn_file) == torn + b"\n"
  (after,) = [n for n in names if n.startswith("run/metrics.after-4.")]
  assert _steps(_get(endpoint, after)) == [1, 2, 3, 4, 5]  # the crashed run's rows, kept
  shards = [n for n in names if n.startswith("run/metrics/")]
  assert shards == ["run/metrics/000000.jsonl", "run/metrics/000001.jsonl", "run/metrics/000002.jsonl"]
  per_shard = [_steps(_get(endpoint, n)) for n in shards]
  assert per_shard == [[1, 2, 3, 4], [], [5, 6]]  # no step twice, steps continue
  for step in (2, 4, 6):
    assert f"run/checkpoints/{step}/commit_success.txt" in names
  assert len([n for n in names if n.startswith("run/tensorboard/events.out.tfevents")]) == 2
  assert {"run/config.json", "run/env.json", "run/plots/train_loss.png"} <= set(names)
  assert json.loads(_get(endpoint, "run/config.json"))["train"]["steps"] == 6

  # metrics.read_rows on the bucket (in a subprocess: gcsfs reads the emulator's address from the
  # environment) and on a local copy of the shards agree with the objects read over HTTP.
  code = ("import json, sys; from mtjax.train import metrics; "
          f"json.dump(metrics.read_rows({run!r}), sys.stdout)")
  read = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert read.returncode == 0, read.stderr[-2000:]
  rows = json.loads(read.stdout)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(f"train/{t}/loss" in r for r in rows for t in TASKS)
  (tmp_path / "metrics").mkdir()
  for name in shards:
    (tmp_path / "metrics" / name.rsplit("/", 1)[1]).write_bytes(_get(endpoint, name))
  assert metrics.read_rows(tmp_path) == rows

  # Eval restores the last checkpoint from the bucket and writes its row there.
  evaluated = _mtjax(env, "eval", "--workdir", run)
  assert evaluated.stdout.rstrip().endswith(f"{run}/eval/step_6.json"), evaluated.stdout
  row = json.loads(_get(endpoint, "run/eval/step_6.json"))
  assert row["step"] == 6
  for task in TASKS:
    assert 0 < row[f"eval/{task}/loss"] < 20 and 0 <= row[f"eval/{task}/accuracy"] <= 1
