"""BFCL as built-in tasks, and `bfcl_correct` against BFCL's own AST checker (the acceptance test).

The bfcl-eval wheel is fetched once per session (bfcl.fetch(): a download on first use, then the
cache); a failed download FAILS these tests. Its ast_checker is imported from the unpacked wheel
as the reference, never installed.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import subprocess
import sys
import types
from typing import Any

import pytest

from mtjax.errors import BadInputError
from mtjax.tasks import Example, bfcl, scoring
from mtjax.tasks import get as get_task
from mtjax.tasks.function_calling import bfcl_correct, infer_category, parse_calls

# mtjax category -> (BFCL data file stem, BFCL's test category string)
CATEGORIES = {
    "simple": ("simple_python", "simple_python"),
    "multiple": ("multiple", "multiple"),
    "parallel": ("parallel", "parallel"),
    "parallel_multiple": ("parallel_multiple", "parallel_multiple"),
    "irrelevance": ("irrelevance", "irrelevance"),
}
MODEL = "mtjax"  # the stubbed MODEL_CONFIG_MAPPING below knows it: it does not rename functions


@pytest.fixture(scope="module")
def bfcl_dir():
  return bfcl.fetch(quiet=True)  # raises (the test fails) when it cannot download


@pytest.fixture(scope="module")
def reference(bfcl_dir, tmp_path_factory):
  """BFCL's ast_checker, Language and is_empty_output, imported from the unpacked wheel.

  Stubs: ast_checker imports bfcl_eval.constants.model_config only for MODEL_CONFIG_MAPPING
  (convert_func_name's underscore_to_dot), but that module imports every model handler and their
  provider SDKs; a stub module gives one config, for MODEL, that keeps names as given.
  bfcl_eval.utils (is_empty_output) imports eval_config, which creates result/score/lock
  directories under BFCL_PROJECT_ROOT at import: pointed at a temporary directory."""
  saved_modules = set(sys.modules)
  saved_root = os.environ.get("BFCL_PROJECT_ROOT")
  os.environ["BFCL_PROJECT_ROOT"] = str(tmp_path_factory.mktemp("bfcl_project_root"))
  stub = types.ModuleType("bfcl_eval.constants.model_config")
  stub.MODEL_CONFIG_MAPPING = {MODEL: types.SimpleNamespace(underscore_to_dot=False)}  # type: ignore[attr-defined]
  sys.path.insert(0, str(bfcl_dir))
  sys.modules["bfcl_eval.constants.model_config"] = stub
  try:
    checker = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
    enums = importlib.import_module("bfcl_eval.constants.enums")
    utils = importlib.import_module("bfcl_eval.utils")
    yield types.SimpleNamespace(ast_checker=checker.ast_checker, python=enums.Language.PYTHON,
                                is_empty_output=utils.is_empty_output)
  finally:
    sys.path.remove(str(bfcl_dir))
    for name in set(sys.modules) - saved_modules:
      if name.startswith("bfcl_eval"):
        del sys.modules[name]
    if saved_root is None:
      os.environ.pop("BFCL_PROJECT_ROOT", None)
    else:
      os.environ["BFCL_PROJECT_ROOT"] = saved_root


def _load(bfcl_dir, stem: str) -> list[dict[str, Any]]:
  data = bfcl_dir / "bfcl_eval" / "data"
  questions = [json.loads(line) for line in (data / f"BFCL_v4_{stem}.json").read_text().splitlines()
               if line.strip()]
  if stem != "irrelevance":
    keys = {r["id"]: r["ground_truth"] for r in
            (json.loads(line) for line in
             (data / "possible_answer" / f"BFCL_v4_{stem}.json").read_text().splitlines()
             if line.strip())}
    for q in questions:
      q["ground_truth"] = keys[q["id"]]
  return questions


# ----------------------------------------------------------------------------- candidates


def _wrong(value: Any) -> Any:
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value + 1.5
  if isinstance(value, str):
    return value + " zzz"
  if isinstance(value, list):
    return value + value[:1] if value else ["zzz"]
  if isinstance(value, dict):
    return {**value, "zzz": 1}
  return "zzz"


def _candidates(q: dict[str, Any], category: str):
  """(kind, calls) pairs: the key's first answer and its perturbations."""
  out = []
  if category == "irrelevance":
    doc = q["function"][0]
    some_args = {p: "x" for p in doc["parameters"].get("required", [])}
    return [("empty", []), ("call_no_args", [{"name": doc["name"], "arguments": {}}]),
            ("call", [{"name": doc["name"], "arguments": some_args}]),
            ("text", "I cannot help with that."), ("fenced_empty", "```json\n[]\n```")]
  key = q["ground_truth"]
  base = [bfcl.first_call(a, q["function"]) for a in key]
  out.append(("first", base))
  out.append(("empty", []))
  props = {d["name"]: d["parameters"]["properties"] for d in q["function"]}

  def edited(i: int, fn):
    calls = json.loads(json.dumps(base))
    fn(calls[i])
    return calls

  out.append(("wrong_name", edited(0, lambda c: c.update(name=c["name"] + "_x"))))
  out.append(("extra_argument", edited(0, lambda c: c["arguments"].update(mtjax_extra=1))))
  if len(base) > 1:
    out.append(("reordered", base[::-1]))
    out.append(("one_call_missing", base[1:]))
  out.append(("duplicated_call", base + base[:1]))
  for i, answer in enumerate(key):
    (name, params), = answer.items()
    schema = props.get(name, {})
    given = base[i]["arguments"]
    for p, accepted in params.items():
      t = schema.get(p, {}).get("type")
      if p in given:
        first = given[p]
        out.append(("wrong_value", edited(i, lambda c, p=p, v=first: c["arguments"].update({p: _wrong(v)}))))
        kind = "missing_optional" if "" in accepted else "missing_required"
        out.append((kind, edited(i, lambda c, p=p: c["arguments"].pop(p))))
      else:
        first = None
        if p in schema and accepted and accepted[-1] != "":  # left out: give one anyway
          out.append(("optional_given", edited(
              i, lambda c, p=p, v=accepted[-1], t=schema[p]: c["arguments"].update({p: bfcl._value(v, t)}))))
      if type(first) is int:
        out.append(("int_as_string", edited(i, lambda c, p=p, v=first: c["arguments"].update({p: str(v)}))))
      if type(first) is bool:
        out.append(("bool_as_int", edited(i, lambda c, p=p, v=first: c["arguments"].update({p: int(v)}))))
      if type(first) is float and first.is_integer() and t == "float":
        out.append(("float_as_int", edited(i, lambda c, p=p, v=first: c["arguments"].update({p: int(v)}))))
      if type(first) is str and first:
        out.append(("case_changed", edited(i, lambda c, p=p, v=first: c["arguments"].update({p: v.swapcase()}))))
        out.append(("punctuation_changed", edited(
            i, lambda c, p=p, v=first: c["arguments"].update({p: v.replace(" ", "").replace(",", ", ") + "."}))))
      if type(first) is list and len(first) > 1:
        out.append(("list_reversed", edited(i, lambda c, p=p, v=first: c["arguments"].update({p: v[::-1]}))))
      if type(first) is list and first and all(type(x) is str for x in first):
        out.append(("list_case_changed", edited(
            i, lambda c, p=p, v=first: c["arguments"].update({p: [x.upper() for x in v]}))))
      if type(first) is dict and first:
        out.append(("dict_key_dropped", edited(
            i, lambda c, p=p, v=first: c["arguments"].update({p: dict(list(v.items())[1:])}))))
      if len(accepted) > 1:
        second = accepted[1]
        if second == "":
          out.append(("other_accepted", edited(i, lambda c, p=p: c["arguments"].pop(p, None))))
        else:
          prop = schema.get(p, {})
          out.append(("other_accepted", edited(
              i, lambda c, p=p, v=second, t=prop: c["arguments"].update({p: bfcl._value(v, t)}))))
  # Names with dots: the underscore form BFCL uses for some providers is not the name mtjax shows.
  if "." in base[0]["name"]:
    out.append(("dots_as_underscores", edited(0, lambda c: c.update(name=c["name"].replace(".", "_")))))
  return out


def _reference_verdict(ref, q, category: str, candidate) -> bool:
  """BFCL's verdict on a candidate in mtjax's format: decode it to BFCL's form ([{name: args}]),
  then eval_runner's rules: irrelevance = no call decoded (is_empty_output); the AST categories =
  decodes, is in function-calling format, and passes ast_checker."""
  calls = parse_calls(candidate) if isinstance(candidate, str) else candidate
  decoded = None if calls is None else [{c["name"] if isinstance(c, dict) else c[0]:
                                         c["arguments"] if isinstance(c, dict) else c[1]}
                                        for c in calls]
  if category == "irrelevance":
    return decoded is None or ref.is_empty_output(decoded)
  if decoded is None:
    return False
  result = ref.ast_checker(q["function"], decoded, q["ground_truth"], ref.python,
                           CATEGORIES[category][1], MODEL)
  return bool(result["valid"])


def test_agreement_with_bfcl_ast_checker(bfcl_dir, reference):
  counts: collections.Counter[str] = collections.Counter()
  agree = 0
  disagreements = []
  verdicts: collections.Counter[tuple[str, bool]] = collections.Counter()
  for category, (stem, _) in CATEGORIES.items():
    for q in _load(bfcl_dir, stem):
      for kind, candidate in _candidates(q, category):
        # Through the JSON text (mtjax's format) for bfcl_correct; BFCL gets the same values.
        text = candidate if isinstance(candidate, str) else json.dumps(candidate)
        try:
          want = _reference_verdict(reference, q, category, json.loads(json.dumps(candidate))
                                    if not isinstance(candidate, str) else candidate)
        except Exception as e:  # BFCL crashed on it
          want = f"reference raised {type(e).__name__}: {e}"
        got = bfcl_correct(text, functions=q["function"], answers=q.get("ground_truth", []),
                           category=category)
        counts[kind] += 1
        verdicts[(kind, got)] += 1
        if got is want:
          agree += 1
        else:
          disagreements.append(f"{kind} {q['id']}: mtjax={got} bfcl={want} candidate={text[:200]}")
  total = sum(counts.values())
  summary = (f"{total} candidates, {agree} agree ({100 * agree / total:.2f}%); by kind "
             f"(kind: n, accepted by mtjax): "
             + ", ".join(f"{k}: {n} ({verdicts[(k, True)]})" for k, n in sorted(counts.items())))
  print(summary)
  by_reason = collections.Counter(d.split(" ", 1)[0] for d in disagreements)
  assert agree >= 0.99 * total, f"{summary}\ndisagreements by kind: {dict(by_reason)}\n" + \
      "\n".join(disagreements)
  assert total > 20000 and verdicts[("first", True)] == 1000, summary
  for line in disagreements:  # listed (pytest -s) even within the 1% allowance
    print(line)


# ----------------------------------------------------------------------------- unit tests

AREA = {"name": "area", "description": "", "parameters": {"type": "dict", "properties": {
    "base": {"type": "float"}, "unit": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "exact": {"type": "boolean"}}, "required": ["base"]}}
AREA_KEY = [{"area": {"base": [10.0], "unit": ["cm", ""], "tags": [["a", "b"], ""], "exact": ["", False]}}]


def _ok(output, answers=AREA_KEY, functions=(AREA,), category="simple"):
  return bfcl_correct(output, functions=list(functions), answers=answers, category=category)


def test_int_for_float_and_optional_arguments():
  assert _ok('[{"name": "area", "arguments": {"base": 10}}]')  # int accepted for float
  assert _ok('[{"name": "area", "arguments": {"base": 10.0, "unit": "CM"}}]')  # case-insensitive
  assert _ok([{"name": "area", "arguments": {"base": 10.0, "tags": ["A", "b"], "exact": False}}])
  assert not _ok('[{"name": "area", "arguments": {"base": "10"}}]')  # a string is not a float
  assert not _ok('[{"name": "area", "arguments": {"base": 10, "exact": 0}}]')  # 0 is not a bool
  assert not _ok('[{"name": "area", "arguments": {"unit": "cm"}}]')  # required base missing
  assert not _ok('[{"name": "area", "arguments": {"base": 10, "other": 1}}]')  # unexpected
  assert not _ok('[{"name": "area", "arguments": {"base": 10, "tags": ["b", "a"]}}]')  # list order
  key = [{"area": {"base": [10.0], "unit": ["cm"]}}]  # no "": unit must be given
  assert not _ok('[{"name": "area", "arguments": {"base": 10}}]', answers=key)
  assert not _ok('[{"name": "Area", "arguments": {"base": 10}}]')  # names exactly as given


def test_parallel_is_order_free_and_multiple_picks_the_keyed_function():
  key = [{"area": {"base": [1.0]}}, {"area": {"base": [2.0]}}]
  one, two = ({"name": "area", "arguments": {"base": b}} for b in (1, 2))
  assert _ok([one, two], answers=key, category="parallel")
  assert _ok([two, one], answers=key, category="parallel")
  assert not _ok([one, one], answers=key, category="parallel")
  assert not _ok([one], answers=key, category="parallel")
  other = {"name": "other", "description": "", "parameters": {
      "type": "dict", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
  assert _ok([two], answers=key[1:], functions=(other, AREA), category="multiple")
  assert not _ok([{"name": "other", "arguments": {"x": 2}}], answers=key[1:],
                 functions=(other, AREA), category="multiple")
  assert not _ok([two, two], answers=key[1:], functions=(other, AREA), category="multiple")


def test_irrelevance_is_right_when_no_call_decodes():
  for output in ("[]", " []\n", "```json\n[]\n```", "I cannot help with that.", "{}", "[{}]", ""):
    assert _ok(output, answers=[], category="irrelevance"), output
  assert not _ok('[{"name": "area", "arguments": {}}]', answers=[], category="irrelevance")
  assert not _ok('```\n[{"name": "x", "arguments": {"a": 1}}]\n```', answers=[],
                 category="irrelevance")


def test_lenient_only_where_bfcl_is():
  call = '[{"name": "area", "arguments": {"base": 10}}]'
  for ok in (call, f"  {call}\n", f"```json\n{call}\n```", f"```\n{call}\n```"):
    assert _ok(ok), ok
  for bad in ('{"name": "area", "arguments": {"base": 10}}',  # not a list
              f"Here you go: {call}", f"{call} done", call.replace('"', "'"),  # prose, not JSON
              "[area(base=10)]",  # BFCL's Python syntax is not mtjax's format
              '[{"area": {"base": 10}}]',  # BFCL's decoded form
              '[{"name": "area", "arguments": {"base": 10}, "id": 1}]',  # an extra key
              '[{"name": "area", "arguments": "{\\"base\\": 10}"}]'):  # arguments as a string
    assert not _ok(bad), bad
  with pytest.raises(ValueError, match="unknown BFCL category"):
    _ok(call, category="simple_python")


def test_scorer_reads_a_jsonl_style_record():
  scorer = scoring.get_scorer("bfcl")
  assert "bfcl" in scoring.BUILTIN
  record = {"id": "mine_0", "function": [AREA], "ground_truth": AREA_KEY}  # no category: inferred
  example = Example("", "prompt", "target", meta=record)
  assert scorer(example, '[{"name": "area", "arguments": {"base": 10}}]')
  assert not scorer(example, "[]")
  irrelevant = Example("", "prompt", "[]", meta={"function": [AREA]})
  assert scorer(irrelevant, "[]") and not scorer(irrelevant, '[{"name": "area", "arguments": {}}]')
  assert infer_category([AREA], AREA_KEY * 2) == "parallel"
  assert infer_category([AREA, AREA], AREA_KEY * 2) == "parallel_multiple"
  assert infer_category([AREA, AREA], AREA_KEY) == "multiple"
  with pytest.raises(BadInputError, match="function"):
    scorer(Example("", "p", "t", meta={"ground_truth": AREA_KEY}), "[]")


# ----------------------------------------------------------------------------- tasks


def test_tasks_are_registered_eval_only_with_all_questions(bfcl_dir):
  del bfcl_dir  # fetched
  sizes = {"bfcl_simple": 400, "bfcl_multiple": 200, "bfcl_parallel": 200,
           "bfcl_parallel_multiple": 200, "bfcl_irrelevance": 240}
  for name, size in sizes.items():
    task = get_task(name)
    assert task.eval_only and task.scorer == "bfcl" and task.is_correct is scoring.get_scorer("bfcl")
    examples = task.source.load("validation", 0).examples
    assert len(examples) == size, name
    # The target (the key's first answer) is right by the task's own scorer.
    assert all(task.is_correct(ex, ex.target) for ex in examples), name
    assert examples[0].instruction == bfcl.INSTRUCTION
    assert examples[0].input.startswith("functions: [{") and "\nuser: " in examples[0].input
    assert set(examples[0].meta) == {"id", "function", "ground_truth", "category"}
    with pytest.raises(BadInputError, match="eval-only"):
      task.source.load("train", 0)
  ex = get_task("bfcl_simple").source.load("validation", 0).examples[1]
  assert ex.meta["id"] == "simple_python_1"
  assert json.loads(ex.target) == [{"name": "math.factorial", "arguments": {"number": 5}}]
  assert ex.input.endswith("\nuser: Calculate the factorial of 5 using math functions.\n")
  assert get_task("bfcl_irrelevance").source.load("validation", 0).examples[0].target == "[]"


def test_fetch_failure_is_one_clear_line(tmp_path, monkeypatch):
  target = tmp_path / "cache" / "bfcl"
  monkeypatch.setenv("MTJAX_BFCL_DIR", str(target))
  # A "python" whose pip fails as it does offline.
  fake = tmp_path / "python"
  fake.write_text("#!/bin/sh\necho 'WARNING: Retrying ...' >&2\n"
                  "echo 'ERROR: No matching distribution found for bfcl-eval==2026.3.23' >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(fake))
  with pytest.raises(BadInputError) as e:
    bfcl.fetch(quiet=True)
  message = str(e.value)
  assert "cannot download bfcl-eval==2026.3.23: ERROR: No matching distribution" in message
  assert "mtjax data fetch bfcl" in message and "MTJAX_BFCL_DIR" in message and "\n" not in message
  assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written
  monkeypatch.setattr(sys, "executable", str(tmp_path / "missing"))  # pip cannot even start
  with pytest.raises(BadInputError, match="cannot download .*: cannot run pip"):
    bfcl.fetch(quiet=True)


def test_importing_mtjax_does_not_fetch(tmp_path):
  target = tmp_path / "bfcl"
  env = {**os.environ, "MTJAX_BFCL_DIR": str(target)}
  subprocess.run([sys.executable, "-c", "import mtjax.tasks as t; t.get('bfcl_simple')"],
                 env=env, check=True, timeout=120)
  assert not target.exists()


def test_fetch_uses_an_unpacked_wheel_in_mtjax_bfcl_dir(bfcl_dir, monkeypatch):
  monkeypatch.setenv("MTJAX_BFCL_DIR", str(bfcl_dir))
  assert bfcl.fetch(quiet=True) == bfcl_dir
  monkeypatch.setenv("MTJAX_BFCL_DIR", str(bfcl_dir / "bfcl_eval"))  # the package itself
  assert bfcl.fetch(quiet=True) == bfcl_dir


def test_an_answer_without_ground_truth_is_one_error_line(tmp_path, monkeypatch):
  """A possible_answer record without its ground_truth list (a damaged or edited file) names the
  file and the answer, instead of a KeyError traceback."""
  root = tmp_path / "wheel"
  (root / bfcl._MARKER).parent.mkdir(parents=True, exist_ok=True)
  (root / bfcl._MARKER).write_text("")
  data = root / "bfcl_eval" / "data"
  (data / "possible_answer").mkdir(parents=True)
  _, filename, _ = bfcl.TASKS["bfcl_simple"]
  question = {"id": "simple_0", "question": [[{"role": "user", "content": "add 1 and 2"}]],
              "function": [{"name": "add", "description": "add", "parameters": {
                  "type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}]}
  (data / filename).write_text(json.dumps(question) + "\n")
  (data / "possible_answer" / filename).write_text(json.dumps({"id": "simple_0"}) + "\n")
  monkeypatch.setenv("MTJAX_BFCL_DIR", str(root))
  bfcl.examples.cache_clear()
  try:
    with pytest.raises(BadInputError) as e:
      bfcl.examples("bfcl_simple")
    assert str(e.value).startswith(str(data / "possible_answer" / filename))
    assert "answer 'simple_0': expected a ground_truth list" in str(e.value)
  finally:
    bfcl.examples.cache_clear()
