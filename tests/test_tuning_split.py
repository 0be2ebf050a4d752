"""The tuning split: study arms report on held-out examples after the first study.tuning_examples
(eval.skip), and study.split=tuning evaluates on those first ones only. References: the task's
own validation split, sliced by hand."""

import jax
import pytest
from conftest import tiny_config

from mtjax import check, tasks
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError
from mtjax.eval.evaluate import Evaluator
from mtjax.experiments import arms
from mtjax.model import ModelSpec
from mtjax.parallel.mesh import make_mesh

N = 5


def study_config(**dotted):
  base = {"study.tuning_examples": N, "eval.num_examples": 4, "eval.num_generate": 3,
          "eval.sample_prompts": 2}
  return tiny_config(**{**base, **dotted})


def held_out(cfg, task):
  """The examples the evaluator of cfg holds for `task`."""
  tok = tokenizer_lib.get(cfg.data.tokenizer)
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  evaluator = Evaluator(cfg, None, ModelSpec.from_config(cfg.model, tok.vocab_size, "float32"), mesh, tok)
  return evaluator.examples[task]


def test_report_and_tuning_arms_evaluate_disjoint_slices_of_the_validation_split():
  base = study_config()
  report = arms.configure(base, seed=0, steps=4, eval_every=2)
  tuning = arms.configure(base.replace(**{"study.split": "tuning"}), seed=0, steps=4, eval_every=2)
  assert report.eval.skip == N and tuning.eval.skip == 0
  assert tuning.eval.num_examples == 4 and tuning.eval.num_generate == 3  # both already <= N
  wide = arms.configure(base.replace(**{"study.split": "tuning", "eval.num_examples": 50}),
                        seed=0, steps=4, eval_every=2)
  assert wide.eval.num_examples == N  # never past the tuning split
  task = base.data.tasks[0]
  validation = tasks.get(task).source.load("validation", base.seed).examples
  got_report, got_tuning = held_out(report, task), held_out(tuning, task)
  assert [ex.input for ex in got_report] == [ex.input for ex in validation[N: N + 4]]
  assert [ex.input for ex in got_tuning] == [ex.input for ex in validation[:4]]
  assert not {ex.input for ex in got_report} & {ex.input for ex in validation[:N]}


def test_without_a_tuning_split_arms_evaluate_from_the_first_example():
  cfg = arms.configure(tiny_config(), seed=0, steps=4, eval_every=2)
  assert cfg.eval.skip == 0


def test_bad_split_settings_are_refused_naming_the_field():
  with pytest.raises(BadInputError, match=r"study\.split"):
    arms.validate_study_config(tiny_config(**{"study.split": "tuning"}))  # no tuning split
  with pytest.raises(BadInputError, match=r"study\.split"):
    arms.validate_study_config(study_config(**{"study.split": "dev"}))
  with pytest.raises(BadInputError, match=r"study\.tuning_examples"):
    arms.validate_study_config(study_config(**{"study.tuning_examples": -1}))
  with pytest.raises(BadInputError, match=r"eval\.skip"):
    tiny_config(**{"eval.skip": -1})


def test_a_skip_past_the_validation_split_is_refused_at_start():
  cfg = tiny_config(**{"eval.every": 2})
  n = len(tasks.get(cfg.data.tasks[0]).source.load("validation", cfg.seed).examples)
  with pytest.raises(BadInputError, match=r"eval\.skip"):
    check.check_config(cfg.replace(**{"eval.skip": n + 1}))
