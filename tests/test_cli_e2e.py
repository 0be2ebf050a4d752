"""`mtjax train` end to end as a user runs it: outputs match the DESIGN.md contracts, checked by
tests/run_contract.py (in the repo), which itself rejects broken run directories."""

import json
import shutil
import subprocess
import sys

import pytest

import run_contract
from conftest import DEMO, REPO

CHECK_RUN = REPO.parent / "shared" / "tools" / "check_run.py"  # optional: beside the clone in CI
TASKS = ("reverse", "addition", "grammar")


@pytest.mark.multidevice
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

  assert run_contract.check(workdir) == []
  if CHECK_RUN.exists():
    check = subprocess.run([sys.executable, str(CHECK_RUN), str(workdir)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr

  # The same checker rejects this real run once a contract key is gone from the last row.
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  rows[-1].pop("perf/tokens_per_s")
  (broken / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert run_contract.check(broken) == ["metrics.jsonl step 6: missing perf/tokens_per_s"]


# ---------------------------------------------------------------- the checker itself

def _row(step, tasks=TASKS):
  row = {"step": step, "train/loss": 3.0, "train/skipped_steps": 0, "data/packing_efficiency": 0.8,
         "perf/step_time_s": 0.05, "perf/tokens_per_s": 1000.0, "perf/compiles": 1}
  for t in tasks:
    row.update({f"train/{t}/loss": 1.0, f"train/{t}/entropy": 2.0, f"train/{t}/accuracy": 0.5,
                f"train/{t}/tokens": 40, f"train/{t}/weight": 1.0,
                f"data/{t}/rate": 1 / len(tasks), f"data/{t}/truncated": 0, f"data/{t}/skipped": 0})
  return row


def _fake_run(path, rows=None):
  """A minimal run directory laid out as DESIGN.md says (written by hand, no training)."""
  path.mkdir()
  config = {"seed": 0, "model": dict.fromkeys(run_contract.CONFIG_TREE["model"], 1),
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "data": {"tasks": list(TASKS), "mixture": dict.fromkeys(TASKS, 1.0),
                     "schedule": "constant", "batch_size": 8, "seq_len": 64},
            "train": {"steps": 4, "log_every": 2, "loss_weights": {}, "entropy_coefs": {}},
            "optimizer": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.1, "clip_norm": 1.0,
                          "grad_accum": 1},
            "checkpoint": {"every": 0, "keep": 3}, "eval": {"every": 0, "tasks": []}}
  (path / "config.json").write_text(json.dumps(config))
  (path / "env.json").write_text(json.dumps({"packages": {"jax": "0.10.2"}, "device_count": 8,
                                             "device_kind": "cpu", "xla_flags": ""}))
  rows = [_row(2), _row(4)] if rows is None else rows
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "checkpoints" / "4").mkdir(parents=True)
  (path / "tensorboard").mkdir()
  (path / "tensorboard" / "events.out.tfevents.0.host").write_bytes(b"")
  (path / "plots").mkdir()
  (path / "plots" / "train_loss.png").write_bytes(b"")
  return path


def _without(row, key):
  row = dict(row)
  del row[key]
  return row


@pytest.mark.parametrize("rows, problem", [
    ([_row(2), _without(_row(4), "train/addition/weight")],
     "metrics.jsonl step 4: missing train/addition/weight"),
    ([_without(_row(2), "data/grammar/skipped"), _row(4)],
     "metrics.jsonl step 2: missing data/grammar/skipped"),
    ([_row(2), _without(_row(4), "train/skipped_steps")],
     "metrics.jsonl step 4: missing train/skipped_steps"),
    ([_row(4), _row(2)], "metrics.jsonl: train steps not strictly increasing: [4, 2]"),
    ([_row(2), _row(2)], "metrics.jsonl: train steps not strictly increasing: [2, 2]"),
    ([_row(2), {**_row(4), "perf/compiles": 2}],
     "metrics.jsonl step 4: perf/compiles = 2 (contract: 1 per process)"),
    ([_row(2), {**_row(4), "train/reverse/loss": float("nan")}],
     "metrics.jsonl step 4: NaN in ['train/reverse/loss'] with no skipped step counted"),
    ([{**_row(2), "data/reverse/rate": 0.5}],
     "metrics.jsonl step 2: data/<task>/rate sum to 1.1666666666666665, not 1"),
    ([{**_row(2), "data/packing_efficiency": 0.0}],
     "metrics.jsonl step 2: data/packing_efficiency = 0.0 outside (0, 1]"),
    ([], "metrics.jsonl: no row with train/loss"),
], ids=["no_task_weight", "no_data_skipped", "no_skipped_steps", "steps_backwards",
        "steps_repeat", "recompiled", "unexplained_nan", "rates_off", "zero_packing", "no_rows"])
def test_contract_check_rejects_a_broken_run(tmp_path, rows, problem):
  assert run_contract.check(_fake_run(tmp_path / "good")) == []
  assert run_contract.check(_fake_run(tmp_path / "bad", rows)) == [problem]


@pytest.mark.parametrize("remove, problem", [
    ("checkpoints/4", "checkpoints/: no step directory"),
    ("env.json", "env.json missing"),
    ("plots/train_loss.png", "no PNG plots"),
])
def test_contract_check_rejects_missing_outputs(tmp_path, remove, problem):
  run = _fake_run(tmp_path / "run")
  target = run / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  assert run_contract.check(run) == [problem]


def test_contract_check_rejects_a_config_without_the_shared_tree(tmp_path):
  run = _fake_run(tmp_path / "run")
  config = json.loads((run / "config.json").read_text())
  del config["optimizer"]["clip_norm"]
  config["data"]["tasks"] = ["reverse", "add/ition", "grammar"]
  (run / "config.json").write_text(json.dumps(config))
  problems = run_contract.check(run)
  assert "config.json: optimizer.clip_norm missing" in problems
  assert "config.json: bad task name 'add/ition' (a string without '/')" in problems


def test_contract_check_accepts_a_nan_on_a_skipped_step(tmp_path):
  rows = [_row(2), {**_row(4), "train/loss": float("nan"), "train/skipped_steps": 1}]
  assert run_contract.check(_fake_run(tmp_path / "run", rows)) == []
