"""Scorers by name: how a task judges one generated output, `(example, output) -> bool`.

A config names a task's scorer (`data.jsonl_tasks.<task>.scorer = "function_call"`) and a run
records that name in its tasks.json, so the task can be rebuilt without the code that defined
it. A scorer reads the example's target and its metadata (`example.meta`: every other field of
the source record, e.g. alternative answers or function docs).

Built in:
- exact_match: the output equals the target (surrounding whitespace ignored).
- json_equal: output and target parse as JSON to equal values.
- function_call: JSON lists of calls ({"name", "arguments"}) match structurally, in any order
  (integral floats equal ints; a code fence around the output is allowed).
- function_call_ordered: the same, in order (chains).
- regex: the output (stripped) fully matches the record's `pattern` field, else the target read
  as a regular expression.
- numeric: the first number in the output equals the target's within the record's `tolerance`
  field (default: relative 1e-6).
- bfcl: BFCL's AST rules against the record's answer key (mtjax.tasks.function_calling).

`register_scorer("mine", fn)` (in a config file) adds one; a task that uses it then needs that
config file for `mtjax eval --config`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

from mtjax.tasks import Example, exact_match

Scorer = Callable[[Example, str], bool]

_SCORERS: dict[str, Scorer] = {}
_DEFINED_IN: dict[str, str] = {}  # scorer name -> the config file that registered it
BUILTIN: set[str] = set()


def register_scorer(name: str, fn: Scorer, *, replace: bool = False) -> Scorer:
  """Registers `fn` under `name`. Config files that define scorers pass replace=True (re-imports)."""
  from mtjax.config import defining_file
  if not name or "/" in name:
    raise ValueError(f"a scorer name is a non-empty string without '/': {name!r}")
  if name in _SCORERS and not replace and _SCORERS[name] is not fn:
    raise ValueError(f"scorer {name!r} is already registered")
  _SCORERS[name] = fn
  _DEFINED_IN[name] = defining_file()
  return fn


def defined_in(name: str) -> str:
  """The config file that registered scorer `name` ("" for built-ins and library calls)."""
  return _DEFINED_IN.get(name, "")


def get_scorer(name: str) -> Scorer:
  try:
    return _SCORERS[name]
  except KeyError:
    raise KeyError(f"unknown scorer {name!r} (known: {', '.join(scorer_names())})") from None


def scorer_names() -> list[str]:
  return sorted(_SCORERS)


def name_of(fn: Scorer) -> str:
  """The registered name of a scorer function, or "" if it has none."""
  for name, registered in _SCORERS.items():
    if registered is fn:
      return name
  return ""


def strip_fence(output: str) -> str:
  """The text inside a Markdown code fence (```json ... ```), else the output, stripped."""
  text = output.strip()
  match = re.fullmatch(r"```[A-Za-z0-9_+-]*\s*\n?(.*?)\n?\s*```", text, re.DOTALL)
  return match.group(1).strip() if match else text


def json_equal(example: Example, output: str) -> bool:
  try:
    return json.loads(strip_fence(output)) == json.loads(example.target)
  except (ValueError, TypeError, RecursionError):
    return False


def function_call(example: Example, output: str) -> bool:
  from mtjax.tasks.suites.function_calling import calls_match
  try:
    return calls_match(example.target, strip_fence(output), ordered=False)
  except (ValueError, TypeError, RecursionError):
    return False


def function_call_ordered(example: Example, output: str) -> bool:
  from mtjax.tasks.suites.function_calling import calls_match
  try:
    return calls_match(example.target, strip_fence(output), ordered=True)
  except (ValueError, TypeError, RecursionError):
    return False


def regex(example: Example, output: str) -> bool:
  pattern = example.meta.get("pattern", example.target)
  try:
    return re.fullmatch(str(pattern), output.strip(), re.DOTALL) is not None
  except re.error:
    return False


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def numeric(example: Example, output: str) -> bool:
  found = _NUMBER.search(output.replace(",", ""))
  want = _NUMBER.search(example.target.replace(",", ""))
  if found is None or want is None:
    return False
  got, expected = float(found.group()), float(want.group())
  tolerance = example.meta.get("tolerance")
  if isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool):
    return abs(got - expected) <= float(tolerance)
  return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)


for _name, _fn in (("exact_match", exact_match), ("json_equal", json_equal),
                   ("function_call", function_call), ("function_call_ordered", function_call_ordered),
                   ("regex", regex), ("numeric", numeric)):
  register_scorer(_name, _fn)
  BUILTIN.add(_name)
