"""Study targets between a floor and a ceiling.

A target a trivial predictor already reaches measures nothing (a single-task run "reaches" it
without learning), and one above the best achievable score is never reached (its ratio is always
NaN). So every study task has

- a floor: the best score of trivial baselines on the held-out examples the study evaluates (the
  validation split's examples after eval.skip, tokenized as the evaluator does, BOS prompt target
  EOS). token_accuracy (teacher-forced next-token argmax over the target tokens and EOS, pooled
  over tokens): the max of (a) an oracle-length positional frequency predictor (EOS where the
  target ends, which it knows: generous on purpose, a floor must not be underestimated; elsewhere
  the most frequent training target token at that position) and (b) a unigram (the most frequent
  training target token, EOS counted, everywhere). accuracy and pass@k (generation scored by the
  task's scorer: exact match, or an open-ended task's verifier): always answering the most
  frequent training target (the best of tied ones). Other metrics (loss, entropy): no floor.
- a ceiling where one exists: 1.0 for accuracy, pass@k and token_accuracy of a task whose target
  is a function of the prompt; a task's declared `Task.ceilings`; for token_accuracy of generated
  open-ended tasks with a `Task.target_distribution`, the Bayes-optimal teacher-forced score on
  the same held-out prompts, in expectation over the generator's targets (at each target position
  the predictor knows the prompt and the target so far and predicts the likeliest next token;
  whole targets: a data.truncate=right cut is not modelled).
  Open-ended tasks without a distribution have no token_accuracy ceiling (None).

`check_targets(config)` refuses a study target (> 0; 0 means the study uses no targets) outside
(floor, ceiling), naming `study.targets.<task>`, before any arm trains (Study.run).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

from mtjax import tasks as task_registry
from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.tasks import Example

TRAIN_SAMPLE = 5000  # training examples the frequency baselines count (the first of the split)
TOKEN_METRICS = ("token_accuracy",)
GENERATION_METRICS = ("accuracy",)  # and pass@k


def _is_pass_at(metric: str) -> bool:
  return metric.startswith("pass@")


def has_floor(metric: str) -> bool:
  """Whether `metric` is a score trivial baselines are defined for (not loss, entropy, ...)."""
  return metric in TOKEN_METRICS + GENERATION_METRICS or _is_pass_at(metric)


def _prepared(config: Config, name: str, examples: Sequence[Example]) -> list[Example]:
  """Task.preprocess and the run's instruction rewrite, as in training and in the evaluator."""
  task = task_registry.get(name)
  out = list(examples)
  if task.preprocess is not None:
    out = [task.preprocess(ex) for ex in out]
  if name in config.data.tasks:
    rewrite = task_registry.instruction_rewrite(
        name, config.data.instructions.get(name, "keep"), tuple(config.data.tasks), config.seed)
    if rewrite is not None:
      out = [rewrite(ex) for ex in out]
  return out


def heldout(config: Config, name: str, count: int) -> list[Example]:
  """The first `count` validation examples after eval.skip: the ones the evaluator scores."""
  from mtjax.eval.heldout import heldout_examples
  return heldout_examples(config, name, count)


def train_examples(config: Config, name: str) -> list[Example]:
  examples = task_registry.get(name).source.load("train", config.seed).examples
  return _prepared(config, name, [examples[i] for i in range(min(len(examples), TRAIN_SAMPLE))])


def _tokenizer(config: Config) -> Any:
  from mtjax.data import tokenizer as tokenizer_lib
  return tokenizer_lib.get(config.data.tokenizer)


