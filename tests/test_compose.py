"""Composing a run's SVF experts at inference (issue 20 item 3, mtjax.eval.compose) and the
expert_composition study (study ii): a known-answer CEM case, one-hot alpha against the expert
itself (merged weights and the SVF model's own routing), bad input (exit 2 naming the flag), the
JSON, the eval-only composite task, and the study's tiny variant end to end."""

import json
import os
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO
from mtjax import cli
from mtjax import tasks as task_registry
from mtjax.tasks import Example

NEW = "structured_sort_desc"


# ---------------------------------------------------------------- the held-out composite task

def test_sort_desc_is_eval_only_sort_then_reverse_with_disjoint_splits():
  task = task_registry.get(NEW)
  assert task.eval_only
  train = task.source.load("train", 0).examples
  val = task.source.load("validation", 0).examples
  for ex in list(train[:50]) + list(val[:50]):
    word = ex.input.removesuffix("\n")
    assert ex.instruction == "sort desc: " and 3 <= len(word) <= 12
    assert ex.target == "".join(sorted(word))[::-1]  # structured_sort's answer, reversed
  assert not {ex.input for ex in val} & {ex.input for ex in train}
  again = task_registry.get(NEW).source.load("validation", 0).examples
  assert [ex.prompt for ex in again[:20]] == [ex.prompt for ex in val[:20]]  # deterministic
  assert task.is_correct(val[0], val[0].target + "\n") and not task.is_correct(val[0], "x")


# ---------------------------------------------------------------- a trained tiny SVF run

@pytest.fixture(scope="module")
def svf_run(tmp_path_factory):
  """A tiny base (from scratch) exported, and a per-task SVF run from it: the study's arms."""
  from etils import epath

  from mtjax import config as config_lib
  from mtjax import recipes
  from mtjax.experiments import arms, expert_composition

  root = epath.Path(tmp_path_factory.mktemp("svf"))
  # 60 base steps: enough for non-empty greedy outputs that the experts' distortions change.
  base = config_lib.load(f"{REPO}/configs/expert_composition.py:tiny",
                         ["--config.train.progress=false", "--config.study.steps_per_task=20"])
  cfgs = expert_composition.arm_configs(base, 0, root / "export")
  base_dir = arms.run(root, "base", cfgs["base"], recipes.run)
  arms.export_once(base_dir, root / "export")
  return arms.run(root, "svf", cfgs["svf"], recipes.run)


def _composer(workdir):
  from mtjax.eval import compose
  from mtjax.train import setup
  run = setup.from_workdir(workdir)
  return run, compose.Composer(run.config, run.spec, run.mesh, run.tokenizer, run.state.params)


