"""One run per workdir (the lock), checks before moves, stale saves, and a read-only eval.

Each test asserts the exit code, the exact one-line error (no traceback) and that nothing written
before was lost.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEMO, REPO, tiny_config
from mtjax import cli
from mtjax.errors import BadInputError
from mtjax.train.lock import WorkdirLock

ARGS = ["train", "--config", f"{DEMO}:tiny", "--config.train.progress=false",
        "--config.optimizer.decay_steps=8", "--config.checkpoint.every=2"]
IN_USE = ("error: {w}: workdir is in use by pid {pid} on host {host} since {since}; wait for it "
          "to finish, or pass --force_unlock if it is gone")


def _steps(workdir, name="metrics.jsonl"):
  lines = (workdir / name).read_text().split("\n")[:-1]  # complete lines (a run may be writing)
  return [json.loads(l)["step"] for l in lines]


def _checkpoints(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _stale_save(workdir, name):
  """What a process killed half-way through a save leaves: an unfinished temporary directory."""
  path = workdir / "checkpoints" / name / "state"
  path.mkdir(parents=True)
  (path / "part").write_bytes(b"\0" * 16)
  return path.parent


@pytest.mark.slow
def test_second_run_is_refused_and_lock_dies_with_its_holder(tmp_path, capsys):
  steps = 30
  args = ARGS + [f"--config.train.steps={steps}", "--workdir", str(tmp_path)]
  first = subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_driver.py"),
                            "--step-delay", "0.5", "--", *args], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 180
    while not ((tmp_path / "checkpoints" / "2").is_dir() and (tmp_path / "metrics.jsonl").exists()
               and _steps(tmp_path)):
      assert first.poll() is None and time.time() < deadline, "the first run ended early"
      time.sleep(0.05)
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == first.pid
    # Another run's save in flight looks like a stale one: only the lock holder may remove it.
    in_flight = _stale_save(tmp_path, "99.orbax-checkpoint-tmp-1")
    capsys.readouterr()
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == IN_USE.format(w=tmp_path, **holder)
    assert first.poll() is None  # refused while the first one still ran
    assert in_flight.is_dir()
    while _steps(tmp_path)[-1] % 2 == 0:  # kill past a checkpoint: rows to set aside
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  # The OS released the dead process's flock: the next run takes the lock (the file is still
  # there, stale) and resumes from the latest complete checkpoint.
  assert (tmp_path / ".lock").exists()
  latest = _checkpoints(tmp_path)[-1]
  before = _steps(tmp_path)
  assert cli.main(args) == 0
  err = capsys.readouterr().err
  assert (f"note: removed 1 unfinished checkpoint save(s) in {tmp_path / 'checkpoints'}: "
          "99.orbax-checkpoint-tmp-1") in err.splitlines()
  assert f"resumed from step {latest} in {tmp_path / 'checkpoints'}" in err
  assert not in_flight.exists() and not (tmp_path / ".lock").exists()
  assert _steps(tmp_path) == list(range(1, steps + 1))
  if max(before) > latest:  # the killed run's later rows are kept aside, not lost
    aside = list(tmp_path.glob(f"metrics.after-{latest}.*.jsonl"))
    assert len(aside) == 1 and _steps(tmp_path, aside[0].name) == before


def test_force_unlock_takes_a_held_lock_over(tmp_path, capsys):
  args = ARGS + ["--config.train.steps=2", "--workdir", str(tmp_path)]
  with WorkdirLock(tmp_path) as held:  # another open file: flock refuses it like another process
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid()
    capsys.readouterr()
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == IN_USE.format(w=tmp_path, **holder)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    # The holder is alive on this host: --force_unlock refuses too, naming it; nothing written.
    assert cli.main(args + ["--force_unlock"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path}: workdir is in use by pid {os.getpid()} on this host "
        f"({holder['host']}), which is alive; --force_unlock takes over only a lock whose holder "
        f"is gone: stop pid {os.getpid()} first")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    # A holder on another host (a shared filesystem): taken over.
    holder = dict(holder, host="elsewhere")
    (tmp_path / ".lock").write_text(json.dumps(holder) + "\n")
    assert cli.main(args + ["--force_unlock"]) == 0
    err = capsys.readouterr().err
    assert (f"note: {tmp_path}: took over the lock of pid {holder['pid']} on host "
            f"{holder['host']} (since {holder['since']}; forced)") in err.splitlines()
    assert _steps(tmp_path) == [1, 2]
    assert held.held
  assert not (tmp_path / ".lock").exists()


def test_object_store_lock_stale_is_taken_over_and_fresh_is_not(tmp_path, capsys):
  def lock(**kw):  # the gs:// variant, on a local path; fast heartbeats
    return WorkdirLock(tmp_path, object_store=True, settle_s=0, heartbeat_s=0.05, **kw)

  other = {"pid": 4242, "host": "elsewhere", "since": "2024-01-01T00:00:00+00:00", "token": "x"}
  path = tmp_path / "lock.json"
  path.write_text(json.dumps(dict(other, heartbeat=time.time() - 60)))
  with pytest.raises(BadInputError) as refused:
    lock().acquire()
  assert str(refused.value) == (
      f"{tmp_path}: workdir is in use by pid 4242 on host elsewhere since "
      "2024-01-01T00:00:00+00:00; its last heartbeat was 60s ago and it is taken over after 300s "
      "without one, or now with --force_unlock")
  assert json.loads(path.read_text())["token"] == "x"  # untouched

  path.write_text(json.dumps(dict(other, heartbeat=time.time() - 301)))  # stale: its holder died
  capsys.readouterr()
  first = lock()
  first.acquire()
  assert first.took_over is not None and first.took_over["token"] == "x"
  assert capsys.readouterr().err.splitlines() == [
      f"note: {tmp_path}: took over the lock of pid 4242 on host elsewhere "
      "(since 2024-01-01T00:00:00+00:00; stale)"]
  mine = json.loads(path.read_text())
  assert mine["pid"] == os.getpid()
  beat = mine["heartbeat"]
  deadline = time.time() + 10
  while json.loads(path.read_text())["heartbeat"] == beat:  # the heartbeat thread rewrites it
    assert time.time() < deadline
    time.sleep(0.02)
  with pytest.raises(BadInputError, match=f"in use by pid {os.getpid()} "):
    lock().acquire()  # fresh: refused

  with pytest.raises(BadInputError, match=f"pid {os.getpid()} on this host .* which is alive"):
    lock(force=True).acquire()  # its holder is this live process: never forced
  first._record["host"] = "elsewhere"  # as if it ran on another host
  deadline = time.time() + 10
  while json.loads(path.read_text())["host"] != "elsewhere":
    assert time.time() < deadline
    time.sleep(0.02)
  forced = lock(force=True)
  forced.acquire()
  deadline = time.time() + 10
  while not first.lost:  # the first holder notices at its next heartbeat
    assert time.time() < deadline
    time.sleep(0.02)
  first.release()  # leaves the new holder's lock alone
  assert json.loads(path.read_text())["token"] == forced._record["token"]
  forced.release()
  assert not path.exists()


def test_refused_resume_from_moves_nothing_then_plain_rerun_resumes_from_latest(tmp_path, capsys):
  args = ARGS + ["--workdir", str(tmp_path)]
  assert cli.main(args + ["--config.train.steps=6"]) == 0
  assert _checkpoints(tmp_path) == [2, 4, 6]
  metrics, config = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "config.json").read_bytes()
  capsys.readouterr()
  assert cli.main(args + ["--config.train.steps=8", "--resume_from", "4",
                          "--config.model.d_model=48"]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: model.d_model: is 48 but the checkpoint at step 4 in {tmp_path / 'checkpoints'} "
      "has 32; this cannot change on resume (use a new --workdir)")
  assert _checkpoints(tmp_path) == [2, 4, 6]  # nothing moved aside
  assert not (tmp_path / "abandoned_checkpoints").exists()
  assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
  assert (tmp_path / "config.json").read_bytes() == config
  assert not (tmp_path / ".lock").exists()  # released on the error too

  stale = _stale_save(tmp_path, "8.orbax-checkpoint-tmp-1700000000")
  assert cli.main(args + ["--config.train.steps=8"]) == 0
  err = capsys.readouterr().err.splitlines()
  assert (f"note: removed 1 unfinished checkpoint save(s) in {tmp_path / 'checkpoints'}: "
          "8.orbax-checkpoint-tmp-1700000000") in err
  assert f"resumed from step 6 in {tmp_path / 'checkpoints'}; changed settings: train.steps 6 -> 8" \
      in err  # the latest, not 4
  assert not stale.exists()
  assert _steps(tmp_path) == list(range(1, 9))
  assert _checkpoints(tmp_path) == [4, 6, 8]  # checkpoint.keep=3


def test_eval_of_a_dir_without_checkpoints_creates_nothing(tmp_path, capsys):
  (tmp_path / "config.json").write_text(tiny_config().to_json() + "\n")
  before = sorted(p.name for p in tmp_path.iterdir())
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {tmp_path / 'checkpoints'}: no checkpoint to evaluate")
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # no checkpoints/ left behind


def test_read_only_checkpointer_creates_nothing(tmp_path):
  from mtjax.train.checkpoint import Checkpointer
  ck = Checkpointer(tmp_path, tiny_config().checkpoint, read_only=True)
  assert ck.all_steps() == [] and ck.latest_step() is None
  ck.close()
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ atomic files, merged evals

def test_a_file_replaced_on_a_full_disk_keeps_its_old_content(tmp_path, monkeypatch):
  """replace_file (config.json, tasks.json, env.json, eval files): a failure while writing (a
  full disk, here an ENOSPC from fsync) leaves the old file whole and no temporary file."""
  import errno

  from etils import epath

  from mtjax.train import rundir
  path = epath.Path(tmp_path) / "config.json"
  rundir.replace_file(path, b'{"old": 1}\n')

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space left"):
    rundir.replace_file(path, b'{"new": 2}\n' * 1000)
  assert path.read_bytes() == b'{"old": 1}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


MERGE = """
import contextlib, json, os, sys, time
from etils import epath
from mtjax.train import rundir
out, key, locked, first = epath.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
marker = out.parent / "first_has_read"
if not first:  # start the merge only once the first process has read the file
  while not marker.exists():
    time.sleep(0.01)