def scored_targets(config: Config, examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
  """Each teacher-forced example's scored tokens (target, then EOS) as the evaluator places it
  under data.truncate in data.seq_len: examples it skips are left out, a cut one keeps the
  target tokens it still predicts."""
  from mtjax.data.pipeline import Tokenize, fit_example
  tok = Tokenize(tokenizer, 0)
  out = []
  for ex in examples:
    item = tok.map(ex)
    whole = [int(t) for t in item["tokens"][item["target_start"]:]]
    fitted = fit_example(item, config.data.seq_len, config.data.truncate)
    if fitted is None:
      continue
    placed, pairs = fitted
    scored = pairs - (int(placed["target_start"]) - 1)  # pair t predicts token t + 1
    out.append(whole[:max(0, min(len(whole), scored))])
  return out


def generated_for(config: Config, name: str, count: int, tokenizer: Any) -> list[Example]:
  """The held-out examples the evaluator generates for: the first `count` after eval.skip whose
  prompt leaves room for target and EOS in data.seq_len."""
  return [ex for ex in heldout(config, name, count)
          if 1 + tokenizer.count(ex.prompt) + tokenizer.count(ex.target) + 1 <= config.data.seq_len]


def _token_floor(config: Config, name: str, tokenizer: Any) -> float:
  targets = scored_targets(config, heldout(config, name, config.eval.num_examples), tokenizer)
  total = sum(len(t) for t in targets)
  if not total:
    return math.nan
  train = [[int(t) for t in tokenizer.encode(ex.target)] for ex in train_examples(config, name)]
  eos = tokenizer.eos_id
  by_position: list[collections.Counter] = []
  unigram: collections.Counter = collections.Counter()
  for seq in train:
    unigram.update(seq + [eos])
    for j, t in enumerate(seq):
      if j == len(by_position):
        by_position.append(collections.Counter())
      by_position[j][t] += 1
  mode = [c.most_common(1)[0][0] for c in by_position]
  top = unigram.most_common(1)[0][0] if unigram else eos
  positional = unigram_right = 0
  for held in targets:  # held: the scored prefix of target + [EOS]
    length = len(held) - 1 if held and held[-1] == eos else None  # where the target ends
    for j, t in enumerate(held):
      guess = eos if j == length else (mode[j] if j < len(mode) else eos)
      positional += guess == t
      unigram_right += top == t
  return max(positional, unigram_right) / total


def _generation_floor(config: Config, name: str, count: int, tokenizer: Any) -> float:
  task = task_registry.get(name)
  held = generated_for(config, name, count, tokenizer)
  if not held:
    return math.nan
  counts = collections.Counter(ex.target for ex in train_examples(config, name))
  if not counts:
    return 0.0
  best = max(counts.values())
  answers = [t for t, c in counts.items() if c == best]
  return max(sum(task.is_correct(ex, a) for ex in held) for a in answers) / len(held)


def _count_for(config: Config, metric: str) -> int:
  """Held-out examples a metric is computed over (its eval setting)."""
  e = config.eval
  if metric in TOKEN_METRICS:
    return e.num_examples
  if metric in GENERATION_METRICS:
    return e.num_generate
  return e.sample_prompts if e.num_samples else 0


def floor(task_name: str, metric: str, config: Config, tokenizer: Any = None) -> float | None:
  """The best trivial baseline's `metric` on the task's evaluated held-out examples (module
  docstring); None when the metric has no floor, NaN when no example is scored."""
  if not has_floor(metric):
    return None
  tokenizer = tokenizer or _tokenizer(config)
  if metric in TOKEN_METRICS:
    return _token_floor(config, task_name, tokenizer)
  return _generation_floor(config, task_name, _count_for(config, metric), tokenizer)


def bayes_token_accuracy(examples: Sequence[Example], tokenizer: Any, distribution) -> float:
  """The Bayes-optimal teacher-forced token accuracy on these prompts, in expectation over the
  generator's targets (`distribution(example)`: [(target, probability)]), pooled over tokens:
  at each position the predictor knows the prompt and the target's tokens so far and predicts
  the likeliest next token (or EOS), right with probability max_token P(token | prefix). Summed
  over a prompt's prefix tree that is sum over prefixes of max over next tokens of P(prefix +
  token); divided by the expected number of scored tokens (target and EOS)."""
  eos = tokenizer.eos_id
  right = total = 0.0
  for ex in examples:
    options = [(tuple(int(t) for t in tokenizer.encode(text)) + (eos,), p)
               for text, p in distribution(ex)]
    mass = sum(p for _, p in options)
    children: dict[tuple[int, ...], collections.Counter] = collections.defaultdict(collections.Counter)
    for seq, p in options:
      total += p / mass * len(seq)
      for j in range(len(seq)):
        children[seq[:j]][seq[j]] += p / mass
    right += sum(max(c.values()) for c in children.values())
  return right / total if total else math.nan


def ceiling(task_name: str, metric: str, config: Config, tokenizer: Any = None) -> float | None:
  """The best achievable `metric` on the task (module docstring), or None where it is unknown."""
  task = task_registry.get(task_name)
  if metric in task.ceilings:
    return float(task.ceilings[metric])
  if metric in GENERATION_METRICS or _is_pass_at(metric):
    return 1.0  # a right answer exists for every prompt (the target itself)
  if metric not in TOKEN_METRICS:
    return None
  if not task.open_ended:
    return 1.0  # the target is a function of the prompt
  if task.target_distribution is None:
    return None  # some target tokens are a guess, with unknown odds
  tokenizer = tokenizer or _tokenizer(config)
  examples = heldout(config, task_name, config.eval.num_examples)
  kept = [ex for ex in examples if _fits(config, ex, tokenizer)]  # as the evaluator skips
  return bayes_token_accuracy(kept, tokenizer, task.target_distribution)


def _fits(config: Config, ex: Example, tokenizer: Any) -> bool:
  from mtjax.data.pipeline import fit
  return fit(tokenizer.count(ex.prompt), tokenizer.count(ex.target), config.data.seq_len,
             config.data.truncate) is not None


def _metric_count_check(config: Config, name: str, metric: str) -> None:
  """A metric the eval never computes would leave every curve empty: say which setting."""
  if has_floor(metric) and not _count_for(config, metric):
    setting = {"token_accuracy": "eval.num_examples", "accuracy": "eval.num_generate"}.get(
        metric, "eval.num_samples")
    raise BadInputError(setting, f"task {name!r} is scored by {metric}, which the eval computes "
                        f"only with {setting} > 0")


def check_targets(config: Config) -> dict[str, dict[str, Any]]:
  """Every study task's target (study.targets.<task>, else study.target) lies strictly between
  its floor and ceiling under its metric, or a BadInputError names `study.targets.<task>`.
  Targets of 0 (studies that use none) are not checked. Returns {task: {metric, floor, ceiling,
  target}} for reports (None where a bound is not defined)."""
  return _table(config, strict=True)


def metric_for(config: Config, task: str) -> str:
  """The eval metric a study scores `task` by: study.task_metrics.<task>, else study.metric."""
  return str(config.study.task_metrics.get(task, config.study.metric))


def describe(config: Config) -> dict[str, dict[str, Any]]:
  """check_targets' table without refusing anything (reports rebuilt from old studies)."""
  return _table(config, strict=False)


def _table(config: Config, *, strict: bool) -> dict[str, dict[str, Any]]:
  from mtjax.resolve import resolve
  config = resolve(config)
  st = config.study
  tokenizer = None
  out: dict[str, dict[str, Any]] = {}
  for name in config.data.tasks:
    target = float(st.targets.get(name, st.target))
    metric = metric_for(config, name)
    if target <= 0 and not (has_floor(metric) and _count_for(config, metric)):
      out[name] = {"metric": metric, "floor": None, "ceiling": None, "target": target}
      continue
    if strict and target > 0:
      _metric_count_check(config, name, metric)
    tokenizer = tokenizer or _tokenizer(config)
    lo = floor(name, metric, config, tokenizer)
    hi = ceiling(name, metric, config, tokenizer)
    lo = None if lo is None or math.isnan(lo) else lo
    hi = None if hi is None or math.isnan(hi) else hi
    out[name] = {"metric": metric, "floor": lo, "ceiling": hi, "target": target}
    if strict and target > 0 and ((lo is not None and target <= lo) or
                                  (hi is not None and target >= hi)):
      raise BadInputError(
          f"study.targets.{name}",
          f"task {name!r} target {target:g} under {metric} must lie strictly between its floor "
          f"{_fmt(lo)} (trivial baselines on the evaluated held-out examples) and its ceiling "
          f"{_fmt(hi)} (the best achievable score)")
  return out


def _fmt(x: float | None) -> str:
  return "none" if x is None else f"{x:.4f}"
