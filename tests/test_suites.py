"""Task suites: TFDS builds offline, held-out splits, generators and scorers (wrong answers rejected)."""

import json

import pytest

from mtjax import tasks
from mtjax.tasks import Example
from mtjax.tasks.suites import function_calling as fc
from mtjax.tasks.suites import open_ended


def _load(name, split="validation"):
  return tasks.get(name).source.load(split, 0).examples


@pytest.mark.parametrize("name", ["structured_copy", "structured_reverse", "structured_sort",
                                  "structured_addition", "structured_modular"])
def test_structured_targets_are_right_and_held_out(name):
  val, train = _load(name), _load(name, "train")
  assert len(val) == 3000 and len(train) == 5000
  assert not {e.prompt for e in val} & {e.prompt for e in train}
  task = tasks.get(name)
  for ex in list(val)[:50]:
    assert ex.target == STRUCTURED_ANSWER[name](ex.input.strip())
    assert task.is_correct(ex, ex.target) and not task.is_correct(ex, ex.target + "x")


def _modular(body):
  left, m = body.rstrip("=").split(" mod ")
  a, b = left.strip("()").split("*")
  return str(int(a) * int(b) % int(m))


STRUCTURED_ANSWER = {  # the right target for an input, computed independently of the suite
    "structured_copy": lambda body: body,
    "structured_reverse": lambda body: body[::-1],
    "structured_sort": lambda body: "".join(sorted(body)),
    "structured_addition": lambda body: str(sum(int(x) for x in body.rstrip("=").split("+"))),
    "structured_modular": _modular,
}


def test_open_ended_verifiers_accept_many_and_reject_wrong():
  ex = Example("two numbers that sum to: ", "57\n", "50+7")
  assert open_ended.sum_pair_ok(ex, "50+7") and open_ended.sum_pair_ok(ex, "0+57")
  assert not open_ended.sum_pair_ok(ex, "50+8") and not open_ended.sum_pair_ok(ex, "fifty")
  t = Example("fill: ", "the ADJ cat VERB a NOUN\n", "the red cat sees a dog")
  assert open_ended.template_ok(t, "the old cat hears a fox")
  assert not open_ended.template_ok(t, "the old dog hears a fox")  # a given word changed
  assert not open_ended.template_ok(t, "the cat cat hears a fox")  # wrong kind in a slot
  for name in ("open_ended_grammar", "open_ended_sum_pair", "open_ended_template"):
    task = tasks.get(name)
    assert task.open_ended
    examples = list(_load(name))[:100]
    assert all(task.is_correct(e, e.target) for e in examples)
    assert len({e.target for e in examples}) > 50  # many distinct right answers


def test_catalogue_and_held_out_apis():
  apis = fc.catalogue()
  assert len(apis) >= 200 and len({a.name.split(".")[0] for a in apis}) >= 10
  kinds = {p.kind for a in apis for p in a.params}
  assert kinds == {"string", "integer", "number", "enum", "object"}
  train_apis, held = fc.api_split()
  assert len(held) >= 50 and not {a.name for a in held} & {a.name for a in train_apis}
  held_names = {a.name for a in held}
  for kind in fc.TASKS:
    train_text = "".join(e.prompt + e.target for e in list(_load(f"fc_{kind}", "train"))[:300])
    assert not any(n + "(" in train_text for n in held_names), kind  # never seen in training
    val = list(_load(f"fc_{kind}"))[:50]
    assert all(any(n in e.prompt for n in held_names) for e in val), kind


# A right answer written differently, and a wrong answer, for every subtask.
def _variants(kind, target):
  want = json.loads(target) if kind != "response" else target
  if kind == "response":
    return target, target.replace("gave", "returned")
  if kind == "next_best":
    return json.dumps(want, indent=1), json.dumps(want + "x")
  if kind == "name_detection":
    return json.dumps(list(reversed(want))), json.dumps(want[:-1] + ["weather.get_nothing"])
  if kind == "parameter_detection":
    wrong = dict(want)
    key = sorted(wrong)[0]
    wrong[key] = "different" if not isinstance(wrong[key], str) else wrong[key] + "x"
    return json.dumps(dict(reversed(list(want.items())))), json.dumps(wrong)
  if kind == "irrelevance":
    return "[ ]", json.dumps([{"name": "maps.get_route", "arguments": {}}])
  reordered = list(reversed(want)) if kind in ("parallel", "umbrella") else want
  wrong = json.loads(target)
  wrong[0]["arguments"] = dict(wrong[0]["arguments"], extra=1)
  return json.dumps(reordered, indent=2), json.dumps(wrong)


@pytest.mark.parametrize("kind", fc.TASKS)
def test_function_calling_generator_and_scorer(kind):
  task = tasks.get(f"fc_{kind}")
  examples = list(_load(f"fc_{kind}"))[:20]
  assert len(_load(f"fc_{kind}")) == 500
  for ex in examples:
    right, wrong = _variants(kind, ex.target)
    assert task.is_correct(ex, ex.target)
    assert task.is_correct(ex, right), (kind, right)
    assert not task.is_correct(ex, wrong), (kind, wrong)
    assert not task.is_correct(ex, "not json")
  if kind == "chaining":  # order matters in a chain
    calls = json.loads(examples[0].target)
    assert not task.is_correct(examples[0], json.dumps(list(reversed(calls))))
  if kind == "nested":
    inner = json.loads(examples[0].target)[0]["arguments"]
    assert any(isinstance(v, dict) and "name" in v for v in inner.values())
  if kind == "irrelevance":
    assert all(e.target == "[]" for e in examples)


def test_suites_build_deterministically(tmp_path, monkeypatch):
  first = [e.target for e in list(_load("fc_umbrella"))[:20]]
  monkeypatch.setenv("MTJAX_DATA_DIR", str(tmp_path))  # a second, fresh build
  assert [e.target for e in list(_load("fc_umbrella"))[:20]] == first
  assert (tmp_path / "mtjax_function_calling" / "umbrella").is_dir()


REPORT_TASKS = ["reverse", "addition", "grammar", "structured_copy", "structured_reverse",
                "structured_sort", "structured_addition", "structured_modular",
                "structured_sort_desc", "open_ended_grammar", "open_ended_sum_pair",
                "open_ended_template"]
FC_TASKS = [f"fc_{k}" for k in fc.TASKS]


@pytest.mark.parametrize("name", REPORT_TASKS + FC_TASKS)
def test_report_split_is_disjoint_from_tuning_by_prompt_and_holds_100_prompts(name):
  """A study's tuning split (the first 100 validation examples) and its report split (the
  examples after them, as the evaluator picks them with eval.skip=100) share no prompt, counted
  directly; the first 200 reported examples (the studies' eval.num_examples) hold 100+ distinct
  prompts; and every generated task offers 1,000 reported examples (fc: its 500-example split)."""
  from conftest import REPO
  from mtjax import config as config_lib
  from mtjax.eval.heldout import heldout_examples
  cfg = config_lib.load(str(REPO / "configs" / "efficiency.py"), []).replace(
      **{"data.tasks": (name,), "data.mixture": {name: 1.0}, "eval.skip": 100})
  val = _load(name)
  tuning = {val[i].prompt for i in range(100)}
  report = heldout_examples(cfg, name, 1000, ablation=False)
  assert not tuning & {ex.prompt for ex in report}
  assert len({ex.prompt for ex in report[:200]}) >= 100
  assert len(report) == (1000 if name in REPORT_TASKS else len(
      [i for i in range(100, len(val)) if val[i].prompt not in tuning]))
