"""The transfer, entropy, decomposition and instruction studies: their tiny variants run through
the CLI, their summaries agree with the arms' stored metrics, their reports rebuild identically;
and the instruction switch rewrites what training and evaluation see."""

import json

import numpy as np
import pytest

from conftest import REPO, tiny_config
from mtjax import cli
from mtjax import config as config_lib
from mtjax.experiments import arms, transfer


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
  report = (out / "report.md").read_text()
  (out / "report.md").unlink()
  assert cli.main(["report", str(out)]) == 0
  assert (out / "report.md").read_text() == report


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
  evaluator = Evaluator(cfg, None, ModelSpec.from_config(cfg.model, 259, "cpu"), mesh, tok)
  assert all(ex.instruction == "" for ex in evaluator.examples["addition"])
  assert all(ex.instruction == "reverse: " for ex in evaluator.examples["reverse"])


def test_wrong_instruction_on_tfds_tasks_comes_from_the_next_task():
  from mtjax import tasks
  run = ("structured_copy", "structured_reverse")
  copy_ex = tasks.get("structured_copy").source.load("validation", 0).examples[0]
  reverse_ex = tasks.get("structured_reverse").source.load("train", 0).examples[0]
  assert copy_ex.instruction != reverse_ex.instruction
  wrong = tasks.instruction_rewrite("structured_copy", "wrong", run, 0)(copy_ex)
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


# ------------------------------------------------------------------ the studies

@pytest.mark.slow
def test_transfer_study_tiny(tmp_path, capsys):
  out, s = _run_study("transfer", tmp_path, capsys)
  tasks, S = s["tasks"], s["steps_per_task"]
  run = s["per_seed"][0]
  # R is read from the sequential run's eval rows after each stage, independently here.
  rows = [r for r in _rows(out / "seed0" / "sequential" / "metrics.jsonl") if "eval/structured_copy/loss" in r]
  by_step = {r["step"]: [r[f"eval/{t}/token_accuracy"] for t in tasks] for r in rows}
  np.testing.assert_allclose(run["R"], [by_step[(i + 1) * S] for i in range(len(tasks))])
  ref = np.asarray(run["reference"])
  expected = transfer.metrics(np.asarray(run["R"]) / ref, np.asarray(by_step[0]) / ref)
  assert run["metrics"] == pytest.approx(expected)
  assert run["greedy_order"] == [tasks[i] for i in transfer.greedy_order(np.asarray(run["M_normalized"]))]
  assert run["orders"]["structured_first"] == ["structured_copy", "structured_reverse", "open_ended_grammar"]
  assert run["orders"]["open_ended_first"] == ["open_ended_grammar", "structured_copy", "structured_reverse"]
  report = (out / "report.md").read_text()
  for heading in ("## Transfer matrix", "R[i, j] after stage i", "| ACC |", "| BWT |", "| FWT |",
                  "| FORGETTING |", "| joint | mixed |", "| bwt_guided |", "| open_ended_first |"):
    assert heading in report
  derived = config_lib.load(str(out / "bwt_guided_schedule.py"))  # a config others can run
  assert derived.data.schedule == "stages"
  assert [max(w, key=w.get) for _, w in derived.data.stages] == s["derived_order"]
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
  assert "| subtask | structural match: umbrella | granular | Δ |" in report
  assert all(f"| {t} |" in report for t in s["tasks"])
  _rebuilds_identically(out)


@pytest.mark.slow
def test_instruction_study_tiny(tmp_path, capsys):
  out, s = _run_study("instructions", tmp_path, capsys)
  run = s["per_seed"][0]
  for arm in ("original", "empty", "wrong"):
    final = [r for r in _rows(out / "seed0" / arm / "metrics.jsonl") if "eval/reverse/token_accuracy" in r][-1]
    assert run[arm]["reverse"] == final["eval/reverse/token_accuracy"]
  assert json.loads((out / "seed0" / "empty" / "config.json").read_text())["data"]["instructions"] == {
      "reverse": "empty", "addition": "empty"}
  report = (out / "report.md").read_text()
  assert "| task | original | empty | Δ empty | wrong | Δ wrong |" in report
  delta = run["empty"]["addition"] - run["original"]["addition"]
  assert f"{delta:.3f} ± 0.000" in report.split("| addition |")[1].split("\n")[0]
  _rebuilds_identically(out)
