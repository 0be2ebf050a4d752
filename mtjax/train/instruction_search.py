"""Evolutionary search over instruction texts, one per task: the "discrete instructions" fast channel.

Tiwari et al. 2026 ("Learning, Fast and Slow", arXiv 2605.12484) split adaptation into fast
weights, an optimized context (the instruction), and slow weights, the parameters, and optimize
the fast ones with GEPA: reflective prompt evolution, where a strong model reads traces and
rewrites the prompt. This module is NOT GEPA. The small models mtjax trains cannot reflect on
their own traces usefully, so the mutations here are blind, drawn from material at hand:

  pool       replace the instruction by a phrasing from the task's pool (or the global pool);
  crossover  word-level splice with another task's current instruction (a prefix of one and a
             suffix of the other, the other task's words always included);
  edit       drop a word, swap two adjacent words, insert or substitute a word of the pool's
             vocabulary;
  concat     prepend or append a pool phrasing.

Each round, per task, `mutations_per_round` new texts are proposed from the `elite` best,
deduplicated against everything already scored, scored in one batched call (score_fn(task,
texts) -> scores on a tuning split, higher better; never twice for a (task, text)), and the best
`population` of old and new are kept (elitist: the best text ever scored is never lost; ties go to
the shorter text, then the lexicographically smaller). The task's current instruction is the best.
Word-level operators join words with single spaces, so a mutated text's whitespace is normalized
(a starting "copy: " becomes "copy:" once mutated); pool phrasings are used verbatim by `pool`.

Pure Python/numpy and deterministic for a seed: the state (to_json/from_json) carries the numpy
Generator's exact bit-generator state, so a search resumed from a checkpoint continues exactly as
an uninterrupted one. Tasks are visited in sorted order, so key order in the JSON does not matter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np

OPERATORS = ("pool", "crossover", "edit", "concat")
ScoreFn = Callable[[str, list[str]], Sequence[float]]  # (task, texts) -> scores, higher better
_JSON_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  population: int = 8  # texts kept per task
  elite: int = 2  # the best `elite` are the parents of a round's mutations
  mutations_per_round: int = 8  # new (never scored) texts proposed per task per round
  seed: int = 0
  initial_from_pool: int = 3  # pool phrasings in the starting population, beside the start text
  operators: tuple[str, ...] = OPERATORS  # a subset of OPERATORS, drawn uniformly
  max_words: int = 64  # longer candidates are discarded (concat/crossover would grow them)
  max_attempts: int = 20  # proposal tries per wanted candidate before a round gives up on more

  def validate(self) -> None:
    if self.elite < 1:
      raise ValueError(f"instruction search: elite must be >= 1, got {self.elite}")
    if self.population < self.elite:
      raise ValueError(f"instruction search: population ({self.population}) must be >= elite "
                       f"({self.elite}): the elite are drawn from the population")
    if self.mutations_per_round < 1:
      raise ValueError("instruction search: mutations_per_round must be >= 1, got "
                       f"{self.mutations_per_round}")
    if self.initial_from_pool < 0 or self.max_words < 1 or self.max_attempts < 1:
      raise ValueError("instruction search: expected initial_from_pool >= 0, max_words >= 1, "
                       "max_attempts >= 1")
    unknown = [op for op in self.operators if op not in OPERATORS]
    if unknown or not self.operators:
      raise ValueError(f"instruction search: operators must be a non-empty subset of {OPERATORS}, "
                       f"got {self.operators}")


@dataclasses.dataclass
class SearchState:
  current: dict[str, str]  # task -> its best instruction so far (the starting one before round 1)
  population: dict[str, list[str]]  # task -> texts kept, best first once scored
  scores: dict[str, dict[str, float]]  # task -> text -> score: every text ever scored
  pools: dict[str, list[str]]  # task -> the phrasings its mutations draw on
  round: int  # rounds done
  rng_state: dict[str, Any]  # numpy PCG64 bit_generator.state


def init_state(tasks: Mapping[str, str], pool: Mapping[str, Sequence[str]] | Sequence[str],
               config: SearchConfig = SearchConfig()) -> SearchState:
  """The search's start: each task's starting instruction plus a few of its pool's phrasings.

  `pool` is one global list of phrasings, or phrasings per task; a task with none of its own
  draws on the global pool (all tasks' phrasings together).
  """
  config.validate()
  if not tasks:
    raise ValueError("instruction search: no tasks")
  if isinstance(pool, str):
    raise ValueError("instruction search: pool must be a list of phrasings (or a mapping task -> "
                     "list), not one string")
  names = sorted(tasks)
  if isinstance(pool, Mapping):
    for t in pool:
      if isinstance(pool[t], str):
        raise ValueError(f"instruction search: the pool for {t!r} must be a list of phrasings, "
                         "not one string")
    everything = _phrasings(p for t in sorted(pool) for p in pool[t])
    pools = {t: _phrasings(pool.get(t, ())) or everything for t in names}
  else:
    everything = _phrasings(pool)
    pools = {t: list(everything) for t in names}
  crossover = "crossover" in config.operators and len(names) >= 2
  from_pool = set(config.operators) & {"pool", "edit", "concat"}
  for t in names:
    if not crossover and not (pools[t] and from_pool):
      raise ValueError(
        f"instruction search: task {t!r} has nothing to mutate from: "
        + ("its pool is empty (and so is the global pool)" if not pools[t] else
           f"no pool operator among {config.operators}")
        + " and there is no other task to cross over with (crossover needs >= 2 tasks and "
        "'crossover' in operators)")
  rng = np.random.Generator(np.random.PCG64(config.seed))
  population = {}
  for t in names:
    others = [p for p in pools[t] if p != tasks[t]]
    k = min(config.initial_from_pool, config.population - 1, len(others))
    picked = rng.choice(len(others), size=k, replace=False) if k else []
    population[t] = [tasks[t]] + [others[int(i)] for i in picked]
  return SearchState(current={t: tasks[t] for t in names}, population=population,
                     scores={t: {} for t in names}, pools=pools, round=0,
                     rng_state=dict(rng.bit_generator.state))


def step(state: SearchState, score_fn: ScoreFn,
         config: SearchConfig = SearchConfig()) -> SearchState:
  """One round for every task (see the module docstring); returns a new state, `state` untouched."""
  config.validate()
  rng = _generator(state.rng_state)
  names = sorted(state.current)
  snapshot = dict(state.current)  # crossover partners: the instructions as the round began
  scores = {t: dict(state.scores[t]) for t in names}
  population = {}
  for task in names:
    cache = scores[task]
    _score_missing(task, state.population[task], cache, score_fn)
    ranked = _rank(state.population[task], cache)
    candidates = _propose(task, ranked[:config.elite], snapshot, state.pools[task], cache, rng,
                          config)
    _score_missing(task, candidates, cache, score_fn)
    population[task] = _rank(ranked + candidates, cache)[:config.population]
  return SearchState(current={t: population[t][0] for t in names}, population=population,
                     scores=scores, pools={t: list(state.pools[t]) for t in names},
                     round=state.round + 1, rng_state=dict(rng.bit_generator.state))


def current_scores(state: SearchState) -> dict[str, float | None]:
  """Each task's current instruction's score (None before it has been scored)."""
  return {t: state.scores[t].get(text) for t, text in state.current.items()}


def to_json(state: SearchState) -> dict[str, Any]:
  """Plain JSON data (strings, ints, finite floats); from_json(to_json(s)) resumes exactly.

  The RNG's 128-bit integers are written as decimal strings and non-finite scores as "inf" /
  "-inf", so strict JSON writers and readers that hold numbers as float64 keep them exact.
  """
  rng = state.rng_state
  if rng.get("bit_generator") != "PCG64":
    raise ValueError(f"instruction search: expected a PCG64 RNG state, got {rng.get('bit_generator')}")
  return {
    "version": _JSON_VERSION,
    "round": state.round,
    "current": dict(state.current),
    "population": {t: list(p) for t, p in state.population.items()},
    "scores": {t: {text: (s if math.isfinite(s) else str(s)) for text, s in c.items()}
               for t, c in state.scores.items()},
    "pools": {t: list(p) for t, p in state.pools.items()},
    "rng": {"bit_generator": "PCG64", "state": str(rng["state"]["state"]),
            "inc": str(rng["state"]["inc"]), "has_uint32": int(rng["has_uint32"]),
            "uinteger": int(rng["uinteger"])},
  }


def from_json(d: Mapping[str, Any]) -> SearchState:
  if d.get("version") != _JSON_VERSION:
    raise ValueError(f"instruction search: unknown state version {d.get('version')!r}")
  rng = d["rng"]
  if rng.get("bit_generator") != "PCG64":
    raise ValueError(f"instruction search: expected a PCG64 RNG state, got {rng.get('bit_generator')}")
  rng_state = {"bit_generator": "PCG64",
               "state": {"state": int(rng["state"]), "inc": int(rng["inc"])},
               "has_uint32": int(rng["has_uint32"]), "uinteger": int(rng["uinteger"])}
  _generator(rng_state)  # fails here, not mid-search, on a malformed state
  return SearchState(
    current={str(t): str(x) for t, x in d["current"].items()},
    population={str(t): [str(x) for x in p] for t, p in d["population"].items()},
    scores={str(t): {str(x): float(s) for x, s in c.items()} for t, c in d["scores"].items()},
    pools={str(t): [str(x) for x in p] for t, p in d["pools"].items()},
    round=int(d["round"]), rng_state=rng_state)


def _phrasings(texts: Iterable[str]) -> list[str]:
  """Distinct non-blank phrasings, first occurrence order."""
  return list(dict.fromkeys(t for t in texts if t.strip()))


def _generator(rng_state: Mapping[str, Any]) -> np.random.Generator:
  bit_generator = np.random.PCG64()
  bit_generator.state = cast(Any, dict(rng_state))  # numpy's stubs want a TypedDict
  return np.random.Generator(bit_generator)


def _score_missing(task: str, texts: Sequence[str], cache: dict[str, float],
                   score_fn: ScoreFn) -> None:
  missing = [t for t in dict.fromkeys(texts) if t not in cache]
  if not missing:
    return
  got = list(score_fn(task, missing))
  if len(got) != len(missing):
    raise ValueError(f"instruction search: score_fn({task!r}, ...) returned {len(got)} scores for "
                     f"{len(missing)} texts")
  for text, s in zip(missing, got):
    s = float(s)
    cache[text] = -math.inf if math.isnan(s) else s  # a NaN score ranks last


def _rank(texts: Iterable[str], cache: Mapping[str, float]) -> list[str]:
  """Best first: higher score, then the shorter text, then the lexicographically smaller."""
  return sorted(dict.fromkeys(texts), key=lambda t: (-cache[t], len(t), t))


def _propose(task: str, elites: Sequence[str], snapshot: Mapping[str, str], pool: Sequence[str],
             cache: Mapping[str, float], rng: np.random.Generator,
             config: SearchConfig) -> list[str]:
  vocab = sorted({w for p in pool for w in p.split()})  # sorted: set order varies per process
  partners = [snapshot[t].split() for t in sorted(snapshot) if t != task and snapshot[t].split()]
  ops = [op for op in config.operators
         if (op == "crossover" and partners) or (op in ("pool", "concat") and pool)
         or op == "edit"]
  out: list[str] = []
  seen = set(elites)
  for _ in range(config.mutations_per_round * config.max_attempts):
    if len(out) >= config.mutations_per_round or not ops:
      break
    parent = elites[int(rng.integers(len(elites)))]
    op = ops[int(rng.integers(len(ops)))]
    child = _mutate(op, parent, pool, vocab, partners, rng)
    if (child is None or not child.strip() or child in seen or child in cache
        or len(child.split()) > config.max_words):
      continue
    seen.add(child)
    out.append(child)
  return out


def _mutate(op: str, parent: str, pool: Sequence[str], vocab: Sequence[str],
            partners: Sequence[list[str]], rng: np.random.Generator) -> str | None:
  words = parent.split()
  pick = lambda seq: seq[int(rng.integers(len(seq)))]
  if op == "pool":
    return pick(pool)
  if op == "concat":
    phrase = pick(pool).split()
    return " ".join(words + phrase if rng.random() < 0.5 else phrase + words)
  if op == "crossover":  # always keeps at least one of the other task's words
    other = pick(partners)
    i = int(rng.integers(len(words) + 1))
    if rng.random() < 0.5:
      return " ".join(words[:i] + other[int(rng.integers(len(other))):])
    return " ".join(other[:int(rng.integers(1, len(other) + 1))] + words[i:])
  kinds = ([k for k in ("drop", "swap") if len(words) >= 2]
           + (["insert"] if vocab else []) + (["substitute"] if vocab and words else []))
  if not kinds:
    return None
  kind = pick(kinds)
  if kind == "drop":
    i = int(rng.integers(len(words)))
    return " ".join(words[:i] + words[i + 1:])
  if kind == "swap":
    i = int(rng.integers(len(words) - 1))
    return " ".join(words[:i] + [words[i + 1], words[i]] + words[i + 2:])
  if kind == "insert":
    i = int(rng.integers(len(words) + 1))
    return " ".join(words[:i] + [pick(vocab)] + words[i:])
  i = int(rng.integers(len(words)))
  return " ".join(words[:i] + [pick(vocab)] + words[i + 1:])
