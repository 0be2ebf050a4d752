"""BFCL's AST rules for single-turn function calls, on mtjax's call format: `bfcl_correct`.

mtjax's own implementation of the rules the Berkeley Function Calling Leaderboard applies in its
AST checker (bfcl_eval/eval_checker/ast_eval/ast_checker.py, the Python path; bfcl-eval is
Apache-2.0) and in its irrelevance rule (eval_runner.py), so a score computed here is the score
BFCL gives the same calls. It does not import bfcl_eval (tests/test_bfcl.py checks agreement with
it on every question of the categories below).

The output is mtjax's call format: a JSON list of {"name": str, "arguments": {...}} objects (also
accepted: that list already parsed). Only surrounding whitespace and one Markdown code fence
around it are forgiven; anything else that is not such a list decodes to "no call".

The rules, per call matched against one answer of the key (BFCL's "ground_truth": a list of
{function name: {parameter: [accepted values]}}):
- the call's name equals the function doc's name exactly (names are compared as given: BFCL
  turns "." into "_" only for models whose API forbids dots in names, and mtjax shows the docs
  unchanged, so the dotted name is the right one);
- every parameter the doc marks required is present, and every parameter given is both in the
  doc and in the answer key; a parameter the key lists must be given unless "" is one of its
  accepted values;
- types per the doc (string, integer, float, boolean, array, tuple, dict, any; "any" must be a
  string): an exact type match (True is not an integer), except an integer is accepted for a
  float; array/tuple elements are checked against the doc's `items` type (one level deep, no int
  to float there); a value of the type the answer key uses instead (BFCL's "variable" case) is
  compared as is;
- strings (also inside lists and dicts) compare after BFCL's normalization: spaces and
  `,./-_*^` removed, lowercased, ' read as "; lists compare element-wise in order; dicts key by
  key (a key whose accepted values include "" may be left out); lists of dicts position by
  position; other values must equal one accepted value (Python equality: 2 == 2.0).
Categories: "simple" one call to the (only) function; "multiple" exactly one call, checked
against the function the key names; "parallel" / "parallel_multiple" as many calls as the key,
in any order (BFCL's matcher: each answer in turn takes the first unmatched call that passes);
"irrelevance" right when the output decodes to no call (an empty list, or anything that is not a
list of calls).

Extensions beyond BFCL (its data never has them): the JSON Schema type names "number" (as
"float") and "object" (as "dict"); a missing "required" list means none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from mtjax.errors import BadInputError
from mtjax.tasks import Example, scoring

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")

# BFCL's PYTHON_TYPE_MAPPING ("any" is checked as a string), plus two JSON Schema names.
_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "boolean": bool,
                           "array": list, "tuple": list, "dict": dict, "any": str,
                           "number": float, "object": dict}
_NESTED = ("array", "tuple")
_STRIP = re.compile(r"[ ,./\-_*^]")

Call = tuple[str, dict[str, Any]]


def parse_calls(output: str | Sequence[Any]) -> list[Call] | None:
  """mtjax's call format decoded to (name, arguments) pairs, or None when it is not a list of
  {"name": str, "arguments": dict} objects (after whitespace and a code fence are stripped)."""
  if isinstance(output, str):
    try:
      value = json.loads(scoring.strip_fence(output))
    except (ValueError, RecursionError):
      return None
  else:
    value = output
  if not isinstance(value, list):
    return None
  calls = []
  for item in value:
    if not isinstance(item, dict) or set(item) != {"name", "arguments"}:
      return None
    name, arguments = item["name"], item["arguments"]
    if not isinstance(name, str) or not isinstance(arguments, dict):
      return None
    calls.append((name, arguments))
  return calls


def standardize(text: str) -> str:
  """BFCL's string normalization: no spaces or `,./-_*^`, lowercase, ' as "."""
  return _STRIP.sub("", text).lower().replace("'", '"')


def _norm(value: Any) -> Any:
  return standardize(value) if type(value) is str else value


def _answer_type(accepted: Sequence[Any]) -> type | None:
  """The type of the first accepted value that is not "" (the "optional" marker)."""
  for value in accepted:
    if value != "":
      return type(value)
  return None


def _type_ok(value: Any, accepted: Sequence[Any], expected: type,
             nested: type | None) -> tuple[bool, bool]:
  """(type is right, value is a "variable": the answer key uses another type than the doc)."""
  answer_type = _answer_type(accepted)
  variable = answer_type is not None and answer_type is not expected
  if type(value) is expected:
    if nested is None:
      return True, variable
    # Elements against the items type, for some accepted list ("" or a non-list passes).
    for option in accepted:
      if type(option) is not list or all(_type_ok(v, option, nested, None)[0] for v in value):
        return True, variable
    return False, False
  if answer_type is not None and type(value) is answer_type:
    return True, True
  return False, False


def _string_ok(value: str, accepted: Sequence[Any]) -> bool:
  return standardize(value) in [standardize(a) for a in accepted if type(a) is str]


def _list_ok(value: list, accepted: Sequence[Any]) -> bool:
  # An accepted "" (optional) reads as an empty list, as in BFCL.
  options = [[_norm(x) for x in option] for option in accepted if isinstance(option, (list, str))]
  return [_norm(v) for v in value] in options


def _dict_ok(value: Mapping[str, Any], accepted: Sequence[Any]) -> bool:
  for option in accepted:
    if not isinstance(option, dict):  # "" (optional), or not a dict: matches no dict
      continue
    if all(key in option and _norm(v) in [_norm(x) for x in option[key]]
           for key, v in value.items()) and \
        all(key in value or "" in values for key, values in option.items()):
      return True
  return False


