"""BFCL (Berkeley Function Calling Leaderboard, v4) as built-in eval-only tasks.

Five single-turn categories of BFCL v4, scored by BFCL's AST rules (`bfcl_correct` in
mtjax.tasks.function_calling, scorer "bfcl"):

  task                     BFCL file                               questions
  bfcl_simple              BFCL_v4_simple_python.json              400
  bfcl_multiple            BFCL_v4_multiple.json                   200
  bfcl_parallel            BFCL_v4_parallel.json                   200
  bfcl_parallel_multiple   BFCL_v4_parallel_multiple.json          200
  bfcl_irrelevance         BFCL_v4_irrelevance.json                240

They are benchmarks, held out from training (`eval_only`): a config may name them in
data.tasks only with data.allow_eval_only=true, and they have only a "validation" split (every
question).

Data: the `bfcl-eval` package (Apache-2.0), pinned to bfcl-eval==2026.3.23, is downloaded with
`pip download --no-deps` on first use (never at import) and unpacked, not installed (it pins
numpy 1.26 and pulls provider SDKs), into $MTJAX_BFCL_DIR, else
~/.cache/mtjax/bfcl/bfcl_eval-2026.3.23. Offline, run `mtjax data fetch bfcl` on a machine with
PyPI access and copy that directory, or point MTJAX_BFCL_DIR at an unpacked bfcl_eval wheel.

Prompt (instruction + input) and expected output, e.g. for simple_python_1:

  Call the functions below to answer the user. Reply with only a JSON list of calls, each
  {"name": <the function's name as given>, "arguments": {<parameter>: <value>}}; reply [] if
  no function fits the request.
  functions: [{"name":"math.factorial","description":"Calculate the factorial of a given
  number.","parameters":{"type":"dict","properties":{"number":{"type":"integer",...}},
  "required":["number"]}}]
  user: Calculate the factorial of 5 using math functions.

  -> [{"name":"math.factorial","arguments":{"number":5}}]

The first line is the fixed instruction; the input is "functions: " + the question's function
docs as compact JSON (BFCL's own docs, unchanged: parameter types are BFCL's names such as
"dict", "float", "tuple", "any") followed by one "<role>: <content>" line per message. The
target is the answer key's first accepted answer in mtjax's call format (for each parameter
its first accepted value; parameters whose first accepted value is "" (optional) left out;
calls in the key's order; "[]" for irrelevance). Any output the AST rules accept scores as
right: strings are compared after BFCL's normalization, parallel calls in any order, other
accepted values count (see mtjax.tasks.function_calling). Only whitespace and a Markdown code
fence around the JSON are forgiven.

Each Example's meta: {"id", "function", "ground_truth", "category"}, the fields the "bfcl"
scorer reads; a user's JSONL task with "function" and "ground_truth" fields (and optionally
"category") can use scorer "bfcl" too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

from mtjax.errors import BadInputError
from mtjax.tasks import Example, Task, register
from mtjax.tasks.function_calling import bfcl as bfcl_scorer
from mtjax.tasks.sources import Loaded
from mtjax.wheels import WheelData

VERSION = "2026.3.23"
REQUIREMENT = f"bfcl-eval=={VERSION}"
# sha256 of bfcl_eval-2026.3.23-py3-none-any.whl on PyPI.
WHEEL_SHA256 = "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a"

# task -> (category, data file, number of questions)
TASKS: dict[str, tuple[str, str, int]] = {
    "bfcl_simple": ("simple", "BFCL_v4_simple_python.json", 400),
    "bfcl_multiple": ("multiple", "BFCL_v4_multiple.json", 200),
    "bfcl_parallel": ("parallel", "BFCL_v4_parallel.json", 200),
    "bfcl_parallel_multiple": ("parallel_multiple", "BFCL_v4_parallel_multiple.json", 200),
    "bfcl_irrelevance": ("irrelevance", "BFCL_v4_irrelevance.json", 240),
}

INSTRUCTION = ("Call the functions below to answer the user. Reply with only a JSON list of calls, "
               'each {"name": <the function\'s name as given>, "arguments": {<parameter>: <value>}}; '
               "reply [] if no function fits the request.\n")

_MARKER = pathlib.Path("bfcl_eval", "data", "BFCL_v4_simple_python.json")
WHEEL = WheelData("bfcl", REQUIREMENT, WHEEL_SHA256, _MARKER.as_posix(), "MTJAX_BFCL_DIR",
                  "BFCL data")


def cache_dir() -> pathlib.Path:
  """Where the unpacked wheel lives: $MTJAX_BFCL_DIR, else ~/.cache/mtjax/bfcl/bfcl_eval-VERSION."""
  return WHEEL.cache_dir()


def fetch(quiet: bool = False) -> pathlib.Path:
  """The directory that contains the `bfcl_eval` package, downloaded and unpacked once (see
  mtjax.wheels). Raises BadInputError (one line) when it cannot download."""
  return WHEEL.fetch(quiet)


def _records(path: pathlib.Path) -> list[dict[str, Any]]:
  """A BFCL data file: JSON lines (despite the .json name)."""
  records = []
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise BadInputError(str(path), f"cannot be read ({e.strerror or e})") from None
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise BadInputError(f"{path}:{lineno}", f"bad record ({e}); delete {cache_dir()} and "
                          "fetch again") from None
    if not isinstance(record, dict) or "id" not in record:
      raise BadInputError(f"{path}:{lineno}", "expected a JSON object with an 'id'")
    records.append(record)
  return records


def _value(value: Any, schema: dict[str, Any]) -> Any:
  """An accepted value as the model should write it: a dict parameter's accepted value is
  {key: [accepted]} (so is each dict of an array of dicts); each key takes its first."""
  kind = schema.get("type")
  if kind == "dict" and isinstance(value, dict):
    return _first_dict(value)
  items = schema.get("items")
  if kind in ("array", "tuple") and isinstance(items, dict) and items.get("type") == "dict" and \
      isinstance(value, list) and all(isinstance(v, dict) for v in value):
    return [_first_dict(v) for v in value]
  return value


def _first_dict(accepted: dict[str, Any]) -> dict[str, Any]:
  return {k: vs[0] for k, vs in accepted.items()
          if isinstance(vs, list) and vs and vs[0] != ""}


def first_call(answer: dict[str, Any], functions: list[dict[str, Any]]) -> dict[str, Any]:
  """An answer of the key as a call in mtjax's format: for each parameter its first accepted
  value; a parameter whose first accepted value is "" (may be left out) is left out, unless the
  function doc requires it (then its first other value); so is a parameter the doc does not
  define, when the key lets it be left out."""
  (name, params), = answer.items()
  doc = next((f for f in functions if f.get("name") == name), {})
  properties = doc.get("parameters", {}).get("properties", {})
  required = set(doc.get("parameters", {}).get("required", ()))
  arguments = {}
  for param, values in params.items():
    if not values or (values[0] == "" and param not in required):
      continue
    if doc and param not in properties and "" in values:
      continue  # a key's parameter the doc lacks (parallel_multiple_26): giving it is wrong
    value = values[0] if values[0] != "" else next((v for v in values if v != ""), "")
    if value == "":
      continue
    arguments[param] = _value(value, properties.get(param, {}))
  return {"name": name, "arguments": arguments}


def prompt_input(functions: Any, question: list[list[dict[str, Any]]]) -> str:
  """The input text: the function docs as compact JSON, then one "<role>: <content>" line per
  message of the question's turns."""
  docs = json.dumps(functions, ensure_ascii=False, separators=(",", ":"))
  turns = "".join(f"{m['role']}: {m['content']}\n" for turn in question for m in turn)
  return f"functions: {docs}\n{turns}"


