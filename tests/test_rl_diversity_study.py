"""The rl_diversity study (issue 19 item 5): its tiny variant end to end through the CLI (SFT,
export, three GRPO arms from the export), a summary number against the arms' stored metrics, and
the report rebuilt identically from them."""

import json

import numpy as np
import pytest

from conftest import REPO, assert_report_rebuilds
from mtjax import cli


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval_rows(arm_dir):
  return [r for r in _rows(arm_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


@pytest.mark.slow
def test_tiny_rl_diversity_study_end_to_end(tmp_path, capsys):
  out = tmp_path / "rld"
  assert cli.main(["experiment", "rl_diversity", "--config",
                   f"{REPO}/configs/rl_diversity.py:tiny", "--workdir", str(out)]) == 0
  assert f"report and plots: {out}/report.md" in capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())
  assert (out / "rl_diversity.png").stat().st_size > 0
  report = (out / "report.md").read_text()
  assert "## What this run does NOT show" in report and "rl_diversity.png" in report

  seed = out / "seed0"
  assert (seed / "sft_export" / "config.json").exists()  # the SFT model, exported
  tasks, n = summary["tasks"], summary["n"]
  assert n == 2 and tasks == ["open_ended_template"]
  # Every RL arm starts from the export: its step-0 teacher-forced entropy is the SFT arm's final.
  sft_last = _eval_rows(seed / "sft")[-1]
  for arm, beta in (("grpo", 0.02), ("grpo_darling", 0.02), ("grpo_high_kl", 0.2)):
    cfg = json.loads((seed / arm / "config.json").read_text())
    assert cfg["rl"]["algorithm"] == "grpo" and np.isclose(cfg["rl"]["kl_coef"], beta)
    assert cfg["rl"]["diversity"] == ("darling" if arm == "grpo_darling" else "none")
    assert cfg["model"]["pretrained"] == str(seed / "sft_export")
    first = _eval_rows(seed / arm)[0]
    assert first["step"] == 0
    for t in tasks:
      np.testing.assert_allclose(first[f"eval/{t}/entropy"], sft_last[f"eval/{t}/entropy"],
                                 rtol=1e-4)

  # By hand from metrics.jsonl: plain GRPO's final held-out distinct@n and pass@1 minus the SFT
  # model's (the grpo arm's step-0 eval), for one seed.
  t = "open_ended_template"
  rows = _eval_rows(seed / "grpo")
  f = summary["findings"][t]
  assert np.isclose(f["grpo_vs_sft"]["distinct"]["mean"],
                    rows[-1][f"eval/{t}/distinct@{n}"] - rows[0][f"eval/{t}/distinct@{n}"])
  assert np.isclose(f["final"]["grpo"]["pass1"]["mean"], rows[-1][f"eval/{t}/pass@1"])
  darling = _eval_rows(seed / "grpo_darling")
  assert np.isclose(f["darling_vs_grpo"]["pass1"]["mean"],
                    darling[-1][f"eval/{t}/pass@1"] - rows[-1][f"eval/{t}/pass@1"])
  # One seed: the sign-flip test cannot name a direction (its smallest two-sided p is 1).
  assert f["verdicts"]["darling_pass1_vs_grpo"].startswith(("no detectable difference", "equal"))

  # `mtjax report DIR` rebuilds summary, report and plot from the stored metrics alone.
  assert_report_rebuilds(out)