def _list_of_dicts_ok(value: list, accepted: Sequence[Any]) -> bool:
  for option in accepted:
    if not isinstance(option, (list, str)) or len(option) != len(value):
      continue
    if all(isinstance(item, dict) and _dict_ok(item, [option[i]]) for i, item in enumerate(value)):
      return True
  return False


def _call_ok(doc: Mapping[str, Any], call: Call, answer: Mapping[str, Any]) -> bool:
  """One call against one answer ({name: {param: [accepted]}}) and the function's doc."""
  name, arguments = call
  key = next(iter(answer.values()))
  if name != doc["name"]:
    return False
  schema = doc["parameters"]
  properties = schema["properties"]
  if any(p not in arguments for p in schema.get("required", ())):
    return False
  for param, value in arguments.items():
    if param not in properties or param not in key:
      return False
    type_name = properties[param]["type"]
    if type_name not in _TYPES:
      raise ValueError(f"function {doc['name']!r}: parameter {param!r} has type {type_name!r} "
                       f"(known: {', '.join(_TYPES)})")
    expected, nested = _TYPES[type_name], None
    if type_name in _NESTED and "items" in properties[param]:
      item_type = properties[param]["items"].get("type")
      if item_type not in _TYPES:
        raise ValueError(f"function {doc['name']!r}: parameter {param!r} has items of type "
                         f"{item_type!r} (known: {', '.join(_TYPES)})")
      nested = _TYPES[item_type]
    if expected is float and type(value) is int:
      value = cast(Any, float(value))
    accepted = key[param]
    ok, variable = _type_ok(value, accepted, expected, nested)
    if not ok:
      return False
    if variable:  # compared as is
      ok = value in accepted
    elif expected is dict:
      ok = _dict_ok(value, accepted)
    elif expected is list and nested is dict:
      ok = _list_of_dicts_ok(value, accepted)
    elif expected is str:
      ok = _string_ok(value, accepted)
    elif expected is list:
      ok = _list_ok(value, accepted)
    else:
      ok = value in accepted
    if not ok:
      return False
  return all(param in arguments or "" in values for param, values in key.items())


def _doc(functions: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
  for doc in functions:
    if doc["name"] == name:
      return doc
  raise ValueError(f"the answer key calls {name!r}, which the function docs do not define")


def _answer(answer: Any) -> Mapping[str, Any]:
  if not isinstance(answer, Mapping) or len(answer) != 1 or \
      not isinstance(next(iter(answer.values())), Mapping):
    raise ValueError(f"an answer is {{function name: {{parameter: [accepted values]}}}}, got {answer!r}")
  return answer


def bfcl_correct(output: str | Sequence[Any], *, functions: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                 answers: Sequence[Mapping[str, Any]], category: str) -> bool:
  """Whether `output` (mtjax's call format) is right by BFCL's AST rules (see the module doc).

  `functions`: the question's function docs (BFCL's "function" list); `answers`: its answer key
  (BFCL's possible_answer "ground_truth"; empty for irrelevance); `category`: one of CATEGORIES.
  Raises ValueError for malformed docs or answer keys (never for a malformed output)."""
  if category not in CATEGORIES:
    raise ValueError(f"unknown BFCL category {category!r} (known: {', '.join(CATEGORIES)})")
  calls = parse_calls(output)
  if category == "irrelevance":
    return not calls
  docs = [functions] if isinstance(functions, Mapping) else list(functions)
  key = [_answer(a) for a in answers]
  if not key or not docs:
    raise ValueError(f"category {category!r} needs function docs and a non-empty answer key")
  if calls is None or len(calls) != (1 if category == "simple" else len(key)):
    return False
  if category == "simple":
    return _call_ok(docs[0], calls[0], key[0])
  if category == "multiple":
    return _call_ok(_doc(docs, next(iter(key[0]))), calls[0], key[0])
  matched: set[int] = set()
  for answer in key:  # BFCL's no-order matcher: first unmatched call that passes
    doc = _doc(docs, next(iter(answer)))
    for i, call in enumerate(calls):
      if i not in matched and _call_ok(doc, call, answer):
        matched.add(i)
        break
    else:
      return False
  return True


def infer_category(functions: Any, answers: Sequence[Any]) -> str:
  """The category a record without one has: by its number of calls and function docs."""
  docs = 1 if isinstance(functions, Mapping) else len(functions)
  if not answers:
    return "irrelevance"
  if len(answers) == 1:
    return "simple" if docs == 1 else "multiple"
  return "parallel" if docs == 1 else "parallel_multiple"


def bfcl(example: Example, output: str) -> bool:
  """The "bfcl" scorer: bfcl_correct with the record's `function`, `ground_truth` and
  `category` fields (category inferred when absent; no ground truth means irrelevance)."""
  meta = example.meta
  where = f"bfcl scorer, record {meta.get('id', '(no id)')}"
  if "function" not in meta:
    raise BadInputError(where, "needs a 'function' field (the function docs, as in BFCL)")
  functions = meta["function"]
  answers = meta.get("ground_truth") or []
  category = meta.get("category") or infer_category(functions, answers)
  try:
    return bfcl_correct(output, functions=functions, answers=answers, category=category)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    if isinstance(e, BadInputError):
      raise
    raise BadInputError(where, f"malformed function docs or answer key ({type(e).__name__}: {e})") from None


scoring.register_scorer("bfcl", bfcl)
scoring.BUILTIN.add("bfcl")
