"""The efficiency study: arms, tokens to target, ratio and verdict, report rebuild."""

import json
import math

import pytest

from conftest import REPO
from mtjax import cli
from mtjax.experiments import efficiency

CONFIG = str(REPO / "configs" / "efficiency.py")


def test_ratio_and_verdict_by_hand():
  # Single-task: task a reaches at step 10, b at step 30; joint: every task by step 20.
  assert efficiency.efficiency_ratio({"a": 10, "b": 30}, 20, 100, 100) == pytest.approx(2.0)
  assert math.isnan(efficiency.efficiency_ratio({"a": None, "b": 30}, 20, 100, 100))
  assert efficiency.efficiency_ratio({"a": 0, "b": 0}, 0, 100, 100) == 1.0  # both at target at once
  assert efficiency.first_reach([(0, 0.1), (5, 0.6), (10, 0.4)], 0.5) == 5
  assert efficiency.first_reach([(0, 0.1)], 0.5) is None
  assert efficiency.verdict([1.2, 1.5, 1.1]) == "more efficient"
  assert efficiency.verdict([0.8, 0.9]) == "less efficient"
  assert efficiency.verdict([0.8, 1.2]) == "inconclusive"
  assert efficiency.verdict([1.2, math.nan]) == "inconclusive"


@pytest.mark.slow
def test_tiny_study_runs_and_report_rebuilds(tmp_path, capsys):
  out = tmp_path / "eff"
  assert cli.main(["experiment", "efficiency", "--config", f"{CONFIG}:tiny", "--workdir", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "verdict: inconclusive" in printed and "| task | target | single: tokens to target |" in printed
  summary = json.loads((out / "summary.json").read_text())
  assert summary["seeds"] == [0, 1] and len(summary["per_seed"]) == 2
  tps = summary["tokens_per_step"]
  for run in summary["per_seed"]:
    # target 0.0: reached at the first eval (step 0) in every arm: ratio 1, no difference
    assert run["single_tokens_to_target"] == {t: 0 for t in summary["tasks"]}
    assert run["ratio"] == 1.0
    multi_last = run["multi_curves"][summary["tasks"][0]][-1][0]
    assert multi_last == 2 * 4 * tps  # the joint run had K x steps_per_task steps
    assert run["single_curves"][summary["tasks"][0]][-1][0] == 4 * tps
  assert (out / "efficiency_curves.png").exists()
  report = (out / "report.md").read_text()
  (out / "report.md").unlink()
  assert cli.main(["report", str(out)]) == 0  # rebuilt from the stored metrics, no training
  assert (out / "report.md").read_text() == report
