"""A numeric eval.max_new_tokens shorter than an evaluated task's longest held-out target (+ EOS)
is refused at start (exit 2, naming the task, its longest target and the budget): in `mtjax train
--check`, at the start of a run that evaluates; "auto" and a budget of exactly longest + 1 pass.

Reference: the targets' token counts from the tokenizer here, over the validation examples the
evaluator generates for (the first max(num_generate, sample_prompts) whose prompt and target fit)."""

import pytest

from conftest import DEMO, REPO, tiny_config
from mtjax import cli
from mtjax import tasks as task_registry
from mtjax import recipes
from mtjax.check import check_config, check_generation_budgets
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError


def _longest(cfg) -> dict[str, int]:
  """task -> longest generated-for target in tokens (EOS not counted), computed independently."""
  tok = tokenizer_lib.get(cfg.data.tokenizer)
  e = cfg.eval
  n = max(e.num_generate, e.sample_prompts if e.num_samples else 0)
  out = {}
  for name in cfg.data.tasks:
    examples = task_registry.get(name).source.load("validation", cfg.seed).examples[:n]
    lengths = [len(tok.encode(ex.target)) for ex in examples
               if 1 + len(tok.encode(ex.prompt)) + len(tok.encode(ex.target)) + 1 <= cfg.data.seq_len]
    out[name] = max(lengths)
  return out


def _cfg(**dotted):
  return tiny_config(**{"eval.every": 5, "eval.num_generate": 4, "eval.num_samples": 0, **dotted})


def test_budget_below_a_target_is_refused_naming_the_task():
  longest = _longest(_cfg())
  name = max(longest, key=lambda t: longest[t])  # the task with the longest target
  budget = longest[name]  # one short: the target fits, its EOS does not
  cfg = _cfg(**{"eval.max_new_tokens": budget, "eval.tasks": (name,)})
  with pytest.raises(BadInputError) as e:
    check_generation_budgets(cfg)
  message = str(e.value)
  assert e.value.field == "eval.max_new_tokens"
  assert f"{budget} new tokens" in message and repr(name) in message
  assert f"{longest[name]} tokens + EOS = {longest[name] + 1}" in message
  # Every evaluated task: the first (in eval order) whose target does not fit is named.
  cfg = _cfg(**{"eval.max_new_tokens": budget})
  first = next(t for t in cfg.data.tasks if longest[t] + 1 > budget)
  with pytest.raises(BadInputError, match=repr(first)):
    check_generation_budgets(cfg)


def test_exactly_longest_plus_eos_and_auto_pass():
  longest = max(_longest(_cfg()).values())
  facts = check_generation_budgets(_cfg(**{"eval.max_new_tokens": longest + 1}))
  assert len(facts) == 3 and all(f"eval.max_new_tokens={longest + 1}" in f for f in facts)
  assert check_generation_budgets(_cfg(**{"eval.max_new_tokens": "auto"})) == []
  assert check_generation_budgets(_cfg(**{"eval.max_new_tokens": 1, "eval.num_generate": 0})) == []
  assert any("longest generated target" in f
             for f in check_config(_cfg(**{"eval.max_new_tokens": longest + 1})))


def test_train_check_and_run_start_exit_2(tmp_path, capsys):
  longest = max(_longest(_cfg()).values())
  over = ["--config.eval.every=5", "--config.eval.num_generate=4", "--config.eval.num_samples=0",
          f"--config.eval.max_new_tokens={longest}"]
  assert cli.main(["train", "--check", "--config", f"{DEMO}:tiny", *over]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: eval.max_new_tokens:") and f"{longest + 1}" in err
  # At run start: refused before anything is written.
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", str(workdir), *over]) == 2
  assert "eval.max_new_tokens" in capsys.readouterr().err
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()
  with pytest.raises(BadInputError):
    recipes.run(_cfg(**{"eval.max_new_tokens": longest}), tmp_path / "api")


@pytest.mark.parametrize("name", ["entropy", "decomposition", "copy_reverse", "instructions"])
def test_shipped_configs_pass_the_budget_check(name):
  from mtjax import config as config_lib
  for variant in ("", ":tiny"):
    cfg = config_lib.load(f"{REPO}/configs/{name}.py{variant}")
    assert cfg.eval.max_new_tokens == "auto", (name, variant)
    check_generation_budgets(cfg)
