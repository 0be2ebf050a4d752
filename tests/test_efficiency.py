"""The efficiency study: arms, tokens to target, ratio and verdict, report rebuild."""

import json
import math

import pytest

from conftest import REPO
from mtjax import cli
from mtjax.experiments import efficiency

CONFIG = str(REPO / "configs" / "efficiency.py")


def test_ratio_and_verdict_by_hand():
  # Single-task: task a crosses at 10 (evals 5 and 20 bracket it), b at 30 [20, 40]; joint:
  # every task by 20 [10, 20]. More cases in test_study_math.py.
  C = efficiency.Crossing
  single, multi = {"a": C(10, 5, 20), "b": C(30, 20, 40)}, {"a": C(8, 5, 10), "b": C(20, 10, 20)}
  assert efficiency.efficiency_ratio(single, multi) == pytest.approx((2.0, 25 / 20, 60 / 10))
  assert math.isnan(efficiency.efficiency_ratio({"a": None, "b": C(30, 20, 40)}, multi)[0])
  zero = C(0, 0, 0)
  assert efficiency.efficiency_ratio({"a": zero}, {"a": zero})[0] == 1.0  # at target at once
  assert efficiency.crossing([(0, 0.1), (5, 0.6), (10, 0.4)], 0.5) == C(4.0, 0.0, 5.0)
  assert efficiency.crossing([(0, 0.1)], 0.5) is None
  # The verdict tests log(ratio / no-transfer value) over seeds (more cases in test_study_math.py).
  assert efficiency.verdict([(1.2, 1.1, 1.3)] * 10, [1.0] * 10)[0] == "more efficient"
  # A ratio above 1 but below its null (a bottleneck mixture) is LESS efficient than no transfer.
  assert efficiency.verdict([(0.9, 0.8, 1.0)] * 10, [1.2] * 10)[0] == "less efficient"
  assert efficiency.verdict([(1.2, 1.1, 1.3)] * 3, [1.0] * 3)[0] == "inconclusive"  # p >= 0.25
  assert efficiency.verdict([(1.2, 1.1, 1.3)] * 10, [1.0] * 9 + [math.nan])[0] == "inconclusive"


