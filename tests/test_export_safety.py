"""`mtjax export` leaves its target whole or absent: a failure (a full disk), SIGTERM or SIGINT in
the middle removes the partial files (SIGTERM exits 3), and a killed export's leftovers are cleared
by the next export to the same place."""

import errno
import os
import signal

import pytest

from conftest import DEMO
from mtjax import cli
from mtjax.model import pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("export") / "run"
  assert cli.main(["train", "--config", f"{DEMO}:tiny", "--config.train.progress=false",
                   "--config.train.steps=2", "--config.checkpoint.every=2",
                   "--workdir", str(workdir)]) == 0
  return workdir


def _failing_midway(monkeypatch, failure):
  """pretrained.export writes its first file, then `failure()` happens (as the next write would)."""
  real = pretrained.export

  def export(params, spec, out, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial shard
    failure()
    return real(params, spec, out, **kwargs)

  monkeypatch.setattr(pretrained, "export", export)


def _siblings(out):
  return sorted(p.name for p in out.parent.iterdir() if p.name != "run")


def test_a_full_disk_leaves_no_partial_export(run, tmp_path, monkeypatch, capsys):
  out = tmp_path / "hf"

  def full():
    raise OSError(errno.ENOSPC, "No space left on device")

  _failing_midway(monkeypatch, full)
  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(run), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: the workdir: No space left on device; files written before are "
                        "intact") and len(err.splitlines()) == 1
  assert _siblings(out) == []  # neither hf/ nor a .hf.partial-* directory


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_export_removes_the_partial_files_and_exits_3(run, tmp_path, monkeypatch,
                                                                      capsys, sig):
  out = tmp_path / "hf"
  _failing_midway(monkeypatch, lambda: os.kill(os.getpid(), sig))
  assert cli.main(["export", "--workdir", str(run), "--out", str(out)]) == 3
  assert "stopped: export interrupted; nothing was written to" in capsys.readouterr().err
  assert _siblings(out) == []
  assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back
  monkeypatch.undo()  # the same command again: a whole export
  assert cli.main(["export", "--workdir", str(run), "--out", str(out)]) == 0
  assert (out / "model.safetensors").exists() and (out / "config.json").exists()
  assert _siblings(out) == ["hf"]


def test_a_killed_exports_leftovers_are_cleared_and_a_live_ones_kept(run, tmp_path, capsys):
  out = tmp_path / "hf"
  dead = tmp_path / ".hf.partial-999999999"  # no such pid: a SIGKILLed export's directory
  live = tmp_path / f".hf.partial-{os.getppid()}"  # a running process's: left alone
  for d in (dead, live):
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0")
  assert cli.main(["export", "--workdir", str(run), "--out", str(out)]) == 0
  assert _siblings(out) == sorted(["hf", live.name])


def test_an_existing_file_or_bad_shard_size_exits_2(run, tmp_path, capsys):
  existing = tmp_path / "file"
  existing.write_text("mine")
  assert cli.main(["export", "--workdir", str(run), "--out", str(existing)]) == 2
  assert existing.read_text() == "mine"
  assert "exists and is not empty" in capsys.readouterr().err
  for size in ("nan", "inf", "0"):
    assert cli.main(["export", "--workdir", str(run), "--out", str(tmp_path / "x"),
                     "--max_shard_gb", size]) == 2
    assert capsys.readouterr().err.startswith("error: --max_shard_gb: expected a positive size")


def test_generating_from_a_byte_tokenizer_export_says_what_to_do(run, tmp_path, capsys):
  """The tiny run uses mtjax's byte tokenizer, so its export has no tokenizer.json: generate
  names that and points at the run, instead of 'tokenizer.json not found'."""
  out = tmp_path / "hf"
  assert cli.main(["export", "--workdir", str(run), "--out", str(out)]) == 0
  capsys.readouterr()
  assert cli.main(["generate", "--model", str(out), "--prompt", "ab"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {out}: has no tokenizer.json") and "--tokenizer byte" in err
  assert cli.main(["generate", "--workdir", str(run), "--prompt", "ab", "--max_new_tokens", "2"]) == 0
  from_run = capsys.readouterr().out
  assert cli.main(["generate", "--model", str(out), "--tokenizer", "byte", "--prompt", "ab",
                   "--max_new_tokens", "2"]) == 0
  assert capsys.readouterr().out == from_run  # the same weights, the same greedy text
