"""The weighting study (mtjax.experiments.weighting): its tiny variant runs end to end through
`mtjax experiment weighting`, every arm trains the same tokens, the summary's scores, normalized
scores, differences from tuned static, sweep choice and step times agree with a hand computation
from the arms' stored metrics, and the report rebuilds identically."""

import json
import math
import statistics

import numpy as np
import pytest

from conftest import REPO
from mtjax import cli
from mtjax.experiments import floors, weighting


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_scores(arm_dir, tasks, step):
  row = next(r for r in _rows(arm_dir / "metrics.jsonl")
             if r["step"] == step and any(k.startswith("eval/") for k in r))
  return {t: row[f"eval/{t}/token_accuracy"] for t in tasks}


def _by_hand(scores, bounds):
  return float(np.mean([(scores[t] - bounds[t]["floor"]) / (bounds[t]["ceiling"] - bounds[t]["floor"])
                        for t in scores]))


def _step_time(arm_dir):
  times = [r["perf/step_time_s"] for r in _rows(arm_dir / "metrics.jsonl") if "perf/step_time_s" in r]
  return statistics.median(times[1:-1] if len(times) > 2 else times[1:])


def test_arithmetic():
  assert floors.normalized(0.5, 0.25, 0.75) == pytest.approx(0.5)
  assert floors.normalized(0.5, None, 1.0) is None
  assert floors.mean_normalized({"a": 0.5, "b": 1.0, "c": 0.3}, {
      "a": {"floor": 0.0, "ceiling": 1.0}, "b": {"floor": 0.5, "ceiling": 1.0},
      "c": {"floor": None, "ceiling": 1.0}}) == pytest.approx(0.75)  # c left out
  mean, std, low, high = weighting.t_interval([0.1, 0.2, 0.3])
  half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) x s / sqrt(n)
  assert (mean, std, low, high) == pytest.approx((0.2, 0.1, 0.2 - half, 0.2 + half))
  # Sign-flip tests, Holm across the methods. 10 seeds all one way: p = 2 / 1024 each, x 2 methods
  # at Holm's first step = 0.0039 < 0.05; 3 seeds can never get below 2 / 8 = 0.25.
  ten_up = [0.1 + 0.01 * i for i in range(10)]
  decided = weighting.verdicts({"a": ten_up, "b": [-x for x in ten_up]})
  assert decided["a"][0] == "beats tuned static" and "p = 0.00391" in decided["a"][1]
  assert decided["b"][0] == "worse than tuned static" and "p = 0.00391" in decided["b"][1]
  mixed = weighting.verdicts({"a": ten_up[:5] + [-x for x in ten_up[5:]]})["a"]
  assert mixed[0] == "no detectable difference"
  assert weighting.verdict([0.1, 0.11, 0.12])[0] == "no detectable difference"  # 3 seeds: p 0.25
  w = weighting.candidate_weights("closed_x2", ["structured_sort", "open_ended_template"])
  assert w == pytest.approx({"structured_sort": 4 / 3, "open_ended_template": 2 / 3})


@pytest.mark.slow
def test_weighting_study_tiny(tmp_path, capsys):
  out = tmp_path / "weighting"
  assert cli.main(["experiment", "weighting", "--config", f"{REPO}/configs/weighting.py:tiny",
                   "--workdir", str(out)]) == 0
  assert f"report and plots: {out}/report.md" in capsys.readouterr().out
  s = json.loads((out / "summary.json").read_text())
  assert (out / "weighting.png").stat().st_size > 0
  tasks, steps, bounds = s["tasks"], s["steps"], s["floors"]
  # The tiny variant's tasks have equal training sets: no temperature arm (said in the report).
  assert "temperature" not in s["arms"] and len(set(s["train_sizes"].values())) == 1
  assert s["arms"] == ["static", "tuned_static", "uncertainty", "dwa", "famo", "imtl_l", "pcgrad",
                       "mgda", "dbmtl", "odm"]

  # The sweep: each candidate scored on the tuning split, the best chosen.
  tuning = s["tuning"]
  tuned = {}
  for c in tuning["candidates"]:
    d = out / f"tune_seed{tuning['seed']}" / c["candidate"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["eval"]["skip"] == 0 and cfg["train"]["loss_weights"] == pytest.approx(c["weights"])
    tuned[c["candidate"]] = _by_hand(_final_scores(d, tasks, steps), tuning["floors"])
    assert c["mean_normalized"] == pytest.approx(tuned[c["candidate"]])
  assert tuning["chosen"] == max(tuned, key=lambda c: tuned[c])

  # Every arm: the same tokens; its method; scores and normalized scores from its metrics.
  seed_dir = out / "seed0"
  dirs = {a: seed_dir / ("static" if a == "tuned_static" and s["tuned_is_static"] else a)
          for a in s["arms"]}
  assert (seed_dir / "tuned_static").exists() != s["tuned_is_static"]
  arms = s["per_seed"][0]["arms"]
  for a, d in dirs.items():
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["train"]["steps"], cfg["data"]["batch_size"], cfg["data"]["seq_len"]) == (
        steps, s["batch_size"], s["seq_len"])
    assert cfg["eval"]["skip"] == 8  # the report split: after the tuning examples
    assert cfg["train"]["weighting"]["method"] == (a if a in weighting.LOSS_BASED +
                                                   weighting.GRADIENT_BASED else "static")
    assert cfg["data"]["mixing"]["method"] == ("odm" if a == "odm" else "none")
    scores = _final_scores(d, tasks, steps)
    assert arms[a]["scores"] == pytest.approx(scores)
    assert arms[a]["mean_normalized"] == pytest.approx(_by_hand(scores, bounds))
    f = s["findings"][a]
    assert f["mean_normalized"] == pytest.approx(_by_hand(scores, bounds))
    assert f["diff_vs_tuned"] == pytest.approx(
        _by_hand(scores, bounds) - _by_hand(_final_scores(dirs["tuned_static"], tasks, steps), bounds))
    assert f["relative_step_time"] == pytest.approx(_step_time(d) / _step_time(dirs["static"]))
  assert s["tuned_is_static"] == (tuning["chosen"] == "equal")
  if not s["tuned_is_static"]:
    assert json.loads((dirs["tuned_static"] / "config.json").read_text())["train"][
        "loss_weights"] == pytest.approx(tuning["chosen_weights"])
  # Adaptive arms log their weights, data-level ones their rates.
  for a in weighting.LOSS_BASED + weighting.GRADIENT_BASED:
    assert set(arms[a]["controls"]["weight"]) == set(tasks)
  assert set(arms["odm"]["controls"]["rate"]) == set(tasks)

  report = (out / "report.md").read_text()
  for text in ("| arm | kind | mean normalized score | Δ vs tuned static | 95% interval | verdict |",
               "## Tuned static weights", "## Per-task held-out scores", "**Verdict:",
               "## What this run does NOT show", "No temperature arm", "![weighting](weighting.png)"):
    assert text in report
  assert all(f"| {a} |" in report for a in s["arms"])

  # `mtjax report` rebuilds summary and report from the stored metrics alone.
  text, summary = report, (out / "summary.json").read_text()
  (out / "report.md").unlink()
  (out / "summary.json").unlink()
  assert cli.main(["report", str(out)]) == 0
  assert (out / "report.md").read_text() == text
  assert (out / "summary.json").read_text() == summary