def _crossing(arm_dir, task, metric, target, tps) -> efficiency.Crossing:
  """The target's crossing by hand from the arm's metrics.jsonl: linear between the last eval
  below and the first at or above it, in tokens."""
  rows = [json.loads(l) for l in (arm_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
  key = f"eval/{task}/{metric}"
  curve = sorted((r["step"], r[key]) for r in rows if key in r)
  first = next((i for i, (_, v) in enumerate(curve) if v >= target), None)
  assert first, f"{arm_dir.name}: {task} at target at step 0 or never: {curve}"
  (s0, v0), (s1, v1) = curve[first - 1], curve[first]
  return efficiency.Crossing((s0 + (target - v0) / (v1 - v0) * (s1 - s0)) * tps, s0 * tps, s1 * tps)


@pytest.mark.slow
def test_tiny_study_runs_and_report_rebuilds(tmp_path, capsys):
  out = tmp_path / "eff"
  assert cli.main(["experiment", "efficiency", "--config", f"{CONFIG}:tiny", "--workdir", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "| task | metric | floor | target | ceiling | single: tokens to target |" in printed
  summary = json.loads((out / "summary.json").read_text())
  tasks, metric, S = summary["tasks"], summary["metric"], summary["steps_per_task"]
  assert summary["seeds"] == [0, 1] and len(summary["per_seed"]) == 2
  targets = summary["targets"]
  assert set(targets) == set(tasks) and all(0 < v < 1 for v in targets.values())
  for t in tasks:  # each strictly between its floor and ceiling (checked before any arm)
    assert summary["floors"][t]["floor"] < targets[t] < summary["floors"][t]["ceiling"]
  arm_cfg = json.loads((out / "seed0" / "multi" / "config.json").read_text())
  tps = arm_cfg["data"]["batch_size"] * arm_cfg["data"]["seq_len"]
  for run in summary["per_seed"]:
    seed_dir = out / f"seed{run['seed']}"
    # Log-spaced evals: steps 1 and 2 besides every eval_every (4) steps and the end.
    rows = [json.loads(l) for l in (seed_dir / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if f"eval/{tasks[0]}/{metric}" in r] == [
        0, 1, 2, *range(4, len(tasks) * S + 1, 4)]
    # Crossings by hand from each arm's stored eval rows: a real measurement (the target is
    # reached after training started, not at step 0).
    single = {t: _crossing(seed_dir / f"single_{t}", t, metric, targets[t], tps) for t in tasks}
    multi = {t: _crossing(seed_dir / "multi", t, metric, targets[t], tps) for t in tasks}
    for t in tasks:
      assert run["single_crossing"][t] == pytest.approx(single[t].to_json())
      assert run["multi_crossing"][t] == pytest.approx(multi[t].to_json())
      assert run["single_tokens_to_target"][t] == pytest.approx(single[t].at)
    point, low, high = efficiency.efficiency_ratio(single, multi)
    assert run["ratio"] == pytest.approx(point)
    assert run["ratio_interval"] == pytest.approx([low, high])
    assert low <= point <= high
    assert run["multi_curves"][tasks[0]][-1][0] == len(tasks) * S * tps  # K x steps_per_task steps
    assert run["single_curves"][tasks[0]][-1][0] == S * tps
    # The measured loss-token shares: a direct count of the joint arm's batches by task id.
    from mtjax import config as config_lib
    from mtjax.data.loader import MixtureLoader
    from mtjax.experiments import multiplier as mx
    counts = dict.fromkeys(tasks, 0.0)
    loader = MixtureLoader.from_config(config_lib.from_dict(json.loads(
        (seed_dir / "multi" / "config.json").read_text())), prefetch=0)
    for _ in range(len(tasks) * S):
      a = next(loader).arrays
      for i, t in enumerate(tasks):
        counts[t] += float(a["loss_mask"][a["task_ids"] == i].sum())
    loader.close()
    total = sum(counts.values())
    assert run["loss_token_shares"] == pytest.approx({t: c / total for t, c in counts.items()})
    # The ratio's null recomputed from the stored pieces (single tokens to target, shares,
    # densities), and each multiplier from the stored curves by hand at the last joint eval.
    s_tokens = {t: single[t].at for t in tasks}
    worst = max(s_tokens[t] * run["loss_density"][t] / run["loss_token_shares"][t] for t in tasks)
    assert run["ratio_null"] == pytest.approx(sum(s_tokens.values()) / worst)
    for t in tasks:
      m = run["multiplier_vs_single"][t]
      ref = mx.Reference.from_curve([(x, v) for x, v in run["single_curves"][t]])
      joint_x, score = run["multi_curves"][t][-1]
      assert m["score"] == pytest.approx(score)
      needed, kind = ref.tokens_to_reach(score)  # in single-run total tokens: same per-step scale
      assert m["kind"] == kind
      # M = (needed / tps x single loss tokens per step) / (joint steps x joint per step x share)
      #   = needed x density / (joint_x x share), both per-step counts cancelling but density.
      assert m["value"] == pytest.approx(needed * run["loss_density"][t]
                                         / (joint_x * run["loss_token_shares"][t]))
      # Against the masked-joint run (the joint run's batches, only t's loss on): the same x
      # scale as the joint run, so M = tokens needed / joint tokens.
      masked_cfg = json.loads((seed_dir / f"masked_{t}" / "config.json").read_text())
      assert masked_cfg["train"]["loss_weights"] == {u: float(u == t) for u in tasks}
      assert masked_cfg["data"]["mixture"] == arm_cfg["data"]["mixture"]
      needed, kind = mx.Reference.from_curve(run["masked_curves"][t]).tokens_to_reach(score)
      mm = run["multiplier_vs_masked"][t]
      assert mm["kind"] == kind and mm["value"] == pytest.approx(needed / joint_x)
      # The multiplier curve from the stored curves ends at the stored multipliers.
      curves = efficiency.multiplier_curves(run, t)
      for key in ("single", "masked"):
        stored = run[f"multiplier_vs_{key}"][t]
        if stored["value"] is not None:
          assert curves[key][-1].value == pytest.approx(stored["value"])
          assert curves[key][-1].kind == stored["kind"]
  # Two seeds: never a verdict but "inconclusive" (the smallest two-sided sign-flip p is 0.5).
  assert summary["verdict"] == "inconclusive"
  assert ("p = " in summary["verdict_reason"]
          or "no no-transfer value" in summary["verdict_reason"]), summary["verdict_reason"]
  assert "verdict: inconclusive" in printed
  assert summary["lr_schedule"] == "constant"
  assert summary["schedule"].startswith("LR schedule of every arm: linear warmup") and "constant" in summary["schedule"]
  for arm in ("multi", f"single_{tasks[0]}"):
    assert json.loads((out / "seed0" / arm / "config.json").read_text())["optimizer"]["schedule"] == "constant"
  assert (out / "efficiency_curves.png").exists()
  report = (out / "report.md").read_text()
  assert "| seed | ratio | interval | no-transfer value |" in report and summary["schedule"] in report
  assert "Tests, named before the run" in report and "vs masked-joint, log M" in report
  assert "no detectable difference at this power" in report  # 2 seeds: p >= 0.5 always
  assert "## Floors: every trivial baseline" in report
  stored = (out / "summary.json").read_text()
  (out / "report.md").unlink()
  (out / "summary.json").unlink()
  assert cli.main(["report", str(out)]) == 0  # rebuilt from the stored metrics, no training
  assert (out / "report.md").read_text() == report
  assert (out / "summary.json").read_text() == stored


def test_bootstrap_over_seeds_and_examples_by_hand():
  """A reference rising linearly from 0 at 0 tokens to 1.0 at 100; the joint run scores 0.5 at
  25 of the task's tokens in every seed, so M = 50 / 25 = 2 exactly. With n = 10^9 examples the
  binomial redraw is exact to ~1e-5 and identical seeds leave nothing to resample: the interval
  is [2, 2]. With n = 100 it widens around 2 by about the binomial's spread (+-0.1 in score is
  +-20 tokens, M 1.6 to 2.4)."""
  run = {"multi_curves": {"t": [(0.0, 0.0), (100.0, 0.5)]},
         "single_curves": {"t": [(0.0, 0.0), (100.0, 1.0)]},
         "masked_curves": {"t": [(0.0, 0.0), (25.0, 0.25), (100.0, 1.0)]},
         "loss_token_shares": {"t": 0.25}, "loss_density": {"t": 1.0},
         "multiplier_vs_single": {"t": {"tokens": 25.0, "score": 0.5, "value": 2.0,
                                        "kind": "exact"}}}
  curves = efficiency.multiplier_curves(run, "t")
  # single reference x scale: density x (25 / 100) / share = 1: 50 tokens for 0.5 -> M = 2;
  # masked scale 0.25: the curve reaches 0.5 at 50 x 0.25 = 12.5 tokens -> M = 0.5.
  assert curves["single"][-1].value == pytest.approx(2.0)
  assert curves["masked"][-1].value == pytest.approx(0.5)
  summary = {"tasks": ["t"], "per_seed": [run] * 5}
  tight = efficiency.bootstrap_multipliers(summary, {"t": 10**9}, resamples=200)
  assert tight["single"]["t"] == pytest.approx((2.0, 2.0), abs=1e-3)
  assert tight["masked"]["t"] == pytest.approx((0.5, 0.5), abs=1e-3)
  wide = efficiency.bootstrap_multipliers(summary, {"t": 100}, resamples=400)["single"]["t"]
  assert 1.6 < wide[0] < 1.95 and 2.05 < wide[1] < 2.4


@pytest.mark.slow
def test_size_and_lr_sub_studies_tiny(tmp_path, capsys):
  """Two sizes, two LR candidates, one seed, no masked-joint runs: every size under its own
  directory at its d_model; per arm kind the LR whose tuning-split run scored best (recomputed
  here from the runs' stored evals) is the LR every seed's arm ran at."""
  out = tmp_path / "sizes"
  assert cli.main(["experiment", "efficiency", "--config", f"{CONFIG}:tiny", "--workdir", str(out),
                   "--config.study.model_sizes=(16, 32)", "--config.study.lr_candidates=(0.01, 0.003)",
                   "--config.study.seeds=(0,)", "--config.study.steps_per_task=8",
                   "--config.study.masked_joint=False", "--config.study.primary=multiplier_vs_single",
                   "--config.study.tuning_examples=4", "--config.eval.num_examples=4",
                   "--config.study.mixture_temperatures=(1.0,)"]) == 0
  capsys.readouterr()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["model_sizes"] == [16, 32] and set(summary["by_size"]) == {"16", "32"}
  for d in (16, 32):
    sub = summary["by_size"][str(d)]
    cfg = json.loads((out / f"d_model{d}" / "seed0" / "multi" / "config.json").read_text())
    assert cfg["model"]["d_model"] == d and cfg["model"]["mlp_dim"] == 4 * d
    tuned = sub["lr_tuning"]
    for arm, scores in tuned["scores"].items():
      for lr, score in scores.items():  # the single-task arms' scores, from the stored evals
        if arm.startswith("single_"):
          t = arm.removeprefix("single_")
          series = [v for _, v in runs_lib_eval(out / f"d_model{d}" / "lr_tuning" / f"lr{lr}" / arm, t)]
          assert score == pytest.approx(series[-1])
      best = max(scores, key=lambda k: scores[k])
      assert tuned["chosen"][arm] == pytest.approx(float(best))
      ran = json.loads((out / f"d_model{d}" / "seed0" / arm / "config.json").read_text())
      assert ran["optimizer"]["lr"] == pytest.approx(tuned["chosen"][arm])
    # The tuned mixture: the best tuning-split score among uniform and T = 1, run at its rates.
    mixing = sub["mixture_tuning"]
    assert mixing["chosen"] == max(mixing["scores"], key=lambda k: mixing["scores"][k])
    tuned_cfg = json.loads((out / f"d_model{d}" / "seed0" / "multi_tuned" / "config.json").read_text())
    assert tuned_cfg["data"]["mixture"] == pytest.approx(mixing["rates"])
    assert "ratio_tuned" in sub["per_seed"][0] and "ratio_null_tuned" in sub["per_seed"][0]
  assert set(summary["size_tests"]["multiplier_vs_single"]) == {
      f"{t} @ d{d}" for t in summary["tasks"] for d in (16, 32)}
  report = (out / "report.md").read_text()
  assert "## d_model 16" in report and "## d_model 32" in report and "LRs tuned per arm" in report
  assert "Was the mixture the bottleneck? A second joint run" in report
  before = (out / "summary.json").read_text()
  (out / "summary.json").unlink()
  assert cli.main(["report", str(out)]) == 0
  assert (out / "summary.json").read_text() == before


def runs_lib_eval(arm_dir, task):
  from mtjax.experiments import arms
  return [(s, v) for s, v in arms.eval_series(arm_dir, task, "token_accuracy")
          if not math.isnan(v)]


def test_temperature_mixture_by_hand():
  # Shares of loss tokens under the uniform mixture: a 0.25, b 0.75 (b's examples 3x longer).
  # T = 1: rates 1/0.25 : 1/0.75 = 4 : 4/3 -> 0.75, 0.25; expected loss tokens then equal
  # (0.75 x 1 = 0.25 x 3). Large T tends to the uniform mixture.
  rates = efficiency.temperature_mixture({"a": 0.25, "b": 0.75}, 1.0)
  assert rates == pytest.approx({"a": 0.75, "b": 0.25})
  assert rates["a"] * 1 == pytest.approx(rates["b"] * 3)
  assert efficiency.temperature_mixture({"a": 0.25, "b": 0.75}, 1e6) == pytest.approx(
      {"a": 0.5, "b": 0.5}, abs=1e-5)