def make_example(record: dict[str, Any], ground_truth: list[dict[str, Any]],
                 category: str) -> Example:
  calls = [first_call(a, record["function"]) for a in ground_truth]
  target = json.dumps(calls, ensure_ascii=False, separators=(",", ":"))
  meta = {"id": record["id"], "function": record["function"], "ground_truth": ground_truth,
          "category": category}
  return Example(INSTRUCTION, prompt_input(record["function"], record["question"]), target, meta)


@functools.cache
def examples(task: str) -> tuple[Example, ...]:
  """Every question of a BFCL task (fetches the data on first use)."""
  category, filename, _ = TASKS[task]
  data = fetch() / "bfcl_eval" / "data"
  questions = _records(data / filename)
  keys: dict[str, list[dict[str, Any]]] = {}
  if category != "irrelevance":
    answers = data / "possible_answer" / filename
    for r in _records(answers):  # each an object with an id (_records checks)
      if not isinstance(r.get("ground_truth"), list):
        raise BadInputError(str(answers), f"answer {r['id']!r}: expected a ground_truth list")
      keys[r["id"]] = r["ground_truth"]
  out = []
  for record in questions:
    if category != "irrelevance" and record["id"] not in keys:
      raise BadInputError(str(data / "possible_answer" / filename),
                          f"no answer key for {record['id']!r}")
    try:
      out.append(make_example(record, keys.get(record["id"], []), category))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise BadInputError(f"{data / filename}#{record['id']}", f"bad record ({e!r})") from None
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class BfclSource:
  """One BFCL category: a "validation" split holding every question, no "train" split."""

  task: str

  def load(self, split: str, seed: int, on_bad_record: str = "stop") -> Loaded:
    del seed, on_bad_record  # fixed benchmark data: the pipeline shuffles; a bad record stops
    if split == "train":
      raise BadInputError(f"task {self.task}", "is an eval-only benchmark (BFCL): it has no "
                          "'train' split, only 'validation'")
    if split != "validation":
      raise BadInputError(f"task {self.task}", f"has no {split!r} split (only 'validation')")
    return Loaded(examples(self.task))


for _name in TASKS:
  register(Task(_name, BfclSource(_name), bfcl_scorer, eval_only=True, scorer="bfcl"))