with (rundir.file_lock(out) if locked else contextlib.nullcontext()):
  stored = json.loads(out.read_text()) if out.exists() else {}
  if first:
    marker.touch()
    time.sleep(1.5)  # the evaluation's merge window, widened
  rundir.replace_file(out, json.dumps({**stored, key: 1}).encode())
"""


@pytest.mark.parametrize("locked", [True, False])
def test_two_evals_of_one_step_merge_under_the_file_lock(tmp_path, locked):
  """Two processes read-merge-write one eval file (as `mtjax eval --tasks a` and `--tasks b` on
  the same step do), the second starting while the first is inside its merge: under file_lock
  both keys survive; without it (the old code) the first writer drops the second's key (shown
  so the locked case is not vacuous)."""
  out = tmp_path / "step_4.json"
  procs = [subprocess.Popen([sys.executable, "-c", MERGE, str(out), key, str(int(locked)),
                             str(int(key == "a"))], cwd=REPO) for key in ("a", "b")]
  assert [p.wait(60) for p in procs] == [0, 0]
  assert set(json.loads(out.read_text())) == ({"a", "b"} if locked else {"a"})


def test_a_resume_whose_tokenizer_file_changed_content_is_refused(tmp_path, capsys):
  """Same path, other contents: the stored token ids would mean other text. Refused with one
  error line naming data.tokenizer, nothing in the workdir changed; the same contents resume."""
  import shutil
  tok = tmp_path / "tok.json"
  shutil.copy(REPO / "configs" / "tokenizers" / "function_calling_bpe2048.json", tok)
  workdir = tmp_path / "run"
  args = ARGS + [f"--config.data.tokenizer=hf:{tok}", "--workdir", str(workdir)]
  assert cli.main(args + ["--config.train.steps=2"]) == 0
  spec = json.loads(tok.read_text())
  vocab = spec["model"]["vocab"]  # two tokens swap ids: same size, other meaning
  a, b = sorted(vocab, key=vocab.get)[300:302]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  original = tok.read_text()
  tok.write_text(json.dumps(spec))
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  capsys.readouterr()
  assert cli.main(args + ["--config.train.steps=4"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: data.tokenizer: hf:{tok}: its content changed since the "
                        "checkpoint at step 2") and len(err.splitlines()) == 1
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
  tok.write_text(original)
  assert cli.main(args + ["--config.train.steps=4"]) == 0 and _checkpoints(workdir)[-1] == 4


def test_eval_into_an_unwritable_place_fails_before_evaluating(tmp_path, capsys, monkeypatch):
  """The eval directory cannot take a file (here a plain file sits where eval/ belongs; a
  read-only mount fails the same probe): exit 2 naming it before any evaluation, not after."""
  from mtjax.eval import evaluate
  args = ARGS + ["--config.train.steps=2", "--workdir", str(tmp_path)]
  assert cli.main(args) == 0
  assert not (tmp_path / "eval").exists()  # the tiny run evaluates nothing itself
  (tmp_path / "eval").write_text("not a directory")
  evaluated = []
  monkeypatch.setattr(evaluate.Evaluator, "__call__", lambda *a, **k: evaluated.append(1))
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {tmp_path / 'eval'}: not writable (") and "mtjax eval writes" in err
  assert evaluated == [] and (tmp_path / "eval").read_text() == "not a directory"


def test_a_full_disk_during_training_is_one_error_line(tmp_path, capsys, monkeypatch):
  """Orbax reports a full disk from its save threads as ValueError("RESOURCE_EXHAUSTED: ...");
  the checkpointer raises it as ENOSPC and the CLI prints one line, exit 2 (checked by hand on a
  3 MB tmpfs: the run stopped at step 12 with checkpoints 2-10 intact, and the same command
  resumed from 10 once the disk had room)."""
  import errno

  from mtjax import recipes
  from mtjax.train.checkpoint import Checkpointer
  ck = Checkpointer(tmp_path, tiny_config().checkpoint, read_only=True)
  with pytest.raises(OSError) as e, ck._storage_errors():
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "state/0" in OCDBT database: Failed writing')
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "checkpoints")
  with pytest.raises(ValueError, match="something else"), ck._storage_errors():
    raise ValueError("something else")  # other errors pass through unchanged

  def full(*args, **kwargs):
    raise e.value

  monkeypatch.setattr(recipes, "run", full)
  capsys.readouterr()
  assert cli.main(ARGS + ["--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {tmp_path / 'checkpoints'}: No space left on device (the "
                        "checkpoint save failed") and len(err.splitlines()) == 1


def test_a_resume_that_would_reshape_the_optimizer_state_names_the_setting(tmp_path, capsys):
  """Turning an EMA on (or freezing a parameter group) changes the optimizer state's structure:
  refused naming the setting, not reported as a damaged checkpoint; other values resume."""
  from mtjax.train.checkpoint import _changes_optimizer_state
  args = ARGS + ["--workdir", str(tmp_path)]
  assert cli.main(args + ["--config.train.steps=2"]) == 0
  capsys.readouterr()
  assert cli.main(args + ["--config.train.steps=4", "--config.optimizer.ema=0.99"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: optimizer.ema: is 0.99 but the checkpoint at step 2") and "damaged" not in err
  assert _checkpoints(tmp_path) == [2]
  cfg = tiny_config()
  assert _changes_optimizer_state("optimizer.ema", 0.9, 0.99, {}, cfg) is False  # on both sides
  frozen = tiny_config(**{"optimizer.param_groups": {"embed": 0.0}})
  assert _changes_optimizer_state("optimizer.param_groups.embed", None, 0.0, {}, frozen) is True
  scaled = tiny_config(**{"optimizer.param_groups": {"embed": 0.5}})
  assert _changes_optimizer_state("optimizer.param_groups.embed", None, 0.5, {}, scaled) is False


def test_a_checkpoint_deleted_while_read_is_not_called_damaged(tmp_path):
  """`mtjax eval` beside a training run with checkpoint.keep=1: retention may delete the step
  being read. That is named as what it is, with the steps kept, not as damage."""
  from mtjax.train.checkpoint import Checkpointer
  assert cli.main(ARGS + ["--config.train.steps=4", "--workdir", str(tmp_path)]) == 0
  ck = Checkpointer(tmp_path, tiny_config().checkpoint, read_only=True)
  message = str(ck._damaged(99, FileNotFoundError("state")))
  assert "was deleted while being read" in message and "now [2, 4]" in message
  assert "damaged" in str(ck._damaged(4, ValueError("bad bytes")))  # present but unreadable
