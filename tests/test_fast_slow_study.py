"""The fast_slow study (issue 21): its tiny variant end to end through the CLI (a base from
scratch, its export, then slow / fast / fast_slow arms over a sequence of tasks), the arms'
settings, the fast arm's frozen weights, forgetting, steps to target and drift against the runs'
own metrics, and the report rebuilt identically from the stored metrics."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from conftest import REPO, assert_report_rebuilds
from mtjax import cli


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval_rows(arm_dir):
  return [r for r in _rows(arm_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


def _params(run_dir, step):
  state = ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
  return traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")


@pytest.mark.slow
def test_tiny_fast_slow_study_end_to_end(tmp_path, capsys):
  out = tmp_path / "fs"
  assert cli.main(["experiment", "fast_slow", "--config", f"{REPO}/configs/fast_slow.py:tiny",
                   "--workdir", str(out)]) == 0
  assert f"report and plots: {out}/report.md" in capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())
  report = (out / "report.md").read_text()
  assert "## What this run does NOT show" in report and "fast_slow.png" in report
  assert "Fast channel: soft prompts" in report  # the report says which fast channel it used
  assert (out / "fast_slow.png").stat().st_size > 0

  seed, tasks, n = out / "seed0", summary["tasks"], summary["steps_per_task"]
  assert tasks == ["structured_sort", "open_ended_template"] and n == 4
  export = seed / "base_export"
  base_cfg = json.loads((seed / "base" / "config.json").read_text())
  assert base_cfg["train"]["steps"] == 2 * n and base_cfg["model"]["soft_prompt"]["length"] == 4
  assert (export / "mtjax_soft_prompt.npy").exists()  # the base's soft prompts travel with it
  base_last = _eval_rows(seed / "base")[-1]
  dirs = {a: seed / a for a in ("slow", "fast", "fast_slow")}
  for name, d in dirs.items():
    cfg = json.loads((d / "config.json").read_text())
    o = cfg["optimizer"]
    assert cfg["model"]["pretrained"] == str(export) and cfg["train"]["steps"] == 2 * n, name
    assert cfg["data"]["stages"] == [[0, {tasks[0]: 1.0, tasks[1]: 0.0}],
                                     [n, {tasks[0]: 0.0, tasks[1]: 1.0}]], name
    assert cfg["model"]["soft_prompt"]["length"] == 4, name
    assert o["lr"] == {"slow": 1e-3, "fast": 3e-2, "fast_slow": 3e-2}[name], name
    assert np.isclose(o["slow_lr_ratio"], {"slow": 1.0, "fast": 0.0, "fast_slow": 1e-3 / 3e-2}[name])
    assert o["fast_every"] == (0 if name == "slow" else 1), name
    rows = _eval_rows(d)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8], name
    for t in tasks:
      assert abs(rows[0][f"eval/{t}/kl_drift"]) < 1e-6  # the start is the reference
      # Every arm starts from the export, soft prompts included: the base's final held-out loss.
      np.testing.assert_allclose(rows[0][f"eval/{t}/loss"], base_last[f"eval/{t}/loss"], rtol=1e-4)
  # fast trains its soft prompts only, slow its weights only: the rest ends as the base ended.
  base = _params(seed / "base", 2 * n)
  fast, slow = _params(dirs["fast"], 2 * n), _params(dirs["slow"], 2 * n)
  assert set(fast) == set(slow) == set(base)
  for k, v in base.items():
    if k == "soft_prompt":
      np.testing.assert_array_equal(slow[k], v)
      assert not np.array_equal(fast[k], v)
    else:
      np.testing.assert_array_equal(fast[k], v, err_msg=k)
      assert not np.array_equal(slow[k], v), k

  # Forgetting, steps to target and drift by hand from each arm's eval rows.
  targets = summary["targets"]
  for name, d in dirs.items():
    got = summary["per_seed"][0][name]
    by_step = {r["step"]: r for r in _eval_rows(d)}
    score = lambda step, t, by_step=by_step: by_step[step][f"eval/{t}/token_accuracy"]
    assert got["forgetting"] == {tasks[0]: score(n, tasks[0]) - score(2 * n, tasks[0])}
    for j, t in enumerate(tasks):
      crossed = [s - j * n for s in (j * n + 2, j * n + 4) if score(s, t) >= targets[t]]
      assert got["steps_to_target"][t] == (crossed[0] if crossed else None)
      assert np.isclose(got["kl_drift"][t], by_step[2 * n][f"eval/{t}/kl_drift"])
      assert np.isclose(got["final"][t], score(2 * n, t))
    for t in tasks:  # the running eval/<task>/forgetting: best earlier score minus now
      series = [r[f"eval/{t}/token_accuracy"] for r in _eval_rows(d)]
      want = [max(series[: i + 1]) - v for i, v in enumerate(series)]
      np.testing.assert_allclose([r[f"eval/{t}/forgetting"] for r in _eval_rows(d)], want)
  f = summary["findings"]
  final = lambda a: np.mean([summary["per_seed"][0][a]["final"][t] for t in tasks])
  assert np.isclose(f["final"]["fast_slow-slow"]["mean"], final("fast_slow") - final("slow"))
  # One seed: the sign-flip test cannot name a direction (its smallest two-sided p is 1).
  assert f["final"]["fast_slow-slow"]["verdict"].startswith(("no detectable difference", "equal"))

  # `mtjax report DIR` rebuilds summary, report and plot from the stored metrics alone.
  assert_report_rebuilds(out)
