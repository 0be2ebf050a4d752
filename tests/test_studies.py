"""The study registry and what every study shares (settings checked before training, arms marked
DONE only when finished, a preempted arm stops the study with exit code 3); the transfer,
entropy, decomposition and instruction studies: their tiny variants run through the CLI, their
summaries agree with the arms' stored metrics, their reports rebuild identically; and the
instruction switch rewrites what training and evaluation see."""

import json
import types

import numpy as np
import pytest

from conftest import REPO, tiny_config
from mtjax import cli
from mtjax import config as config_lib
from mtjax.errors import BadInputError
from mtjax.experiments import arms, runs, transfer
from mtjax.experiments.registry import STUDIES


def _rows(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def _run_study(name, tmp_path, capsys):
  out = tmp_path / name
  assert cli.main(["experiment", name, "--config", f"{REPO}/configs/{name}.py:tiny",
                   "--workdir", str(out)]) == 0
  printed = capsys.readouterr().out
  assert f"report and plots: {out}/report.md" in printed
  return out, json.loads((out / "summary.json").read_text())


def _rebuilds_identically(out):
  report, summary = (out / "report.md").read_text(), (out / "summary.json").read_text()
  (out / "report.md").unlink()
  (out / "summary.json").unlink()
  assert cli.main(["report", str(out)]) == 0
  assert (out / "report.md").read_text() == report
  assert (out / "summary.json").read_text() == summary


# ------------------------------------------------------------------ the registry

def test_every_registered_study_is_an_experiment_subcommand():
  assert list(STUDIES) == ["efficiency", "transfer", "entropy", "decomposition", "instructions",
                           "weighting", "rl_diversity", "task_experts", "expert_composition",
                           "fast_slow"]
  for name, study in STUDIES.items():
    assert study.name == name and study.help
    args = cli._parser().parse_args(["experiment", name, "--config", "c.py", "--workdir", "w"])
    assert (args.command, args.study, args.config, args.workdir) == (
        "experiment", name, "c.py", "w")
  with pytest.raises(BadInputError, match="invalid choice"):
    cli._parser().parse_args(["experiment", "nonexistent", "--config", "c.py", "--workdir", "w"])


def _no_training(cfg, workdir):
  raise AssertionError(f"trained {workdir} despite bad study settings")


@pytest.mark.parametrize("name", list(STUDIES))
def test_study_settings_are_checked_before_training(name, tmp_path, capsys, monkeypatch):
  from mtjax import recipes
  monkeypatch.setattr(recipes, "run", _no_training)
  out = tmp_path / name
  assert cli.main(["experiment", name, "--config", f"{REPO}/configs/{name}.py:tiny", "--workdir",
                   str(out), "--config.study.steps_per_task=0"]) == 2
  assert capsys.readouterr().err.startswith("error: study.steps_per_task: expected a positive")
  assert not out.exists()  # nothing written


@pytest.mark.parametrize("dotted, field", [
    ({"study.steps_per_task": -1}, "study.steps_per_task"),
    ({"study.eval_every": 0}, "study.eval_every"),
    ({"study.seeds": ()}, "study.seeds"),
    ({"study.seeds": (0, 1, 0)}, "study.seeds"),
    ({"study.targets": {"reverse": 0.5, "sorting": 0.5}}, "study.targets.sorting"),
    ({"study.metric": ""}, "study.metric"),
])
def test_bad_study_settings_name_the_field(dotted, field):
  base = tiny_config()
  arms.validate_study_config(base)  # the defaults are fine
  arms.validate_study_config(base.replace(**{"study.targets": {"reverse": 0.5}}))
  with pytest.raises(BadInputError) as e:
    arms.validate_study_config(base.replace(**dotted))
  assert e.value.field == field


@pytest.mark.parametrize("name", [n for n in STUDIES if STUDIES[n].comparisons])
def test_an_unknown_primary_comparison_exits_2_before_training(name, tmp_path, capsys,
                                                               monkeypatch):
  from mtjax import recipes
  monkeypatch.setattr(recipes, "run", _no_training)
  out = tmp_path / name
  assert cli.main(["experiment", name, "--config", f"{REPO}/configs/{name}.py:tiny", "--workdir",
                   str(out), "--config.study.primary=no_such_comparison"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: study.primary: expected one of ") and STUDIES[name].default_primary in err
  assert not out.exists()


def test_structured_first_gives_every_task_the_joint_arms_examples():
  """Per task, the expected examples = sum over stages of stage steps x the task's rate share;
  the joint arm gives each of K tasks steps / K. By hand for 2 structured + 2 open-ended tasks,
  600 steps: stage 1 (150 steps) structured only, then weights 1, 1, 2, 2 (450 steps)."""
  from mtjax.experiments import entropy
  tasks, structured = ["copy", "reverse", "grammar", "template"], ["copy", "reverse"]
  for steps in (600, 601, 1200):
    stages = entropy.structured_first_stages(tasks, structured, steps)
    bounds = [s for s, _ in stages] + [steps]
    got = {t: sum((bounds[i + 1] - bounds[i]) * w.get(t, 0.0) / sum(w.values())
                  for i, (_, w) in enumerate(stages)) for t in tasks}
    for t in tasks:
      assert got[t] == pytest.approx(steps / len(tasks), abs=0.5), (steps, got)
  assert entropy.structured_first_stages(tasks, structured, 600) == [
      (0, {"copy": 1.0, "reverse": 1.0}),
      (150, {"copy": 1.0, "reverse": 1.0, "grammar": 2.0, "template": 2.0})]


@pytest.mark.parametrize("name", list(STUDIES))
def test_preempted_arm_is_not_done_and_stops_the_study(name, tmp_path, capsys, monkeypatch):
  from mtjax import recipes
  trained = []

  def preempted(cfg, workdir):
    trained.append(workdir)
    workdir.mkdir(parents=True, exist_ok=True)  # run_once made it (its request record)
    return types.SimpleNamespace(preempted=True)  # as RunResult after a SIGTERM

  monkeypatch.setattr(recipes, "run", preempted)
  out = tmp_path / name
  assert cli.main(["experiment", name, "--config", f"{REPO}/configs/{name}.py:tiny",
                   "--workdir", str(out)]) == cli.EXIT_PREEMPTED
  assert len(trained) == 1  # the study stopped at its first arm
  assert not runs.is_done(trained[0]) and trained[0].parent.parent == out
  assert "interrupted by a preemption signal" in capsys.readouterr().err
  assert not (out / "summary.json").exists() and not (out / "report.md").exists()


def test_run_once_marks_done_only_after_a_finished_run(tmp_path):
  cfg = tiny_config()
  calls = []
  finished = lambda c, w: calls.append(w)  # None: finished (a fake train_fn)
  assert runs.run_once(tmp_path / "a", cfg, finished, payload="x") is True
  assert runs.is_done(tmp_path / "a") and (tmp_path / "a" / runs.DONE).read_text() == "x"
  assert runs.run_once(tmp_path / "a", cfg, finished) is False and len(calls) == 1  # skipped
  with pytest.raises(runs.Preempted):
    runs.run_once(tmp_path / "b", cfg, lambda c, w: types.SimpleNamespace(preempted=True))
  assert not runs.is_done(tmp_path / "b")
  assert runs.run_once(tmp_path / "b", cfg, lambda c, w: types.SimpleNamespace(preempted=False))
  assert runs.is_done(tmp_path / "b")


def test_a_run_is_reused_only_for_the_config_it_was_asked_for(tmp_path):
  """A rerun into a workdir whose finished (or interrupted) arm was asked for other settings stops
  with BadInputError naming the field, before training; the same config is skipped, also after
  the study directory moved (an arm starting from a sibling's export), and runs finished before
  the record existed are reused as before."""
  study = tmp_path / "study"
  arm = study / "seed0" / "arm"
  cfg = tiny_config().replace(**{"model.pretrained": str(study / "seed0" / "base" / "export")})
  calls = []
  finished = lambda c, w: calls.append(w)
  assert runs.run_once(arm, cfg, finished)
  assert not runs.run_once(arm, cfg, finished) and len(calls) == 1
  with pytest.raises(BadInputError) as e:
    runs.run_once(arm, cfg.replace(**{"optimizer.lr": 0.5}), finished)
  assert e.value.field == str(arm) and "optimizer.lr=" in str(e.value) and "0.5" in str(e.value)
  assert len(calls) == 1
  moved = tmp_path / "moved"
  study.rename(moved)
  same = cfg.replace(**{"model.pretrained": str(moved / "seed0" / "base" / "export")})
  assert not runs.run_once(moved / "seed0" / "arm", same, finished)
  # Interrupted (not DONE) under other settings: not resumed under these.
  with pytest.raises(runs.Preempted):
    runs.run_once(tmp_path / "b", cfg, lambda c, w: types.SimpleNamespace(preempted=True))
  with pytest.raises(BadInputError):
    runs.run_once(tmp_path / "b", cfg.replace(**{"data.batch_size": 4}), finished)
  # How it is operated never makes an arm stale; an interrupted arm may be resumed to another
  # length (the trainer continues to it), a finished one was trained to its own.
  longer = cfg.replace(**{"train.steps": cfg.train.steps + 5, "train.progress": True})
  assert runs.run_once(tmp_path / "b", longer, finished) and len(calls) == 2
  assert not runs.run_once(tmp_path / "b", longer.replace(**{"train.progress": False}), finished)
  with pytest.raises(BadInputError, match="train.steps="):
    runs.run_once(tmp_path / "b", cfg, finished)
  (moved / "seed0" / "arm" / runs.REQUESTED).unlink()  # finished before the record existed
  assert not runs.run_once(moved / "seed0" / "arm", cfg.replace(**{"optimizer.lr": 0.5}), finished)


def test_stored_metrics_readers_skip_blank_lines(tmp_path):
  arm = tmp_path / "arm"
  arm.mkdir()
  (arm / "metrics.jsonl").write_text(
      '{"step": 0, "eval/a/token_accuracy": 0.1, "eval/b/token_accuracy": 0.0}\n\n'
      '{"step": 2, "train/a/entropy": 1.5}\n'
      '{"step": 4, "eval/a/token_accuracy": 0.3, "eval/b/token_accuracy": 0.2}\n  \n')
  assert arms.eval_curves(arm, "token_accuracy") == {"a": [(0, 0.1), (4, 0.3)],
                                                     "b": [(0, 0.0), (4, 0.2)]}
  assert arms.eval_series(arm, "b", "token_accuracy") == [(0, 0.0), (4, 0.2)]
  assert arms.train_series(arm, "a", "entropy") == [(2, 1.5)]
  assert arms.final_eval(arm, ["a", "b"], "token_accuracy") == {"a": 0.3, "b": 0.2}
  assert arms.eval_at(arm, 0, ["b", "a"], "token_accuracy") == [0.0, 0.1]
  with pytest.raises(BadInputError, match="missing"):
    arms.eval_curves(tmp_path / "never_ran", "token_accuracy")


def test_report_of_a_directory_that_is_no_study_exits_2(tmp_path, capsys):
  assert cli.main(["report", str(tmp_path)]) == 2
  assert "not a study directory" in capsys.readouterr().err
  (tmp_path / "study.json").write_text(json.dumps({"study": "nonexistent", "config": {}}))
  assert cli.main(["report", str(tmp_path)]) == 2
  assert "unknown study 'nonexistent'" in capsys.readouterr().err


# ------------------------------------------------------------------ instruction switch

def test_instruction_switch_rewrites_training_and_eval_examples():
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.data.loader import MixtureLoader
  from mtjax.eval.evaluate import Evaluator
  from mtjax.model import ModelSpec
  from mtjax.parallel.mesh import make_mesh
  tok = tokenizer_lib.get("byte")

  def prompts(cfg, task_id):
    batch = next(MixtureLoader.from_config(cfg, prefetch=0)).arrays
    texts = []
    for row in range(batch["inputs"].shape[0]):
      for seg in sorted(set(batch["segment_ids"][row][batch["task_ids"][row] == task_id])):
        where = (batch["segment_ids"][row] == seg) & (batch["loss_mask"][row] == 0)
        texts.append(tok.decode(batch["inputs"][row][where][1:]))  # drop BOS
    return texts

  keep = prompts(tiny_config(), 0)
  assert keep and all(t.startswith("reverse: ") for t in keep)
  empty = prompts(tiny_config(**{"data.instructions": {"reverse": "empty"}}), 0)
  assert empty and not any(t.startswith("reverse: ") for t in empty)
  # The same inputs, instruction gone (shorter prompts: more of them fit in a batch).
  assert {t.removeprefix("reverse: ") for t in keep} <= set(empty)
  wrong = prompts(tiny_config(**{"data.instructions": {"reverse": "wrong"}}), 0)
  assert wrong and all(t.startswith("add: ") for t in wrong)  # the next task's instruction
  assert {t.removeprefix("add: ") for t in wrong} & set(empty)
  assert prompts(tiny_config(**{"data.instructions": {"reverse": "wrong"}}), 1) == prompts(tiny_config(), 1)

  cfg = tiny_config(**{"data.instructions": {"addition": "empty"}})
  import jax
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  evaluator = Evaluator(cfg, None, ModelSpec.from_config(cfg.model, tok.vocab_size, "float32"), mesh, tok)
  assert all(ex.instruction == "" for ex in evaluator.examples["addition"])
  assert all(ex.instruction == "reverse: " for ex in evaluator.examples["reverse"])


def test_wrong_instruction_on_tfds_tasks_comes_from_the_next_task():
  from mtjax import tasks
  run = ("structured_copy", "structured_reverse")
  copy_ex = tasks.get("structured_copy").source.load("validation", 0).examples[0]
  reverse_ex = tasks.get("structured_reverse").source.load("train", 0).examples[0]
  assert copy_ex.instruction != reverse_ex.instruction
  rewrite = tasks.instruction_rewrite("structured_copy", "wrong", run, 0)
  assert rewrite is not None
  wrong = rewrite(copy_ex)
  assert wrong.instruction == reverse_ex.instruction
  assert (wrong.input, wrong.target) == (copy_ex.input, copy_ex.target)
  assert tasks.instruction_rewrite("structured_copy", "keep", run, 0) is None


def test_bad_instruction_mode_exits_2(tmp_path, capsys):
  assert cli.main(["train", "--config", f"{REPO}/configs/demo.py:tiny", "--workdir", str(tmp_path / "r"),
                   "--config.data.instructions.reverse=shuffled"]) == 2
  assert "data.instructions.reverse" in capsys.readouterr().err


def test_arm_configure_stages_and_mixture():
  base = tiny_config()
  seq = arms.configure(base, seed=3, steps=9, eval_every=3,
                       stages=arms.sequential_stages(["grammar", "reverse", "addition"], 3))
  assert seq.data.schedule == "stages" and seq.seed == 3 and seq.train.steps == 9
  assert [(s, dict(w)) for s, w in seq.data.stages] == [
      (0, {"reverse": 0.0, "addition": 0.0, "grammar": 1.0}),
      (3, {"reverse": 1.0, "addition": 0.0, "grammar": 0.0}),
      (6, {"reverse": 0.0, "addition": 1.0, "grammar": 0.0})]
  only = arms.configure(base, seed=0, steps=5, eval_every=5, mixture={"addition": 1.0})
  assert dict(only.data.mixture) == {"reverse": 0.0, "addition": 1.0, "grammar": 0.0}
  assert only.data.tasks == base.data.tasks  # every task stays evaluated


def test_arm_configure_narrows_tasks():
  base = tiny_config(**{"data.mixture": {"reverse": 2.0, "addition": 1.0, "grammar": 3.0},
                        "train.loss_weights": {"reverse": 0.5, "grammar": 2.0},
                        "train.entropy_coefs": {"addition": 0.1}})
  single = arms.configure(base, tasks=["grammar"], seed=1, steps=4, eval_every=2)
  assert single.data.tasks == ("grammar",) and dict(single.data.mixture) == {"grammar": 3.0}
  assert dict(single.train.loss_weights) == {"grammar": 2.0} and not single.train.entropy_coefs
  assert (single.seed, single.train.steps, single.eval.every) == (1, 4, 2)
  assert single.checkpoint.every == 0 and not single.train.progress
  pair = arms.configure(base, tasks=["addition", "reverse"], seed=1, steps=8, eval_every=2)
  assert pair.data.tasks == ("addition", "reverse")
  assert dict(pair.data.mixture) == {"addition": 1.0, "reverse": 2.0}
  assert dict(pair.train.loss_weights) == {"reverse": 0.5}
  assert dict(pair.train.entropy_coefs) == {"addition": 0.1}
  assert pair.data.schedule == "constant" and pair.data.stages == ()


# ------------------------------------------------------------------ the studies

def test_transfer_out_of_sample_tests_by_hand():
  """Two tasks, orders 0->1 and 1->0 measured on 8 fresh seeds. Omni-Thinker chose 0->1; its mean
  normalized score beats the mean of both orders by 0.05 on every seed (two-sided p = 2/256). The
  last-trained predictor (1 for the last task, 0 before) is off by 0.2 on one cell, additivity
  on two: additivity's mean error is larger by 0.05 on every seed."""
  tasks = ["a", "b"]
  def order(final, predicted, last):
    return {"final_normalized": final, "predicted": predicted, "last_trained": last}
  per_seed = [{"seed": i, "orders": {
      "a_then_b": order([0.2, 1.0], [0.0, 1.0], [0.0, 1.0]),   # mean 0.6
      "b_then_a": order([1.0, 0.0], [1.0, 0.2], [1.0, 0.0])}}  # mean 0.5 -> overall 0.55
      for i in range(8)]
  # Last-trained errors: |0-0.2|+|1-1|+|1-1|+|0-0| = 0.2 over 4 cells; additivity:
  # |0-0.2|+0+0+|0.2-0| = 0.4 over 4: additivity minus last-trained = 0.05 per seed.
  summary = {"tasks": tasks, "excluded": [], "omni_thinker": {"order": ["a", "b"]},
             "order_runs": {}, "per_seed": per_seed}
  got = transfer.tests(summary)
  chosen = got["omni_thinker-orders"]["mean normalized score"]
  assert chosen.diffs == pytest.approx((0.05,) * 8) and chosen.p == pytest.approx(2 / 256)
  assert chosen.primary and chosen.direction() == 1
  error = got["additivity-last_trained"]["mean absolute error"]
  assert error.diffs == pytest.approx((0.05,) * 8) and not error.primary
  assert transfer.last_trained_prediction(3, [2, 0, 1]).tolist() == [0.0, 1.0, 0.0]
  base = tiny_config().replace(**{"study.seeds": tuple(range(10)), "study.estimate_seeds": 3})
  assert transfer.split_seeds(base) == ([0, 1, 2], [3, 4, 5, 6, 7, 8, 9])
  assert transfer.split_seeds(base.replace(**{"study.estimate_seeds": 0})) == (
      list(range(10)), list(range(10)))


@pytest.mark.slow
def test_transfer_study_tiny(tmp_path, capsys):
  out, s = _run_study("transfer", tmp_path, capsys)
  tasks, S = s["tasks"], s["steps_per_task"]
  run = s["per_seed"][0]
  def score(arm, step):
    row = next(r for r in _rows(out / "seed0" / arm / "metrics.jsonl")
               if r["step"] == step and "eval/structured_sort/token_accuracy" in r)
    return [row[f"eval/{t}/token_accuracy"] for t in tasks]
  # init, reference and B from the arms' eval rows, independently here.
  init = [score(f"only_{t}", 0)[a] for a, t in enumerate(tasks)]
  alone = [score(f"only_{t}", S)[a] for a, t in enumerate(tasks)]
  after = np.full((len(tasks), len(tasks)), np.nan)
  for a, b in [(0, 1), (1, 0)]:
    after[a, b] = score(f"{tasks[a]}_then_{tasks[b]}", 2 * S)[a]
  np.testing.assert_allclose(run["init"], init)
  np.testing.assert_allclose(run["reference"], alone)
  B, excluded = transfer.backward_transfer(alone, after, init, s["min_gain"])
  np.testing.assert_allclose(np.asarray(run["B"], float), B)
  assert run["excluded"] == [t for t, e in zip(tasks, excluded) if e]
  # The chosen order is the best predicted one; with two tasks both orders are measured, and they
  # are the pairwise runs.
  order, method = transfer.choose_order(np.asarray(s["B_mean"], float))
  assert s["omni_thinker"] == {"order": [tasks[i] for i in order], "method": "enumerated"}
  assert sorted(s["order_runs"]) == sorted(f"{a}_then_{b}" for a, b in (tasks, tasks[::-1]))
  assert s["runs_per_seed"]["runs"] == 4 and sorted(p.name for p in (out / "seed0").iterdir()) == sorted(
      [f"only_{t}" for t in tasks] + list(s["order_runs"]))
  assert s["fwt_greedy"]["order"] == [tasks[i] for i in transfer.fwt_greedy_order(
      np.asarray(s["M_normalized_mean"], float))]
  report = (out / "report.md").read_text()
  for heading in ("## Backward transfer B[a, b]", "**Normalization.**", "## Omni-Thinker's order",
                  "## Every measured order", "**FWT-greedy**", "| ACC |", "| BWT |",
                  "## What this does not show"):
    assert heading in report
  assert "bwt_guided" not in report  # the FWT-greedy order is never called BWT
  derived = config_lib.load(str(out / "omni_thinker_schedule.py"))  # a config others can run
  assert derived.data.schedule == "stages"
  assert [max(w, key=lambda t: w[t]) for _, w in derived.data.stages] == s["omni_thinker"]["order"]
  _rebuilds_identically(out)


@pytest.mark.slow
def test_entropy_study_tiny(tmp_path, capsys):
  out, s = _run_study("entropy", tmp_path, capsys)
  reg = _rows(out / "seed0" / "joint_regularized" / "metrics.jsonl")
  coefs = [r["train/open_ended_grammar/entropy_coef"] for r in reg if "train/loss" in r]
  assert coefs and all(c == pytest.approx(s["entropy_coef"]) for c in coefs)
  assert all(r["train/structured_copy/entropy_coef"] == 0 for r in reg if "train/loss" in r)
  joint = _rows(out / "seed0" / "joint" / "metrics.jsonl")
  final = [r for r in joint if "eval/open_ended_grammar/entropy" in r][-1]
  assert s["findings"]["joint"]["open_ended_grammar"]["final_entropy"] == pytest.approx(
      final["eval/open_ended_grammar/entropy"])
  assert s["findings"]["joint"]["open_ended_grammar"]["final_distinct"] == pytest.approx(
      final["eval/open_ended_grammar/distinct@2"])
  first = [r for r in joint if "train/loss" in r][0]  # structured_first trains no grammar at first
  sf = [r for r in _rows(out / "seed0" / "structured_first" / "metrics.jsonl") if "train/loss" in r]
  assert sf[0]["data/open_ended_grammar/rate"] == 0 and first["data/open_ended_grammar/rate"] > 0
  report = (out / "report.md").read_text()
  assert "| arm | task | kind | final entropy | retained | distinct@2 | pass@1 |" in report
  assert "## Findings" in report and (out / "entropy.png").exists()
  _rebuilds_identically(out)


@pytest.mark.slow
def test_decomposition_study_tiny(tmp_path, capsys):
  out, s = _run_study("decomposition", tmp_path, capsys)
  assert len(s["tasks"]) == 8 and s["umbrella"] == "fc_umbrella"
  umbrella = [r for r in _rows(out / "seed0" / "umbrella" / "metrics.jsonl") if "train/loss" in r]
  assert all(r["data/fc_umbrella/rate"] == 1.0 for r in umbrella)
  assert all(r["data/fc_nested/rate"] == 0.0 for r in umbrella)
  final = [r for r in _rows(out / "seed0" / "granular" / "metrics.jsonl") if "eval/fc_nested/accuracy" in r][-1]
  assert s["per_seed"][0]["granular"]["accuracy"]["fc_nested"] == final["eval/fc_nested/accuracy"]
  report = (out / "report.md").read_text()
  assert "| subtask | floor | structural match: umbrella | granular | Δ |" in report
  assert all(s["floors"][t]["metric"] == "accuracy" and s["floors"][t]["floor"] is not None
             for t in s["tasks"])  # a study without targets still states its floors
  assert all(f"| {t} |" in report for t in s["tasks"])
  _rebuilds_identically(out)


@pytest.mark.slow
def test_instruction_study_tiny(tmp_path, capsys):
  out, s = _run_study("instructions", tmp_path, capsys)
  run = s["per_seed"][0]
  assert s["metric"] == "accuracy"  # greedy exact match
  for arm in ("original", "empty", "misleading", "task_id"):
    final = [r for r in _rows(out / "seed0" / arm / "metrics.jsonl") if "eval/reverse/accuracy" in r][-1]
    assert run[arm]["reverse"] == final["eval/reverse/accuracy"]
    assert run[f"{arm}/token_accuracy"]["reverse"] == final["eval/reverse/token_accuracy"]
  assert json.loads((out / "seed0" / "empty" / "config.json").read_text())["data"]["instructions"] == {
      "reverse": "empty", "addition": "empty"}
  assert json.loads((out / "seed0" / "misleading" / "config.json").read_text())["data"]["instructions"] == {
      "reverse": "misleading", "addition": "misleading"}
  assert "zero_shot" not in run  # from scratch: no held-out-task arms
  report = (out / "report.md").read_text()
  assert json.loads((out / "seed0" / "task_id" / "config.json").read_text())["data"]["instructions"] == {
      "reverse": "task_id", "addition": "task_id"}
  assert ("| task | floor | original | empty | Δ empty | misleading | Δ misleading | task_id | "
          "Δ task_id | empty-prompt ambiguity | same format |" in report)
  # reverse and addition share no input format: the in-distribution cap is 1 (k = 1 each).
  assert s["ambiguity"]["cap_in_distribution"] == [1.0]
  assert f"| reverse | {s['floors']['reverse']['floor']:.3f} |" in report
  assert "capped by that ambiguity" in report
  assert set(s["ambiguity"]["fraction"]) == {"reverse", "addition"}
  delta = run["empty"]["addition"] - run["original"]["addition"]
  assert f"{delta:.3f} ± 0.000" in report.split("| addition |")[1].split("\n")[0]
  _rebuilds_identically(out)


def test_experiments_import_graph_is_acyclic():
  """registry -> study modules -> shared helpers, never back (function-level imports included)."""
  import ast
  pkg = REPO / "mtjax" / "experiments"
  modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
  graph = {}
  for name in modules:
    deps = set()
    for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
      module = getattr(node, "module", None) or ""
      if isinstance(node, ast.ImportFrom) and module == "mtjax.experiments":
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and module.startswith("mtjax.experiments."):
        deps.add(module.split(".")[2])
      elif isinstance(node, ast.Import):
        deps |= {a.name.split(".")[2] for a in node.names
                 if a.name.startswith("mtjax.experiments.")}
    graph[name] = deps & modules
  order, visiting = [], set()

  def visit(name, path):
    assert name not in visiting, f"import cycle: {' -> '.join(path + [name])}"
    if name in order:
      return
    visiting.add(name)
    for dep in sorted(graph[name]):
      visit(dep, path + [name])
    visiting.discard(name)
    order.append(name)

  for name in sorted(modules):
    visit(name, [])
  assert graph["registry"] >= {"efficiency", "transfer", "entropy", "decomposition", "instructions"}
  # findings renders the README from the registry's report functions: a consumer, like the CLI.
  assert not any("registry" in deps for name, deps in graph.items() if name != "findings")
