"""The `function_calling` suite: Granite's seven granular subtasks, the umbrella task, irrelevance.

A generated catalogue of APIs (CATALOGUE_SIZE, in DOMAINS) with typed parameters (strings, enums,
integers, numbers, nested objects) and descriptions. HELD_OUT_APIS of them never occur in train:
the validation split uses only those, so scores measure generalization to unseen APIs.

Subtasks (Granite-FunctionCalling): name detection, parameter-value detection, next-best
function, parallel functions, function chaining, nested calls, response generation; plus the
umbrella task (query + library -> the whole call sequence) and irrelevance (no function fits:
an empty list). Targets are JSON; `calls_match` compares structure (names and arguments, order-
insensitive for parallel calls), so formatting differences do not count as errors.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mtjax.tasks import Example
from mtjax.tasks.suites import SuiteBuilder, register_suite

DOMAINS = {
    "weather": ("forecast", "alert", "humidity", "wind", "uv_index"),
    "travel": ("flight", "hotel", "train", "car_rental", "visa"),
    "finance": ("stock_quote", "exchange_rate", "loan", "invoice", "budget"),
    "music": ("playlist", "song", "album", "artist", "concert"),
    "email": ("message", "draft", "folder", "contact", "signature"),
    "calendar": ("event", "reminder", "meeting", "holiday", "timezone"),
    "shopping": ("order", "cart", "product", "coupon", "return"),
    "maps": ("route", "place", "traffic", "parking", "distance"),
    "news": ("headline", "article", "topic", "source", "digest"),
    "sports": ("score", "team", "player", "fixture", "standing"),
    "health": ("appointment", "prescription", "symptom", "doctor", "insurance"),
    "food": ("recipe", "restaurant", "delivery", "menu", "nutrition"),
}
VERBS = ("get", "search", "create", "delete")
CATALOGUE_SIZE = len(DOMAINS) * 5 * len(VERBS)  # 240
HELD_OUT_APIS = 60
_SEED = 7

_CITIES = ("paris", "tokyo", "lima", "oslo", "cairo", "delhi", "quito", "rome")
_NAMES = ("ana", "bo", "chen", "dara", "eli", "femi", "gus", "hana")
_ENUMS = (("low", "medium", "high"), ("daily", "weekly", "monthly"), ("asc", "desc"),
          ("small", "large"), ("email", "sms", "push"))


@dataclasses.dataclass(frozen=True)
class Param:
  name: str
  kind: str  # string | integer | number | enum | object
  choices: tuple[str, ...] = ()
  fields: tuple[Param, ...] = ()  # for objects

  def spec(self) -> str:
    if self.kind == "enum":
      return f"{self.name}:{'|'.join(self.choices)}"
    if self.kind == "object":
      return f"{self.name}:{{{','.join(f.spec() for f in self.fields)}}}"
    return f"{self.name}:{self.kind}"

  def sample(self, rng: np.random.Generator) -> Any:
    if self.kind == "string":
      return str(rng.choice(_CITIES if "city" in self.name or "place" in self.name else _NAMES))
    if self.kind == "integer":
      return int(rng.integers(1, 100))
    if self.kind == "number":
      return round(float(rng.integers(1, 1000)) / 10, 1)
    if self.kind == "enum":
      return str(rng.choice(self.choices))
    return {f.name: f.sample(rng) for f in self.fields}


@dataclasses.dataclass(frozen=True)
class Api:
  name: str
  description: str
  params: tuple[Param, ...]
  returns: str  # the field its result has, for chaining

  def spec(self) -> str:
    return f"{self.name}({', '.join(p.spec() for p in self.params)}) -> {self.returns}: {self.description}"


def catalogue() -> list[Api]:
  """The deterministic API catalogue (CATALOGUE_SIZE APIs in len(DOMAINS) domains)."""
  rng = np.random.default_rng(_SEED)
  apis = []
  pool = [Param("city", "string"), Param("name", "string"), Param("count", "integer"),
          Param("limit", "integer"), Param("amount", "number"), Param("price", "number")]
  for domain, entities in DOMAINS.items():
    for entity in entities:
      for verb in VERBS:
        k = int(rng.integers(1, 4))
        chosen = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
        enum = _ENUMS[int(rng.integers(len(_ENUMS)))]
        chosen.append(Param(f"{entity}_{'level' if enum[0] == 'low' else 'mode'}", "enum", enum))
        if rng.random() < 0.3:
          chosen.append(Param("filter", "object", fields=(Param("city", "string"),
                                                           Param("limit", "integer"))))
        apis.append(Api(f"{domain}.{verb}_{entity}", f"{verb} a {entity.replace('_', ' ')} in {domain}",
                        tuple(chosen), f"{entity}_id"))
  return apis


def api_split() -> tuple[list[Api], list[Api]]:
  """(train APIs, held-out APIs): held-out ones never appear in the train split."""
  apis = catalogue()
  order = np.random.default_rng(_SEED + 1).permutation(len(apis))
  held = {int(i) for i in order[:HELD_OUT_APIS]}
  return ([a for i, a in enumerate(apis) if i not in held],
          [a for i, a in enumerate(apis) if i in held])


def _call(api: Api, rng: np.random.Generator) -> dict:
  return {"name": api.name, "arguments": {p.name: p.sample(rng) for p in api.params}}


def _say(call: dict) -> str:
  args = ", ".join(f"{k} {json.dumps(v, sort_keys=True)}" for k, v in call["arguments"].items())
  return f"{call['name'].split('.')[1].replace('_', ' ')} with {args}"


def _library(rng, apis: list[Api], must: list[Api], size: int = 4) -> list[Api]:
  names = {a.name for a in must}
  others = [apis[int(i)] for i in rng.choice(len(apis), size=size + len(must), replace=False)
            if apis[int(i)].name not in names]
  lib = must + others[: max(size - len(must), 0)]
  return [lib[int(i)] for i in rng.permutation(len(lib))]


def _lib_text(lib: list[Api]) -> str:
  return "".join(f"- {a.spec()}\n" for a in lib)


def _dump(x: Any) -> str:
  return json.dumps(x, sort_keys=True, separators=(",", ":"))


def make_subtask(kind: str, apis: list[Api]):
  """A generator of Examples for one subtask, drawing APIs from `apis`."""

  def pick(rng, n=1):
    return [apis[int(i)] for i in rng.choice(len(apis), size=n, replace=False)]

  def make(rng: np.random.Generator) -> Example:
    if kind == "name_detection":
      chosen = pick(rng, int(rng.integers(1, 3)))
      calls = [_call(a, rng) for a in chosen]
      lib = _library(rng, apis, chosen)
      query = " and ".join(_say(c) for c in calls)
      return Example("which functions? ", f"{_lib_text(lib)}query: {query}\n",
                     _dump(sorted(c["name"] for c in calls)))
    if kind == "parameter_detection":
      (api,) = pick(rng)
      call = _call(api, rng)
      return Example("arguments? ", f"- {api.spec()}\nquery: {_say(call)}\n", _dump(call["arguments"]))
    if kind == "next_best":
      chosen = pick(rng, 3)
      calls = [_call(a, rng) for a in chosen]
      done = int(rng.integers(0, 3))
      lib = _library(rng, apis, chosen, size=5)
      return Example("next function? ", f"{_lib_text(lib)}query: {' then '.join(_say(c) for c in calls)}\n"
                     f"done: {_dump([c['name'] for c in calls[:done]])}\n", _dump(calls[done]["name"]))
    if kind == "parallel":
      chosen = pick(rng, int(rng.integers(2, 4)))
      calls = [_call(a, rng) for a in chosen]
      lib = _library(rng, apis, chosen)
      return Example("calls (parallel)? ", f"{_lib_text(lib)}query: {' and also '.join(_say(c) for c in calls)}\n",
                     _dump(calls))
    if kind == "chaining":
      first, second = pick(rng, 2)
      c1, c2 = _call(first, rng), _call(second, rng)
      key = second.params[0].name
      c2["arguments"][key] = f"$1.{first.returns}"
      lib = _library(rng, apis, [first, second])
      query = f"{_say(c1)}, then {_say(c2).replace(_dump(c2['arguments'][key]), 'the result')}"
      return Example("calls (chain)? ", f"{_lib_text(lib)}query: {query}\n", _dump([c1, c2]))
    if kind == "nested":
      outer, inner = pick(rng, 2)
      ci, co = _call(inner, rng), _call(outer, rng)
      key = outer.params[0].name
      co["arguments"][key] = ci
      lib = _library(rng, apis, [outer, inner])
      query = f"{_say({'name': outer.name, 'arguments': {k: v for k, v in co['arguments'].items() if k != key}})}" \
              f" where {key} is the result of {_say(ci)}"
      return Example("call (nested)? ", f"{_lib_text(lib)}query: {query}\n", _dump([co]))
    if kind == "response":
      (api,) = pick(rng)
      call = _call(api, rng)
      result = {api.returns: int(rng.integers(1000, 9999))}
      return Example("respond: ", f"query: {_say(call)}\ncall: {_dump(call)}\nresult: {_dump(result)}\n",
                     f"done: {api.name.split('.')[1].replace('_', ' ')} gave {api.returns} "
                     f"{result[api.returns]}.")
    if kind == "umbrella":
      n = int(rng.integers(1, 4))
      chosen = pick(rng, n)
      calls = [_call(a, rng) for a in chosen]
      lib = _library(rng, apis, chosen)
      return Example("calls? ", f"{_lib_text(lib)}query: {' and '.join(_say(c) for c in calls)}\n",
                     _dump(calls))
    if kind == "irrelevance":
      lib = _library(rng, apis, [])
      domains = {a.name.split(".")[0] for a in lib}
      other = sorted(set(DOMAINS) - domains)
      domain = other[int(rng.integers(len(other)))]
      entity = DOMAINS[domain][int(rng.integers(5))]
      query = f"{VERBS[int(rng.integers(4))]} {entity.replace('_', ' ')} in {domain}"
      return Example("calls? ", f"{_lib_text(lib)}query: {query}\n", "[]")
    raise ValueError(kind)

  return make


SUBTASKS = ("name_detection", "parameter_detection", "next_best", "parallel", "chaining",
            "nested", "response")
TASKS = SUBTASKS + ("umbrella", "irrelevance")


# ----------------------------------------------------------------------------- scoring


def _canonical(x: Any) -> Any:
  """Order-insensitive form of calls: lists of calls compare as multisets."""
  if isinstance(x, dict):
    return tuple(sorted((k, _canonical(v)) for k, v in x.items()))
  if isinstance(x, list):
    return ("list", tuple(sorted((_canonical(v) for v in x), key=repr)))
  if isinstance(x, float) and x.is_integer():
    return int(x)
  return x


def calls_match(expected: str, output: str, *, ordered: bool) -> bool:
  """Structural match of JSON call lists (names and argument values); order-insensitive unless
  `ordered` (chains must run in order)."""
  try:
    got = json.loads(output)
  except (ValueError, TypeError):
    return False
  want = json.loads(expected)
  if ordered:
    return isinstance(got, list) and len(got) == len(want) and all(
        _canonical(a) == _canonical(b) for a, b in zip(want, got))
  return _canonical(want) == _canonical(got)


def _json_equal(expected: str, output: str) -> bool:
  try:
    return json.loads(output) == json.loads(expected)
  except (ValueError, TypeError):
    return False


def scorer(kind: str):
  if kind == "next_best":
    return lambda ex, out: _json_equal(ex.target, out)
  if kind == "chaining":
    return lambda ex, out: calls_match(ex.target, out, ordered=True)
  if kind == "response":
    return lambda ex, out: out.strip() == ex.target
  return lambda ex, out: calls_match(ex.target, out, ordered=False)


class MtjaxFunctionCalling(SuiteBuilder):
  """mtjax function calling: Granite's subtasks, umbrella and irrelevance over generated APIs."""

  SUITE = "fc"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TASKS]

  def _split_generators(self, dl_manager):
    del dl_manager
    train_apis, held_apis = api_split()
    kind = self.task
    out = {}
    for split, apis, size in (("train", train_apis, 5000), ("validation", held_apis, 500)):
      rng = np.random.default_rng([_SEED, zlib.crc32(f"{kind}/{split}".encode())])
      make = make_subtask(kind, apis)
      out[split] = self._generate_examples([make(rng) for _ in range(size)])
    return out


# Held out by API (api_split): every validation prompt shows a held-out API, no train prompt does.
MtjaxFunctionCalling.TASKS = {n: (None, None) for n in TASKS}
register_suite(MtjaxFunctionCalling, {n: scorer(n) for n in TASKS})
