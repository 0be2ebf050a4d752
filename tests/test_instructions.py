"""The instruction ablation (Kung & Peng): misleading instructions per example, the empty-arm
ambiguity, the zero-shot arms' planning and their missing-checkpoint error."""

import pathlib

import pytest

from mtjax import cli, config as config_lib, tasks
from mtjax.errors import BadInputError
from mtjax.experiments import instructions
from mtjax.tasks import Example

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = ("structured_copy", "structured_reverse", "structured_sort", "structured_addition")


def _validation(name, n=200):
  examples = tasks.get(name).source.load("validation", 0).examples
  return [examples[i] for i in range(n)]


def test_misleading_instructions_vary_within_a_task_and_never_are_its_own():
  rewrite = tasks.instruction_rewrite("structured_copy", "misleading", RUN, 0)
  assert rewrite is not None
  examples = _validation("structured_copy")
  rewritten = [rewrite(ex) for ex in examples]
  given = {ex.instruction for ex in rewritten}
  assert len(given) >= 5  # drawn per example from the pool, not one relabeling
  assert "copy: " not in given and "" not in given
  assert given <= set(tasks.misleading_pool("structured_copy", RUN, 0))
  assert all((a.input, a.target) == (b.input, b.target) for a, b in zip(rewritten, examples))
  # Other tasks' instructions, built-in ones beyond the run's included.
  assert {"reverse: ", "sort: ", "add: "} <= set(tasks.misleading_pool("structured_copy", RUN, 0))


def test_misleading_instructions_are_deterministic():
  examples = _validation("structured_reverse", 50)
  outs = []
  for _ in range(2):  # two rewrites built separately (as training and eval build theirs)
    rewrite = tasks.instruction_rewrite("structured_reverse", "misleading", RUN, 0)
    assert rewrite is not None
    outs.append([rewrite(ex) for ex in examples])
  first, again = outs
  assert [e.instruction for e in first] == [e.instruction for e in again]
  assert tasks.misleading_for("structured_reverse", RUN, 0)(examples[0]) == first[0].instruction


# Independent of tasks/rules.py: what each string instruction asks for, written out here.
_BY_HAND = {"copy: ": lambda s: s, "reverse: ": lambda s: s[::-1],
            "sort: ": lambda s: "".join(sorted(s))}


@pytest.mark.parametrize("name", ["structured_copy", "structured_reverse", "structured_sort"])
def test_a_misleading_instruction_never_gives_the_right_answer(name):
  """On every example, the drawn instruction's rule (copy, reverse, sort by hand) gives another
  answer than the target: a sorted word never gets sort's instruction on copy, a palindrome never
  copy's on reverse."""
  rewrite = tasks.instruction_rewrite(name, "misleading", RUN, 0)
  assert rewrite is not None
  examples = _validation(name, 400)
  # Words where another task's rule agrees with this one's: they must avoid that instruction.
  agree = [ex for ex in examples if any(f(ex.input.strip()) == ex.target
                                        for i, f in _BY_HAND.items() if not name.endswith(i[:-2]))]
  made = [Example("", w + "\n", {"structured_copy": w, "structured_reverse": w[::-1],
                                  "structured_sort": "".join(sorted(w))}[name])
          for w in ("abc", "aba", "cba", "aab", "xyz", "abba")]
  for ex in examples + made:
    got = rewrite(ex).instruction
    if got in _BY_HAND:
      assert _BY_HAND[got](ex.input.strip()) != ex.target, (name, ex, got)
  assert agree or made  # the rule matters on some examples


def test_task_id_instructions_are_fixed_per_task_and_name_no_rule():
  ids = {}
  for name in RUN:
    rewrite = tasks.instruction_rewrite(name, "task_id", RUN, 0)
    assert rewrite is not None
    given = {rewrite(ex).instruction for ex in _validation(name, 20)}
    assert len(given) == 1  # one string per task
    ids[name] = given.pop()
  assert len(set(ids.values())) == len(RUN)
  assert not set(ids.values()) & set(tasks.misleading_pool("structured_copy", RUN, 0))


