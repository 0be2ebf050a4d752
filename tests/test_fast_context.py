"""The discrete fast channel in training (issue 21): the instruction search's texts fed to the
loader from step s + feedback_lag (and replayed exactly by a restored loader), to the evaluator,
candidates scored against a numpy computation with the model's logits, bad settings named, and
a killed run with the search on resumed exactly (search state and instruction schedule included)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DEMO, sigkill_resume_runs, tiny_config
from mtjax import config as config_lib
from mtjax.data import pipeline
from mtjax.data.loader import MixtureLoader, select
from mtjax.errors import BadInputError
from mtjax.train import setup as setup_lib


def test_searched_instruction_keeps_the_prompt_format():
  assert pipeline.searched_instruction("Reverse the string: ", "Flip   it") == "Flip it "
  assert pipeline.searched_instruction("Add:\n", "Sum these") == "Sum these\n"
  assert pipeline.searched_instruction("Add:\n", "  ") == ""
  assert pipeline.searched_instruction("", "Do it") == "Do it"


def _prompts(batch, loader, cfg):
  slots = select(batch.plan, loader._indexes, 0, cfg.data.batch_size)
  return [(cfg.data.tasks[t], p) for t, p in zip(slots.task.tolist(), slots.prompts)]


def test_the_loader_feeds_an_instruction_from_its_step_and_replays_it_after_a_restore():
  cfg = tiny_config()
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  batches = [next(loader) for _ in range(2)]
  effective = loader.set_instruction("reverse", "Flip it now")
  assert effective == 2 + loader.feedback_lag
  saved, restored_at = None, effective - 1
  for step in range(2, effective + 3):
    if step == restored_at:
      saved = json.loads(json.dumps(loader.state))  # as a checkpoint stores it
    batches.append(next(loader))
  for b in batches:
    reverse = [p for t, p in _prompts(b, loader, cfg) if t == "reverse"]
    assert reverse, b.step
    assert all(p.startswith("Flip it now") for p in reverse) == (b.step >= effective), b.step
    assert not any(p.startswith("Flip it now") for t, p in _prompts(b, loader, cfg) if t != "reverse")
  again = MixtureLoader.from_config(cfg, prefetch=0, state=saved)
  for b in batches[restored_at:]:
    c = next(again)
    assert c.step == b.step
    for k in b.arrays:
      np.testing.assert_array_equal(c.arrays[k], b.arrays[k], err_msg=f"{k} at step {b.step}")


def test_candidates_are_scored_by_their_targets_log_likelihood():
  from mtjax.eval.heldout import heldout_examples
  from mtjax.recipes.fast_context import TuningScorer
  cfg = tiny_config(**{"model.dtype": "float32", "eval.batch_size": 8})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  examples = {t: heldout_examples(cfg, t, 5) for t in cfg.data.tasks}
  scorer = TuningScorer(cfg, run.graphdef, run.mesh, run.tokenizer, examples,
                        {t: i for i, t in enumerate(cfg.data.tasks)})
  texts = ["Flip it", "reverse this string please", ""]
  got = scorer(run.state.params, "reverse", texts)
  model = nnx.merge(run.graphdef, jax.device_get(run.state.params))
  tok = pipeline.Tokenize(run.tokenizer, cfg.data.tasks.index("reverse"))
  for text, score in zip(texts, got):  # numpy: each example alone, its target tokens' log-probs
    total, count = 0.0, 0
    for ex in examples["reverse"]:
      ex = pipeline.dataclasses.replace(
          ex, instruction=pipeline.searched_instruction(ex.instruction, text))
      item = tok.map(ex)
      ids, start = item["tokens"], item["target_start"]
      n = len(ids) - 1
      logits = np.asarray(model(jnp.asarray(ids[None, :n]), jnp.arange(n)[None],
                                jnp.ones((1, n), jnp.int32),
                                adapter_ids=jnp.full((1, n), item["task_id"])))[0].astype(np.float64)
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      for t in range(start - 1, n):  # pair t predicts token t + 1: the target and EOS
        total += logp[t, ids[t + 1]]
        count += 1
    assert score == pytest.approx(total / count, rel=1e-5, abs=1e-5), text
  assert len(set(got)) == 3  # the instruction changes the score


def test_the_evaluator_reads_the_instruction_in_effect():
  from mtjax.eval.evaluate import Evaluator
  cfg = tiny_config(**{"eval.num_examples": 4, "eval.num_generate": 2, "eval.num_samples": 0})
  run = setup_lib.build(cfg, devices=jax.devices()[:1])
  evaluator = Evaluator(cfg, run.graphdef, run.spec, run.mesh, run.tokenizer)
  own = list(evaluator.examples["reverse"])
  evaluator.set_instructions({"reverse": "Flip it"})
  assert [ex.prompt for ex in evaluator.examples["reverse"]] == [
      pipeline.searched_instruction(ex.instruction, "Flip it") + ex.input for ex in own]
  assert all(ex.prompt.startswith("Flip it") for ex in evaluator.examples["reverse"])
  assert [ex.prompt for ex in evaluator.examples["addition"]] != []
  assert not any(ex.prompt.startswith("Flip it") for ex in evaluator.examples["addition"])
  row = evaluator(run.state.params, 0)
  assert 0.0 <= row["eval/reverse/accuracy"] <= 1.0


def test_bad_instruction_search_settings_are_named():
  for overrides, field in (
      (["--config.train.instruction_search.every=-1"], "train.instruction_search.every"),
      (["--config.train.instruction_search.every=2", "--config.train.instruction_search.examples=0"],
       "train.instruction_search.examples"),
      (["--config.train.instruction_search.every=2", "--config.train.instruction_search.population=1"],
       "train.instruction_search.population"),
      (["--config.train.instruction_search.every=2", "--config.data.instructions={'reverse': 'empty'}"],
       "data.instructions")):
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
      config_lib.load(f"{DEMO}:tiny", overrides)


@pytest.mark.slow
def test_sigkill_resume_with_the_instruction_search_matches_a_straight_run(tmp_path):
  import orbax.checkpoint as ocp
  steps = 24
  args = ["--config", f"{DEMO}:tiny", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.checkpoint.every=10", "--config.train.instruction_search.every=4",
          "--config.train.instruction_search.examples=4", "--config.model.soft_prompt.length=4",
          "--config.optimizer.slow_lr_ratio=0.3", "--config.eval.every=8",
          "--config.eval.num_examples=4", "--config.eval.num_generate=2", "--config.eval.num_samples=0"]
  straight, killed = sigkill_resume_runs(tmp_path, args, steps, checkpoint_step=10, settle_s=2.0)
  rows = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  a, b = rows(straight), rows(killed)
  keys = sorted({k for r in a for k in r if k.startswith(("train/loss", "fast/", "eval/"))
                 and not k.endswith("_time_s")})
  pick = lambda rs: [[r.get(k) for k in keys] for r in rs if any(k in r for k in keys)]
  assert pick(b) == pick(a)
  assert any(k.startswith("fast/") for k in keys)
  assert (straight / "instructions.jsonl").read_text() == (killed / "instructions.jsonl").read_text()
  restore = lambda w: ocp.PyTreeCheckpointer().restore(w / "checkpoints" / str(steps) / "state")
  for x, y in zip(jax.tree.leaves(restore(straight)), jax.tree.leaves(restore(killed))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  loader = lambda w: json.loads((w / "checkpoints" / str(steps) / "loader" / "metadata").read_text())
  assert loader(straight) == loader(killed)  # the instruction schedule and the search state
  assert loader(killed)["instructions"] and loader(killed)["instruction_search"]["round"] == steps // 4
