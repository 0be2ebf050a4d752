"""`mtjax train` end to end as a user runs it: outputs match the DESIGN.md contracts."""

import json
import subprocess
import sys

import pytest

from conftest import DEMO, REPO

CHECK_RUN = REPO.parent / "shared" / "tools" / "check_run.py"


@pytest.mark.slow
def test_train_cli_writes_contract_outputs(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "mtjax", "train", "--config", f"{DEMO}:tiny",
                         "--workdir", str(workdir), "--config.train.steps=6",
                         "--config.train.log_every=2", "--config.train.entropy_coefs.grammar=0.1"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "plots:" in proc.stdout

  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == 6 and config["train"]["entropy_coefs"]["grammar"] == 0.1
  env = json.loads((workdir / "env.json").read_text())
  assert env["device_count"] == 8 and "xla_force_host_platform_device_count=8" in env["xla_flags"]
  assert env["packages"]["jax"] and env["device_kind"]

  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]
  for task in ("reverse", "addition", "grammar"):
    for key in ("loss", "entropy", "accuracy", "tokens", "weight"):
      assert f"train/{task}/{key}" in rows[-1]
    for key in ("rate", "truncated", "skipped"):
      assert f"data/{task}/{key}" in rows[-1]
    assert rows[-1][f"data/{task}/rate"] == pytest.approx(1 / 3)
  assert rows[-1]["train/grammar/entropy_coef"] == pytest.approx(0.1)
  assert 0 < rows[-1]["data/packing_efficiency"] <= 1
  assert all(r["perf/compiles"] == 1 for r in rows)
  assert list((workdir / "tensorboard").glob("events.out.tfevents*"))
  assert {p.name for p in (workdir / "plots").glob("*.png")} >= {"train_loss.png", "train_entropy.png"}

  if CHECK_RUN.exists():
    check = subprocess.run([sys.executable, str(CHECK_RUN), str(workdir)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