def test_wrong_mode_still_relabels_one_to_one():
  rewrite = tasks.instruction_rewrite("structured_copy", "wrong", RUN, 0)
  assert rewrite is not None
  assert {rewrite(ex).instruction for ex in _validation("structured_copy", 20)} == {"reverse: "}


def test_ambiguity_against_a_hand_computation():
  ex = lambda ins, inp, tgt: Example(ins, inp, tgt)
  copy = [ex("copy: ", "ab\n", "ab"), ex("copy: ", "aa\n", "aa"), ex("copy: ", "cd\n", "cd"),
          ex("copy: ", "xy\n", "xy")]
  reverse = [ex("reverse: ", "ab\n", "ba"), ex("reverse: ", "aa\n", "aa"), ex("reverse: ", "cd\n", "dc")]
  got = instructions.ambiguity({"copy": copy, "reverse": reverse})
  # copy: "ab" and "cd" collide with a different reverse target ("aa" has the same one): 2/4.
  # reverse: "ab" and "cd": 2/3.
  assert got["fraction"] == {"copy": 0.5, "reverse": pytest.approx(2 / 3)}
  # Best single answer per prompt, tasks weighted 1/4 (copy) and 1/3 (reverse):
  # "ab" max(1/4, 1/3), "aa" 1/4 + 1/3, "cd" max(1/4, 1/3), "xy" 1/4; mean over the 2 tasks.
  cap = (1 / 3 + (1 / 4 + 1 / 3) + 1 / 3 + 1 / 4) / 2
  assert got["cap"] == pytest.approx(cap)
  assert got["cap"] < 1.0
  # Shapes "aa\n" (copy: all 4, reverse: all 3) are shared.
  assert got["same_format"] == {"copy": 1.0, "reverse": 1.0}
  digits = instructions.ambiguity({"copy": copy, "add": [ex("add: ", "1+2=", "3")]})
  assert digits["fraction"] == {"copy": 0.0, "add": 0.0} and digits["cap"] == 1.0
  assert digits["same_format"] == {"copy": 0.0, "add": 0.0}
  # In distribution: copy and reverse share a format (k = 2 each), add stands alone (k = 1).
  assert got["cap_in_distribution"] == pytest.approx((1 / 2 + 1 / 2) / 2)
  three = instructions.ambiguity({"copy": copy, "reverse": reverse,
                                  "add": [ex("add: ", "1+2=", "3")]})
  assert three["cap_in_distribution"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_zero_shot_arms_hold_each_task_out_once_per_mode():
  base = config_lib.load(f"{REPO}/configs/instructions.py:tiny")
  assert instructions.zero_shot_arms(base) == []  # from scratch: no held-out-task arms
  planned = instructions.zero_shot_arms(base.replace(**{"model.pretrained": "/somewhere"}))
  assert len(planned) == len(base.data.tasks) * len(instructions.ARMS)
  for name, held, mixture, modes in planned:
    assert name.startswith(f"zero_shot_{held}_")
    assert mixture[held] == 0.0
    assert all(w > 0 for t, w in mixture.items() if t != held)
    arm = name.removeprefix(f"zero_shot_{held}_")
    assert modes == {t: instructions.ARMS[arm] for t in base.data.tasks}


def test_zero_shot_without_a_checkpoint_exits_2_naming_model_pretrained(tmp_path, capsys):
  missing = tmp_path / "no_such_model"
  assert cli.main(["experiment", "instructions", "--config", f"{REPO}/configs/instructions.py:zero_shot",
                   f"--config.model.pretrained={missing}", "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert "model.pretrained" in err and str(missing) in err
  assert not (tmp_path / "w" / "seed0").exists()
  base = config_lib.load(f"{REPO}/configs/instructions.py:zero_shot").replace(
      **{"model.pretrained": str(missing)})
  with pytest.raises(BadInputError, match="model.pretrained"):
    instructions.check(base)
