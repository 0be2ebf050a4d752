"""A full disk, for real: a small tmpfs (mounting needs root; skipped with the reason where it is
not allowed). Train runs out of space mid-run, then resume, eval and export each hit the full disk
too: every command exits 2 with one error line, and every artifact written before stays readable
(the earlier checkpoints restore, eval files and config.json parse, no export directory appears)."""

import json
import os
import subprocess
import uuid

import pytest

from conftest import DEMO
from mtjax import cli

pytestmark = pytest.mark.slow


@pytest.fixture
def tmpfs(tmp_path):
  mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): run as root")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _resize(mount, size):
  subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def _fill(mount):
  """Takes every free byte (the next write fails with ENOSPC)."""
  with open(mount / "filler", "wb") as f:
    try:
      while True:
        f.write(b"\0" * (1 << 16))
        f.flush()
    except OSError:
      pass


def _one_error(rc, err):
  lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
  assert rc == 2 and len(lines) == 1 and "Traceback" not in err.split("error:")[-1], (rc, err[-2000:])
  return lines[0]


def test_train_resume_eval_export_on_a_full_disk(tmpfs, capsys):
  workdir = tmpfs / "run"
  args = ["train", "--config", f"{DEMO}:tiny", "--config.train.progress=false",
          "--config.checkpoint.every=2", "--config.checkpoint.keep=100", "--workdir", str(workdir)]
  rc = cli.main(args + ["--config.train.steps=200"])  # far more checkpoints than 3 MB hold
  line = _one_error(rc, capsys.readouterr().err)
  assert "No space left on device" in line and "files written before are intact" in line
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept and json.loads((workdir / "config.json").read_text())["seed"] == 0

  _resize(tmpfs, "64m")  # room again: the same command resumes from the last kept step
  assert cli.main(args + [f"--config.train.steps={kept[-1] + 2}"]) == 0
  assert f"resumed from step {kept[-1]}" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(workdir), "--step", str(kept[0])]) == 0
  eval_file = workdir / "eval" / f"step_{kept[0]}.json"
  before = eval_file.read_bytes()
  config = (workdir / "config.json").read_bytes()

  _fill(tmpfs)  # full again: resume, eval and export each fail cleanly
  capsys.readouterr()
  assert "No space left" in _one_error(cli.main(args + [f"--config.train.steps={kept[-1] + 6}"]),
                                       capsys.readouterr().err)
  assert (workdir / "config.json").read_bytes() == config
  rc = cli.main(["eval", "--workdir", str(workdir), "--step", str(kept[0])])
  _one_error(rc, capsys.readouterr().err)
  assert eval_file.read_bytes() == before
  out = tmpfs / "export"
  _one_error(cli.main(["export", "--workdir", str(workdir), "--out", str(out)]),
             capsys.readouterr().err)
  assert not out.exists() and not list(tmpfs.glob(".export.partial-*"))
  os.remove(tmpfs / "filler")  # every checkpoint written before still restores
  for step in kept:
    assert cli.main(["eval", "--workdir", str(workdir), "--step", str(step)]) == 0
