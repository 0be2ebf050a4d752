"""The task_experts study (issue 20 (i)): its tiny variant end to end through the CLI (a base from
scratch, its export, SVF / LoRA per task / LoRA shared / full multi-task / full per-task arms from
the export), the summary's scores and parameter counts against the runs' own records and a hand
count, and the report rebuilt identically from the stored metrics."""

import json
import re

import numpy as np
import pytest

from conftest import REPO, assert_report_rebuilds
from mtjax import cli


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval_rows(arm_dir):
  return [r for r in _rows(arm_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


@pytest.mark.slow
def test_tiny_task_experts_study_end_to_end(tmp_path, capsys):
  out = tmp_path / "tx"
  assert cli.main(["experiment", "task_experts", "--config",
                   f"{REPO}/configs/task_experts.py:tiny", "--workdir", str(out)]) == 0
  captured = capsys.readouterr()
  assert f"report and plots: {out}/report.md" in captured.out
  summary = json.loads((out / "summary.json").read_text())
  report = (out / "report.md").read_text()
  assert "## What this run does NOT show" in report and "task_experts.png" in report
  assert (out / "task_experts.png").stat().st_size > 0

  seed = out / "seed0"
  tasks = summary["tasks"]
  assert tasks == ["structured_sort", "open_ended_template"]
  export = seed / "base_export"
  assert (export / "config.json").exists()  # the base model, exported
  base_cfg = json.loads((seed / "base" / "config.json").read_text())
  assert base_cfg["train"]["steps"] == 2 * 2 and not base_cfg["model"]["pretrained"]
  base_last = _eval_rows(seed / "base")[-1]

  arm_dirs = {"svf_per_task": seed / "svf_per_task", "lora_per_task": seed / "lora_per_task",
              "lora_shared": seed / "lora_shared", "full_mt": seed / "full_mt",
              **{f"full_per_task_{t}": seed / f"full_per_task_{t}" for t in tasks}}
  for name, d in arm_dirs.items():
    cfg = json.loads((d / "config.json").read_text())
    m = cfg["model"]
    assert m["pretrained"] == str(export) and cfg["train"]["steps"] == 2, name
    assert cfg["data"]["batch_size"] == base_cfg["data"]["batch_size"], name
    assert m["svf"]["enabled"] == (name == "svf_per_task"), name
    # LRs: full fine-tuning at a third of the base's, LoRA at the base's, SVF at model.svf.lr.
    lr = cfg["optimizer"]["lr"]
    assert np.isclose(lr, base_cfg["optimizer"]["lr"] / (3 if name.startswith("full") else 1)), name
    assert m["svf"]["lr"] == 2e-2
    assert m["lora"]["targets"] == (["gate", "up", "down"] if name.startswith("lora") else []), name
    if name.startswith("lora"):
      assert m["lora"]["per_task"] == (name == "lora_per_task")
    run_tasks = [name.removeprefix("full_per_task_")] if name.startswith("full_per_task") else tasks
    assert cfg["data"]["tasks"] == run_tasks, name
    # Every arm starts from the export: its step-0 held-out loss is the base's final one (LoRA's
    # zero B leaves the base unchanged; SVF's p starts at 0.1 + 0.01 x noise, as in the paper, so
    # its z are only nearly uniform and the start is the base up to that noise).
    first = _eval_rows(d)[0]
    assert first["step"] == 0
    for t in run_tasks:
      np.testing.assert_allclose(first[f"eval/{t}/loss"], base_last[f"eval/{t}/loss"],
                                 rtol=1e-2 if name == "svf_per_task" else 1e-4)

  # Scores by hand from metrics.jsonl: each arm's last eval row (full_per_task: each task's own run).
  def last(d, t):
    return _eval_rows(d)[-1][f"eval/{t}/token_accuracy"]

  got = summary["per_seed"][0]["scores"]
  for t in tasks:
    assert np.isclose(got["base"][t], base_last[f"eval/{t}/token_accuracy"])
    for arm in ("svf_per_task", "lora_per_task", "lora_shared", "full_mt"):
      assert np.isclose(got[arm][t], last(arm_dirs[arm], t))
    assert np.isclose(got["full_per_task"][t], last(arm_dirs[f"full_per_task_{t}"], t))
  f = summary["findings"]
  svf_vs_lora = np.mean([last(arm_dirs["svf_per_task"], t) - last(arm_dirs["lora_per_task"], t)
                         for t in tasks])
  assert np.isclose(f["mean"]["svf_per_task-lora_per_task"]["mean"], svf_vs_lora)
  t = tasks[0]
  assert np.isclose(f[t]["full_mt-full_per_task"]["mean"],
                    last(arm_dirs["full_mt"], t) - last(arm_dirs[f"full_per_task_{t}"], t))
  # One seed: the sign-flip test cannot name a direction (its smallest two-sided p is 1).
  assert f[t]["lora_per_task-lora_shared"]["verdict"].startswith(("no detectable difference",
                                                                   "equal"))

  # Parameter counts: by hand for the tiny model (d 32, 2 layers, 4 heads of 8, 2 KV heads,
  # MLP 64, vocab 384 untied; LoRA rank 4 and SVF on gate, up, down) ...
  d, layers, mlp, vocab, heads, kv, hd, rank, n_tasks = 32, 2, 64, 384, 4, 2, 8, 4, 2
  per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * mlp + 2 * d
  full = 2 * vocab * d + layers * per_layer + d
  lora_one = layers * 3 * rank * (d + mlp)  # gate, up [d -> mlp], down [mlp -> d]
  svf_one = layers * 3 * min(d, mlp)  # one scale per singular value
  p = summary["params"]
  assert p["base"] == {"total": full, "trainable": full}
  assert p["full_mt"]["trainable"] == full
  assert p["full_per_task"]["trainable"] == n_tasks * full
  assert p["lora_per_task"]["trainable"] == n_tasks * lora_one
  assert p["lora_shared"]["trainable"] == lora_one
  assert p["svf_per_task"]["trainable"] == n_tasks * svf_one
  # ... and as each adapter run counted its own parameters at start ("parameters: N (M trainable").
  started = [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
             re.findall(r"parameters: ([\d,]+) \(([\d,]+) trainable", captured.err)]
  assert started == [(p[a]["total"], p[a]["trainable"])
                     for a in ("svf_per_task", "lora_per_task", "lora_shared")]

  # `mtjax report DIR` rebuilds summary, report and plot from the stored metrics alone.
  assert_report_rebuilds(out)