def _with_experts(params, logits):
  """The run's params with every `_svf_p` [layers, T, r] set to logits[t] (a value per expert)."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  for k, v in flat.items():
    if k.endswith("_svf_p"):
      rng = np.random.default_rng(len(k))
      p = np.stack([np.full(v.shape[-1], logits[t]) if np.isscalar(logits[t]) else
                    logits[t](rng, v.shape[-1]) for t in range(v.shape[1])], axis=0)
      flat[k] = jax.device_put(np.broadcast_to(p, v.shape).astype(np.float32), v.sharding)
  return traverse_util.unflatten_dict(flat, sep="/")


def test_cem_picks_the_right_expert_on_a_known_answer(svf_run):
  """Expert 0 is the base exactly (p = 30: z = 1); experts 1 and 2 keep half the singular
  directions (p = +-10 at random: a heavy distortion). The few-shot targets are the base's own
  greedy outputs, so expert 0 (and any multiple of it alone) scores exact match 1: the best single
  expert must be expert 0, and the CEM must lean on it."""
  from mtjax.eval import compose
  run, composer = _composer(svf_run)
  flip = lambda rng, r: np.where(rng.random(r) < 0.5, -10.0, 10.0)
  composer.params = _with_experts(run.state.params, [30.0, flip, flip])
  prompts = task_registry.get(NEW).source.load("train", 0).examples[:6]
  composer.max_new_tokens = 6  # the same budget for the outputs and the candidates
  data = composer.prepare(prompts)
  outputs = composer.outputs(composer.base(), data)
  fewshot = [Example(ex.instruction, ex.input, out) for ex, out in zip(prompts, outputs)]
  messages = []
  result = compose.compose(composer, NEW, fewshot, prompts, population=16, iterations=20, seed=0,
                           progress=messages.append)
  assert all(outputs), outputs  # non-empty: distortions can change them
  assert result["best_single"] == run.config.data.tasks[0]
  assert result["fewshot"]["experts"][run.config.data.tasks[0]][0] == 1.0
  assert result["fewshot"]["base"][0] == 1.0
  assert max(result["fewshot"]["experts"][t][0] for t in run.config.data.tasks[1:]) < 1.0
  # The CEM leans on the right expert: the most weight on it, and a few-shot score far above the
  # wrong experts' (exact match 1 needs the other weights near 0 exactly: a thin region that 320
  # candidates need not hit).
  wrong = max(result["fewshot"]["experts"][t][0] for t in run.config.data.tasks[1:])
  assert int(np.argmax(result["alpha"])) == 0
  assert result["fewshot"]["composed"][0] > wrong
  history = result["cem"]["history"]
  assert all(b >= a for a, b in zip(history, history[1:])) and history[-1] == result["fewshot"]["composed"]
  assert len(messages) == 20 and "CEM iteration 20/20" in messages[-1]
  # Held-out = the few-shot prompts here: base and expert 0 agree exactly.
  assert result["exact_match"]["best_single"] == result["exact_match"]["base"]
  # No recompiles per candidate: 16 x 20 CEM candidates + 3 experts + the base, a handful of compiles.
  assert result["compiles"]["merge_and_loglik"] <= 6 and result["compiles"]["generate"] <= 2


def test_one_hot_alpha_is_the_expert_itself(svf_run, capsys):
  """alpha = e_k: the merged weights are svf.merge of expert k, and greedy outputs equal the SVF
  model's own (unmerged, routed by adapter id k); the CLI writes the JSON with exact match equal to
  expert k's single-expert score."""
  from mtjax.model import svf
  run, composer = _composer(svf_run)
  tasks = run.config.data.tasks
  k = 1
  alpha = np.eye(len(tasks))[k]
  merged = composer.merged(alpha)
  with jax.set_mesh(run.mesh):
    direct = svf.merge(run.state.params, svf.select(svf.expert_vectors(run.state.params, run.spec), k))
  for (path, a), b in zip(traverse_util.flatten_dict(merged, sep="/").items(),
                          traverse_util.flatten_dict(direct, sep="/").values()):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=path)
  examples = task_registry.get(NEW).source.load("validation", 0).examples[:8]
  data = composer.prepare(examples)
  from mtjax.eval.decode import Generator
  routed = Generator(run.graphdef, run.spec, run.mesh, max_new_tokens=data.budget,
                     eos_id=run.tokenizer.eos_id, pad_id=run.tokenizer.pad_id,
                     stop_ids=run.tokenizer.stop_ids, batch_size=composer.batch_size,
                     max_len=composer.length)(run.state.params, data.prompts, adapter=k)
  assert composer.outputs(merged, data) == [run.tokenizer.decode(o[0].tokens) for o in routed]

  # Through the CLI (a subprocess on its default device).
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  done = subprocess.run([sys.executable, "-m", "mtjax", "eval", "--workdir", str(svf_run),
                         "--compose", "--task", NEW, "--alpha", "0,1,0", "--shots", "4",
                         "--examples", "8"], capture_output=True, text=True, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr
  out = json.loads((svf_run / "eval" / f"compose_{NEW}_step_{run.restored_step}.json").read_text())
  assert out["alpha"] == [0.0, 1.0, 0.0] and out["alpha_source"] == "given" and out["cem"] is None
  assert out["exact_match"]["composed"] == out["exact_match"]["experts"][tasks[k]]
  assert out["heldout"] == 8 and out["shots"] == 4
  assert f"expert {tasks[k]}" in done.stdout and "held-out exact match" in done.stdout


@pytest.mark.parametrize("args,flag", [
    (["--task", "no_such_task"], "--task"),
    (["--task", NEW, "--alpha", "0.5,0.5"], "--alpha"),
    (["--task", NEW, "--alpha", "0.5,1.5,0"], "--alpha"),
    (["--task", NEW, "--alpha", "a,b,c"], "--alpha"),
    (["--task", NEW, "--alpha", "0,0,0"], "--alpha"),
    (["--task", NEW, "--shots", "0"], "--shots"),
    ([], "--task"),
])
def test_bad_input_exits_2_naming_the_flag(svf_run, capsys, args, flag):
  assert cli.main(["eval", "--workdir", str(svf_run), "--compose", *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and flag in err and len(err.splitlines()) == 1


def test_a_run_without_svf_experts_is_refused(svf_run, capsys):
  base_dir = svf_run.parent / "base"
  assert cli.main(["eval", "--workdir", str(base_dir), "--compose", "--task", NEW]) == 2
  err = capsys.readouterr().err
  assert "--compose" in err and "SVF" in err
  assert cli.main(["eval", "--workdir", str(base_dir), "--task", NEW]) == 2  # --task needs --compose
  assert "--task" in capsys.readouterr().err


# ---------------------------------------------------------------- the study

def test_tiny_expert_composition_study_end_to_end(tmp_path, capsys):
  out = tmp_path / "ec"
  assert cli.main(["experiment", "expert_composition", "--config",
                   f"{REPO}/configs/expert_composition.py:tiny", "--workdir", str(out)]) == 0
  printed = capsys.readouterr().out
  assert f"report and plots: {out}/report.md" in printed and any(f"composed vs best single: {w}" in printed
                                                               for w in ("no detectable", "equal"))
  summary = json.loads((out / "summary.json").read_text())
  report = (out / "report.md").read_text()
  assert "## What this run does NOT show" in report and NEW in report
  seed = out / "seed0"
  assert (seed / "base_export" / "config.json").exists()
  cfg = json.loads((seed / "svf" / "config.json").read_text())
  assert cfg["model"]["svf"]["enabled"] and cfg["model"]["pretrained"] == str(seed / "base_export")
  stored = list((seed / "svf" / "eval").glob(f"compose_{NEW}_step_*.json"))
  assert len(stored) == 1
  c = json.loads(stored[0].read_text())
  s = summary["per_seed"][0]
  assert s["exact_match"] == c["exact_match"] and s["alpha"] == c["alpha"]
  assert c["cem"]["evaluations"] == 4 * 2 and c["heldout"] == 8 and c["shots"] == 4
  p = summary["findings"]["paired"]["composed_vs_best_single"]
  assert np.isclose(p["mean"], c["exact_match"]["composed"] - c["exact_match"]["best_single"])
  # `mtjax report DIR` rebuilds from the stored metrics and composition alone.
  text = report
  (out / "report.md").unlink()
  (out / "summary.json").unlink()
  assert cli.main(["report", str(out)]) == 0
  assert (out / "report.md").read_text() == text


def test_study_refuses_a_trained_task_as_the_new_task(tmp_path, capsys):
  assert cli.main(["experiment", "expert_composition", "--config",
                   f"{REPO}/configs/expert_composition.py:tiny", "--workdir", str(tmp_path / "x"),
                   "--config.study.new_task=structured_sort"]) == 2
  assert "study.new_task" in capsys.readouterr().err
